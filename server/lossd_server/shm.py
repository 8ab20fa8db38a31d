"""Same-host shared-memory tensors (``--allow-client-shm``), read so that no client can abuse them.

A reference is honoured only for a segment a lossd client created for the purpose (see
``lossd_client.shm``): a regular file named ``lossd-...`` in /dev/shm, opened without following
links and without blocking, whose header starts with lossd's magic bytes and carries the
16-byte token the request presents (compared in constant time). Anything else, a symlink, FIFO,
directory, device, hard link, unrelated file or wrong token, is ``INVALID_ARGUMENT`` naming the
field.

The tensor bytes are *copied* with ``preadv`` into a buffer the server owns (private memory,
huge pages when large); nothing maps the client's file. A mapping can shrink under the server
(the client truncates the segment) and the next access would be SIGBUS, killing the process; a
read of a truncated file just returns fewer bytes, which is answered ``INVALID_ARGUMENT``.
Opening and reading touch only a regular tmpfs file (``O_NONBLOCK``, never a FIFO or device),
so no client can make them wait longer than a memory copy of the bytes it declared (README,
"Same-host shared memory", has the measured cost).
The server never creates, registers or unlinks client segments: their lifetime is the client's.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import mmap
import os
import re
import stat

import torch
from lossd_client.shm import HEADER_BYTES, MAGIC, NAME_PREFIX, TOKEN_BYTES

from .codec import TensorError

SHM_DIR = "/dev/shm"
_NAME = re.compile(rf"{re.escape(NAME_PREFIX)}[A-Za-z0-9_\-]{{1,200}}")  # used with fullmatch
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0)
#: Largest single read: Linux moves at most 0x7ffff000 bytes per read call.
_READ_STEP = 1 << 30
#: Buffers from this size on are anonymous mappings with transparent huge pages.
_HUGE_FROM = 2 << 20


def read_shared_tensor(field: str, ref, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
    """Copy the tensor ``ref`` (a SharedMemoryRef) refers to into server memory; validates everything.

    The result owns its memory: once this returns, nothing refers to the client's segment.
    """
    name = ref.name.removeprefix("/")
    if not _NAME.fullmatch(name):
        raise TensorError(
            f"{field}.shm.name",
            f"invalid segment name {_shown(ref.name)}: expected {NAME_PREFIX!r} followed by 1-200 letters, digits, '_' or '-'",
        )
    if len(ref.token) != TOKEN_BYTES:
        what = "is missing" if not ref.token else f"has {len(ref.token)} bytes"
        raise TensorError(f"{field}.shm.token", f"{what}; a reference carries its segment's {TOKEN_BYTES}-byte token")
    if ref.length != nbytes:
        raise TensorError(f"{field}.shm.length", f"expected {nbytes} bytes for shape {list(shape)} of {dtype}, got {ref.length}")
    if ref.offset < HEADER_BYTES:
        raise TensorError(f"{field}.shm.offset", f"is {ref.offset}; tensor bytes start after the segment's {HEADER_BYTES}-byte header")
    fd = _open_segment(f"{field}.shm.name", name)
    try:
        size = _check_segment(field, fd, name, ref.token)
        end = ref.offset + ref.length
        if end > size:
            raise TensorError(f"{field}.shm", f"offset {ref.offset} + length {ref.length} exceeds the segment's {size} bytes")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        hole = _next_hole(fd, ref.offset, end)
        if hole < end:
            raise TensorError(
                f"{field}.shm",
                f"bytes {hole}..{end} of segment {name!r} were never written (a sparse segment); write the tensor bytes first",
            )
        buffer = _private_buffer(nbytes)
        try:
            got = _read_into(fd, buffer, ref.offset)
        except OSError as exc:
            raise TensorError(f"{field}.shm", f"cannot read segment {name!r}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if got != nbytes:
        raise TensorError(f"{field}.shm", f"segment {name!r} shrank while being read: got {got} of {nbytes} bytes from offset {ref.offset}")
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


def _private_buffer(nbytes: int):
    """Writable server-owned memory for ``nbytes``: private to this process, so nothing a client
    does to its segment can make it shrink. Large buffers are an anonymous mapping that asks for
    transparent huge pages: faulting in 4 KiB pages cost 2-3x the copy itself (262 MB: ~120 ms
    of faults vs ~40 ms of copy on the 2-core bench VM); the mapping is unmapped when the tensor
    that views it is freed."""
    if nbytes < _HUGE_FROM:
        return bytearray(nbytes)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            buffer.madvise(mmap.MADV_HUGEPAGE)
    return buffer


#: Characters of an invalid segment name an error shows (it is echoed to the client).
SHOWN_NAME_CHARS = 256


def _shown(name: str) -> str:
    """``name`` as an error shows it: its repr, cut after SHOWN_NAME_CHARS characters."""
    if len(name) <= SHOWN_NAME_CHARS:
        return repr(name)
    return f"{name[:SHOWN_NAME_CHARS]!r}... ({len(name)} characters)"


def _open_segment(field: str, name: str) -> int:
    """An fd on /dev/shm/<name> if it is a regular file with one link; never opens anything else."""
    path = os.path.join(SHM_DIR, name)
    try:
        _require_regular(field, name, os.lstat(path))  # a FIFO or device is refused before it is opened
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise TensorError(field, f"no shared-memory segment named {name!r} on the server's host") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TensorError(field, f"segment {name!r} is a symbolic link, not a regular file a lossd client created") from None
        raise TensorError(field, f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        _require_regular(field, name, os.fstat(fd))  # what was opened, should it have been swapped
    except BaseException:
        os.close(fd)
        raise
    return fd


def _require_regular(field: str, name: str, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise TensorError(field, f"segment {name!r} is {_kind(st.st_mode)}, not a regular file a lossd client created")
    if st.st_nlink != 1:
        raise TensorError(field, f"segment {name!r} has {st.st_nlink} hard links; a lossd client's segment has one")


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _check_segment(field: str, fd: int, name: str, token: bytes) -> int:
    """The segment's size, after checking its header's magic and token against the request's."""
    head = bytearray(HEADER_BYTES)
    got = _read_into(fd, memoryview(head), 0)
    if got < HEADER_BYTES or not head.startswith(MAGIC):
        raise TensorError(f"{field}.shm.name", f"segment {name!r} is not a lossd segment (no lossd header)")
    if not hmac.compare_digest(bytes(head[len(MAGIC) : len(MAGIC) + TOKEN_BYTES]), token):
        raise TensorError(f"{field}.shm.token", f"does not match the token of segment {name!r}")
    return os.fstat(fd).st_size


def _next_hole(fd: int, start: int, end: int) -> int:
    """Offset of the first unwritten byte at or after ``start`` (``end`` if none before it)."""
    try:
        return min(end, os.lseek(fd, start, os.SEEK_HOLE))
    except OSError:  # ENXIO: the segment shrank meanwhile (the read will tell); EINVAL: no SEEK_HOLE
        return end


def _read_into(fd: int, buffer, offset: int) -> int:
    """Read up to len(buffer) bytes at ``offset``; stops early only at end of file."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + _READ_STEP]], offset + done)
        if n == 0:
            break
        done += n
    return done
