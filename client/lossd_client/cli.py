"""``lossd-client``: health check, server info, and scoring of saved logits from the shell.

    lossd-client health                      # exit 0 iff the server reports SERVING
    lossd-client info --json
    lossd-client score run.npz --class-axis -1 --shift
    lossd-client compare base.npz quantized.npz --shift     # see lossd_client.cli_compare

``score`` reads logits and targets from ``.npz`` (np.load, no pickles; only the members used are
decompressed), ``.safetensors`` (one memory map, read without torch) or torch ``.pt`` (``torch.load(weights_only=True)``: plain
tensors only, never arbitrary objects; needs torch). Large inputs are split along their first
axis into requests of about ``--batch-mb`` and streamed to the server; the totals it returns
(``loss_sum``, ``weight_sum``, ``counted``) recombine into exactly the loss torch gives for the
whole file.

Input files are untrusted: whatever a malformed file makes a loader raise, the command answers
with one line on stderr naming the file and the problem, and exit status 2 (never a traceback).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import mmap
import os
import pickle
import re
import stat
import struct
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import core, layout, tensors
from .base import MAX_TIMEOUT_S
from .client import LossClient
from .errors import InvalidArgumentError, LossdError, UnavailableError
from .types import EvaluateResult, LossRequest, exact_sum, exp

LOGITS_KEYS = ("logits", "input", "inputs", "scores", "log_probs", "logprobs")
TARGET_KEYS = ("targets", "target", "labels", "tokens", "input_ids")
LOSSES = tuple(layout.LOSSES)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A problem with the command line or an input file (exit status 2)."""


#: What numpy's, zipfile's, json's and torch's loaders raise on garbage; a file that makes a
#: loader raise one of these is reported as malformed (CliError), never as a traceback.
MALFORMED_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # also zipfile's and numpy's I/O errors
    EOFError,
    ValueError,  # also json.JSONDecodeError, UnicodeDecodeError, numpy header errors
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    struct.error,
    OverflowError,
    MemoryError,  # a header that declares more elements than fit in memory
    RecursionError,  # deeply nested JSON or pickle
    RuntimeError,  # torch.load: "PytorchStreamReader failed ..."
    zipfile.BadZipFile,
    zlib.error,
    pickle.UnpicklingError,
)


def _reason(exc: BaseException) -> str:
    """One line describing ``exc``: its first non-empty message line, or its type."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > 300:
        text = text[:297] + "..."
    kind = type(exc).__name__
    if kind == "error":  # zlib.error, struct.error, binascii.error
        kind = f"{type(exc).__module__}.error"
    return f"{kind}: {text}" if text else kind


# --------------------------------------------------------------------------- file loading
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    """What a file that is not a regular one is, for a message."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


#: Largest TLS file the CLI reads (--tls-ca-file, --tls-cert-file, --tls-key-file): a certificate
#: chain or key is a few KiB, a whole system CA bundle about 220 KiB; /dev/zero was read until
#: memory ran out, and a named pipe blocked for ever.
MAX_PEM_BYTES = 1024 * 1024


def read_pem(path: str | None, option: str, marker: str) -> bytes | None:
    """The PEM bytes of ``option``'s file (None when not given): a regular file (opened with
    O_NONBLOCK, checked before a byte is read) of at most MAX_PEM_BYTES holding a ``marker``
    block; CliError naming the option otherwise."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise CliError(f"{option} {path}: not a regular file ({_kind(mode)})")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_PEM_BYTES:
        raise CliError(f"{option} {path}: larger than {MAX_PEM_BYTES} bytes, which no PEM certificate, key or CA bundle is")
    if not re.search(rb"-----BEGIN [A-Z0-9 ]*" + marker.encode() + rb"-----", data):
        raise CliError(f"{option} {path}: not a PEM file with a {marker.lower()} (-----BEGIN ...{marker}-----)")
    return data


_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def _bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError:
        raise CliError("bfloat16 tensors in .safetensors files need ml_dtypes (pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _naturals(value: Any) -> bool:
    """A JSON list of integers >= 0 (not booleans, not floats)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


class LazyArrays(Mapping[str, Any]):
    """A file's named arrays, each built by ``load(name)`` when first asked for: the names are known
    at once, but an .npz member that is never used is never decompressed (a 2 MB file with an unused
    member that inflates to 2 GiB took 2.1 GB and 28 s) and a safetensors tensor never used is never
    viewed. ``entries``: each name and what ``load`` needs of it."""

    def __init__(self, path: Path, entries: dict[str, Any], load: Callable[[str], Any]) -> None:
        self.path = path
        self._entries = entries
        self._load = load
        self._loaded: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._entries:
            raise KeyError(name)
        if name not in self._loaded:
            with file_errors(self.path, self.path.suffix.lower()):
                self._loaded[name] = self._load(name)
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries  # without loading it (Mapping's own would)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class _FileMap:
    """One read-only mmap of a whole file, made on first use, that every tensor of it views. A
    np.memmap per tensor held a file descriptor each: 30,000 tensors ran out of them ("cannot read:
    Too many open files") although the file was readable."""

    def __init__(self, path: Path, base: int) -> None:
        self.path = path
        self.base = base  # where the data begins
        self._map: mmap.mmap | None = None

    def array(self, dtype: np.dtype, shape: tuple[int, ...], start: int) -> np.ndarray:
        """The ``shape`` array of ``dtype`` at ``start`` of the data."""
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(self._map, dtype=dtype, count=count, offset=self.base + start).reshape(shape)


def load_safetensors(path: Path) -> LazyArrays:
    """Every tensor of a .safetensors file as a read-only numpy array viewing one memory map of it.

    The JSON header is checked field by field (types, signs, bounds) before anything is mapped.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CliError(f"{path}: not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        size = os.fstat(f.fileno()).st_size
        if header_len > min(size - 8, 100 * 2**20):
            raise CliError(f"{path}: not a safetensors file (header length {header_len})")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise CliError(f"{path}: not a safetensors file (header is not JSON: {_reason(exc)})") from None
    if not isinstance(header, dict):
        raise CliError(f"{path}: not a safetensors file (header is a JSON {_json_type(header)}, expected an object)")
    base = 8 + header_len
    entries = {name: _safetensors_entry(path, name, meta, size - base) for name, meta in header.items() if name != "__metadata__"}
    mapped = _FileMap(path, base)
    return LazyArrays(path, entries, lambda name: mapped.array(*entries[name]))


def _safetensors_entry(path: Path, name: str, meta: Any, data_bytes: int) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, offset in the data) of one header entry, checked to lie inside the ``data_bytes`` of the file."""
    if not isinstance(meta, dict):
        raise CliError(
            f"{path}: tensor {_quoted(name)}: expected an object with dtype, shape and data_offsets, got a JSON {_json_type(meta)}"
        )
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise CliError(f"{path}: tensor {_quoted(name)} has no {', '.join(missing)}")
    code, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(code, str):
        raise CliError(f"{path}: tensor {_quoted(name)}: dtype must be a string, got {json.dumps(code)[:80]}")
    dtype = _bfloat16() if code == "BF16" else np.dtype(_SAFETENSORS_DTYPES.get(code, "V0"))
    if dtype.itemsize == 0:
        raise CliError(f"{path}: tensor {_quoted(name)} has unsupported dtype {code[:80]!r}")
    if not _naturals(shape):
        raise CliError(f"{path}: tensor {_quoted(name)}: shape must be a list of integers >= 0, got {json.dumps(shape)[:80]}")
    if not _naturals(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CliError(
            f"{path}: tensor {_quoted(name)}: data_offsets must be [begin, end] integers with 0 <= begin <= end, got {json.dumps(offsets)[:80]}"
        )
    start, end = offsets
    if end - start != math.prod(shape) * dtype.itemsize or end > data_bytes:
        raise CliError(
            f"{path}: tensor {_quoted(name)}: data_offsets {offsets} do not hold shape {shape} of {code} "
            f"({math.prod(shape) * dtype.itemsize} bytes) inside the file's {data_bytes} data bytes"
        )
    return dtype, tuple(shape), start


def load_npz(path: Path) -> LazyArrays:
    """The arrays of an .npz archive (np.load, no pickles), each decompressed only when used."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise CliError(f"{path}: expected an .npz archive of named arrays")
            names = list(archive.files)
    except CliError:
        raise
    except MALFORMED_FILE_ERRORS as exc:  # truncated or corrupt zip, not a zip, a pickle
        raise CliError(f"{path}: not a readable .npz archive ({_reason(exc)})") from None
    return LazyArrays(path, dict.fromkeys(names), functools.partial(_npz_member, path))


def _npz_member(path: Path, name: str) -> np.ndarray:
    """One array of an .npz archive, its declared size checked against the member's before it is read."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            _check_npz_member(path, archive.zip, name)
            value = archive[name]
    except CliError:
        raise
    except MALFORMED_FILE_ERRORS as exc:  # truncated or corrupt members, bad .npy headers, pickles
        raise CliError(f"{path}: not a readable .npz archive ({_reason(exc)})") from None
    if not isinstance(value, np.ndarray):  # numpy hands back a member without the .npy magic as bytes
        raise CliError(f"{path}: not a readable .npz archive (member {_quoted(name)} is not an .npy array)")
    return value


def _check_npz_member(path: Path, archive: zipfile.ZipFile, name: str) -> None:
    """CliError when the member of ``name`` cannot hold what its .npy header declares, or claims more
    stored bytes than the file has: refused before numpy allocates the declared array (an npz
    declaring 10**12 elements was a MemoryError, one declaring 4 GB in 16 bytes an EOF)."""
    members = {n.removesuffix(".npy"): n for n in archive.namelist()} | {n: n for n in archive.namelist()}  # numpy's own lookup
    info = archive.getinfo(members[name])
    if info.compress_size > os.path.getsize(path):
        raise CliError(
            f"{path}: not a readable .npz archive (member {_quoted(name)} claims {info.compress_size} bytes, more than the file has)"
        )
    with archive.open(info) as f:
        if f.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
            return  # not an .npy member: refused as such once read
        f.seek(0)
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return  # numpy's reader decides (version 3.0: UTF-8 field names)
        shape, _, dtype = readers[version](f)
        holds = info.file_size - f.tell()
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and declared > holds:  # object arrays: refused as pickles by np.load
        raise CliError(
            f"{path}: not a readable .npz archive (member {_quoted(name)} declares shape {shape} of {dtype} "
            f"({declared} bytes) but holds {holds} bytes)"
        )


def load_pt(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors, dicts, lists and tuples only; nothing is executed."""
    try:
        import torch
    except ImportError:
        raise CliError(f"{path}: reading .pt files needs torch (pip install torch); .npz and .safetensors do not") from None

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # what weights_only refuses, or a broken pickle
        raise CliError(f"{path}: refused to load (torch.load with weights_only=True accepts plain tensors only): {_reason(exc)}") from None
    except MALFORMED_FILE_ERRORS as exc:  # truncated zip ("PytorchStreamReader failed ..."), empty file, ...
        raise CliError(f"{path}: not a readable torch file ({_reason(exc)})") from None
    if isinstance(obj, (list, tuple)) and len(obj) == 2:
        return {"logits": obj[0], "targets": obj[1]}
    if isinstance(obj, dict):
        return dict(obj)
    raise CliError(f"{path}: expected a dict of tensors or a (logits, targets) pair, got {type(obj).__name__}")


def load_file(path: Path) -> Mapping[str, Any]:
    """The named arrays of ``path``; CliError (one line naming the file) for anything unreadable."""
    suffix = path.suffix.lower()
    loaders = {".npz": load_npz, ".safetensors": load_safetensors, ".pt": load_pt, ".pth": load_pt}
    _check_regular(path)
    if suffix not in loaders:
        raise CliError(f"{path}: unknown file type {suffix!r} (expected .npz, .safetensors or .pt)")
    with file_errors(path, suffix):
        return loaders[suffix](path)


@contextmanager
def file_errors(path: Path, suffix: str) -> Iterator[None]:
    """Reading ``path`` (a ``suffix`` file) in the block: an OSError or a malformed file is a one-line
    CliError naming it, whether the file is opened or one of its arrays is read later (:class:`LazyArrays`)."""
    try:
        yield
    except CliError:
        raise
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or _reason(exc)}") from None
    except MALFORMED_FILE_ERRORS as exc:
        raise CliError(f"{path}: malformed {suffix} file ({_reason(exc)})") from None


def _check_regular(path: Path) -> None:
    """CliError unless ``path`` is a regular file (after symlinks): a directory, a named pipe or a
    device was reported as "no such file"."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or _reason(exc)}") from None
    if stat.S_ISDIR(mode):
        raise CliError(f"{path}: is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise CliError(f"{path}: not a regular file ({_kind(mode)})")


#: At most this many array names in a message (a safetensors header of 1.7 million tensors made a 15.9 MB line).
MAX_NAMES_SHOWN = 20


def _quoted(name: Any, limit: int = 80) -> str:
    """An array's name quoted for a message, cut after ``limit`` characters."""
    text = str(name)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _names(arrays: Mapping[Any, Any]) -> str:
    """The names of ``arrays`` for a message: sorted, the first MAX_NAMES_SHOWN, then how many more."""
    names = sorted(str(k) for k in arrays)
    shown = [n if len(n) <= 80 else _quoted(n) for n in names[:MAX_NAMES_SHOWN]]
    more = f", and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else ""
    return ", ".join(shown) + more if names else "none"


def pick(
    arrays: Mapping[str, Any], wanted: str | None, candidates: Sequence[str], what: str, path: Path, *, token_ids: bool = False
) -> Any:
    """The logits or targets array of a file, checked to be one lossd can send; with ``token_ids``,
    integer arrays of any dtype are taken as ``client.compare`` takes its tokens (int64 ids)."""
    if wanted is not None:
        if wanted not in arrays:
            raise CliError(f"{path}: no array named {wanted!r} (has {_names(arrays)})")
        return _checked_array(arrays[wanted], wanted, what, path, token_ids)
    for name in candidates:
        if name in arrays:
            return _checked_array(arrays[name], name, what, path, token_ids)
    raise CliError(f"{path}: no {what} array (looked for {', '.join(candidates)}; has {_names(arrays)}); name it with --{what}-key")


def _checked_array(value: Any, name: str, what: str, path: Path, token_ids: bool = False) -> Any:
    """``value`` if it is a dense numpy array or CPU torch tensor of a dtype lossd sends (token ids
    of any integer dtype as int64 with ``token_ids``)."""
    if tensors.is_torch_tensor(value):
        import torch

        if value.layout != torch.strided:
            raise CliError(f"{path}: {what} {name!r} is a {value.layout} tensor; save a dense tensor")
        if value.device.type == "meta":
            raise CliError(f"{path}: {what} {name!r} is a meta tensor (it has no data)")
    elif not isinstance(value, np.ndarray):
        raise CliError(f"{path}: {what} {name!r} is of type {type(value).__name__}, expected a tensor")
    try:
        if token_ids:
            value = core.integer_token_ids(value, repr(name))
        tensors.wire_dtype_of(value)
    except tensors.UnsupportedTensorError as exc:
        raise CliError(f"{path}: {what} {name!r}: {exc}") from None
    except InvalidArgumentError as exc:
        raise CliError(f"{path}: {what} {exc}") from None
    return value


# --------------------------------------------------------------------------- scoring
@dataclass
class Score:
    """One file's (or the total's) figures; ``loss`` follows --reduction (mean or sum)."""

    file: str
    loss: float
    loss_sum: float
    weight_sum: float
    counted: int
    perplexity: float | None
    positions: int
    bytes: int
    requests: int
    seconds: float
    per_element: list[Any] = field(default_factory=list, repr=False)


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in x.shape)


def _nbytes(x: Any) -> int:
    return int(x.nbytes) if hasattr(x, "nbytes") else int(x.numel() * x.element_size())


def split_rows(logits: Any, target: Any, args: argparse.Namespace) -> tuple[int, int]:
    """(rows the input may be split into along its first axis, loss positions per row).

    Splitting is exact when the first axis is neither the class axis nor the axis that
    ``--shift`` moves the targets along (the target's last axis).
    """
    shape, tshape = _shape(logits), _shape(target)
    if args.loss == layout.BCE_WITH_LOGITS:
        return layout.rows(args.loss, shape) if shape and tshape[:1] == shape[:1] else (1, math.prod(shape))
    if len(shape) < 2:
        return 1, 1
    try:
        axis = layout.resolve_class_axis(len(shape), args.class_axis)
    except ValueError:
        return 1, math.prod(shape)  # the server answers with torch's error
    positions = math.prod(shape) // shape[axis] if shape[axis] else 0
    if axis == 0 or tshape[:1] != shape[:1] or (args.shift and len(tshape) < 2):
        return 1, positions
    return shape[0], positions // shape[0] if shape[0] else 0


def score_file(client: LossClient, path: Path, args: argparse.Namespace, progress: Any) -> Score:
    arrays = load_file(path)
    logits = pick(arrays, args.logits_key, LOGITS_KEYS, "logits", path)
    target = pick(arrays, args.target_key, TARGET_KEYS, "target", path)
    rows, positions_per_row = split_rows(logits, target, args)
    total_bytes = _nbytes(logits) + _nbytes(target)
    row_bytes = max(1, total_bytes // max(1, rows))
    per_request = max(1, min(rows, int(args.batch_mb * 2**20) // row_bytes))

    def request(a: int, b: int) -> LossRequest:
        x = logits[a:b] if per_request < rows else logits
        t = target[a:b] if per_request < rows else target
        return LossRequest(
            x, t, args.loss, ignore_index=args.ignore_index, reduction=args.reduction, class_axis=args.class_axis, shift_targets=args.shift
        )

    bounds = [(a, min(rows, a + per_request)) for a in range(0, rows, per_request)]
    bar = progress(total=total_bytes, desc=path.name)
    results: list[EvaluateResult] = []
    start = time.perf_counter()
    done_rows = 0

    def advance(result: EvaluateResult, a: int, b: int) -> None:
        nonlocal done_rows
        results.append(result)
        done_rows += b - a
        bar.update(row_bytes * (b - a) if b < rows else total_bytes - bar.n)
        elapsed = max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"{done_rows * positions_per_row / elapsed:,.0f} rows/s", refresh=False)

    try:
        if len(bounds) == 1 or row_bytes * per_request > args.batch_mb * 2**20:
            for a, b in bounds:  # one request at a time; the client chunks what exceeds a message
                advance(client.evaluate(request(a, b), timeout_s=args.timeout_s), a, b)
        else:
            answers = client.evaluate_many((request(a, b) for a, b in bounds), window=args.window, timeout_s=args.timeout_s)
            for (a, b), result in zip(bounds, answers, strict=True):
                advance(result, a, b)
    finally:
        bar.close()
    return _summarise(str(path), results, args, rows * positions_per_row, total_bytes, time.perf_counter() - start)


def _summarise(
    name: str, results: Sequence[EvaluateResult], args: argparse.Namespace, positions: int, nbytes: int, seconds: float
) -> Score:
    loss_sum = exact_sum([r.loss_sum for r in results])
    weight_sum = exact_sum([r.weight_sum for r in results])
    counted = sum(int(r.counted) for r in results)
    mean = loss_sum / weight_sum if weight_sum else math.nan
    perplexity = None
    if args.loss != layout.BCE_WITH_LOGITS:
        perplexity = exp(mean)  # nan without weight (mean is nan)
    per_element = [np.asarray(r.loss) for r in results] if args.reduction == "none" else []
    return Score(
        name,
        loss_sum if args.reduction == "sum" else mean,
        loss_sum,
        weight_sum,
        counted,
        perplexity,
        positions,
        nbytes,
        len(results),
        seconds,
        per_element,
    )


def total(scores: Sequence[Score], args: argparse.Namespace) -> Score:
    loss_sum = exact_sum([s.loss_sum for s in scores])
    weight_sum = exact_sum([s.weight_sum for s in scores])
    mean = loss_sum / weight_sum if weight_sum else math.nan
    perplexity = None
    if args.loss != layout.BCE_WITH_LOGITS:
        perplexity = exp(mean)  # nan without weight (mean is nan)
    return Score(
        "total", loss_sum if args.reduction == "sum" else mean, loss_sum, weight_sum, sum(s.counted for s in scores), perplexity,
        sum(s.positions for s in scores), sum(s.bytes for s in scores), sum(s.requests for s in scores), sum(s.seconds for s in scores),
    )  # fmt: skip


def table(scores: Sequence[Score], reduction: str) -> str:
    loss_title = "loss (sum)" if reduction == "sum" else "loss (mean)"
    head = ("file", loss_title, "counted", "perplexity", "rows", "MB", "MB/s")
    rows = [head]
    for s in scores:
        ppl = "-" if s.perplexity is None else f"{s.perplexity:.6g}"
        rate = s.bytes / 2**20 / s.seconds if s.seconds > 0 else math.inf
        rows.append((s.file, f"{s.loss:.8g}", str(s.counted), ppl, str(s.positions), f"{s.bytes / 2**20:.1f}", f"{rate:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _progress_factory(enabled: bool):
    class Quiet:
        n = 0

        def __init__(self, total: int = 0, desc: str = "") -> None:
            self.n = 0

        def update(self, k: int) -> None:
            self.n += k

        def set_postfix_str(self, *_: Any, **__: Any) -> None:
            pass

        def close(self) -> None:
            pass

    if not enabled:
        return Quiet
    try:
        from tqdm import tqdm
    except ImportError:
        print("lossd-client: no progress bar (pip install tqdm)", file=sys.stderr)
        return Quiet

    def make(total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, dynamic_ncols=True)

    return make


# --------------------------------------------------------------------------- commands
def _client(args: argparse.Namespace) -> LossClient:
    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        raise CliError("--tls-cert-file and --tls-key-file go together")
    root_certificates = read_pem(args.tls_ca_file, "--tls-ca-file", "CERTIFICATE")
    private_key = read_pem(args.tls_key_file, "--tls-key-file", "PRIVATE KEY")
    certificate_chain = read_pem(args.tls_cert_file, "--tls-cert-file", "CERTIFICATE")
    try:
        return LossClient(
            args.target,
            timeout_s=args.timeout_s,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from None


def cmd_health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service, timeout_s=args.timeout_s or 5.0)
    print(status)
    return EXIT_OK if status == "SERVING" else EXIT_FAILED


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.server_info(timeout_s=args.timeout_s or 30.0)
    data = asdict(info)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            shown = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            print(f"{key.ljust(width)}  {shown}")
    return EXIT_OK


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def timeout_seconds(text: str) -> float:
    """argparse type of --timeout-s: a finite number of seconds > 0, at most MAX_TIMEOUT_S (gRPC's
    deadlines); nan, inf, -1 or 1e10 failed every call at once with only "Deadline Exceeded"."""
    value = float(text)
    if not 0 < value <= MAX_TIMEOUT_S:  # nan compares false
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds > 0 and <= {int(MAX_TIMEOUT_S)}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def check_output(path: str | None, option: str = "--output") -> None:
    """Before any work: ``path``'s folder exists and may be written (CliError otherwise)."""
    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise CliError(f"{option} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"{option} {path}: folder {folder} is not writable")


def save_output(save: Callable[[], None], path: str, option: str = "--output") -> None:
    """``save()``, a file system failure as a CliError naming the file."""
    try:
        save()
    except OSError as exc:
        raise CliError(f"{option} {path}: {exc.strerror or exc}") from None


def cmd_score(args: argparse.Namespace) -> int:
    if args.output and args.reduction != "none":
        raise CliError("--output saves per-element losses: use it with --reduction none")
    check_output(args.output)
    progress = _progress_factory(not args.no_progress)
    scores = []
    with _client(args) as client:
        for name in args.files:
            scores.append(score_file(client, Path(name), args, progress))
    overall = total(scores, args) if len(scores) > 1 else None
    if args.output:
        losses = np.concatenate([e.reshape(-1) for s in scores for e in s.per_element])
        save_output(lambda: np.save(args.output, losses), args.output)
    if args.json:

        def as_dict(s: Score) -> dict[str, Any]:
            d = asdict(s)
            d.pop("per_element")
            return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

        doc: dict[str, Any] = {"loss": args.loss, "reduction": args.reduction, "files": [as_dict(s) for s in scores]}
        doc["total"] = as_dict(overall or scores[0])
        print(json.dumps(doc, indent=2))
    else:
        print(table(scores + ([overall] if overall else []), args.reduction))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lossd-client", description="Talk to a lossd server: health, info, score or compare saved logits.")
    p.add_argument("--target", default=os.environ.get("LOSSD_TARGET", "127.0.0.1:50051"),
                   help="host:port, dns:///name:port, or comma-separated addresses (round robin) [env LOSSD_TARGET; default %(default)s]")  # fmt: skip
    p.add_argument("--timeout-s", type=timeout_seconds, default=None,
                   help=f"per-call deadline in seconds, at most {int(MAX_TIMEOUT_S)} (health: 5 s, info: 30 s when unset)")  # fmt: skip
    p.add_argument("--tls-ca-file", help="PEM root certificates: use TLS and trust servers they signed")
    p.add_argument("--tls-cert-file", help="PEM client certificate chain (mTLS)")
    p.add_argument("--tls-key-file", help="PEM client private key (mTLS)")
    sub = p.add_subparsers(dest="command", required=True)

    health = sub.add_parser("health", help="exit 0 iff the server reports SERVING (container HEALTHCHECK)")
    health.add_argument("--service", default="", help="health service name ('' = the whole server)")
    health.set_defaults(run=cmd_health)

    info = sub.add_parser("info", help="server version, device and limits")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=cmd_info)

    score = sub.add_parser("score", help="score saved logits and targets (.npz, .safetensors, .pt)")
    score.add_argument("files", nargs="+", metavar="FILE")
    score.add_argument("--loss", choices=LOSSES, default="cross_entropy")
    score.add_argument("--class-axis", type=int, default=None, help="axis of the classes (torch: 1; -1 for (B, T, V) logits)")
    score.add_argument("--shift", action="store_true", help="causal LM: logits[..., :-1, :] scored against target[..., 1:]")
    score.add_argument("--ignore-index", type=int, default=-100)
    score.add_argument("--reduction", choices=("mean", "sum", "none"), default="mean", help="none: per-element losses go to --output")
    score.add_argument("--output", help="with --reduction none: save per-element losses (.npy), in file and row order")
    score.add_argument("--logits-key", help=f"array name of the logits (default: first of {', '.join(LOGITS_KEYS)})")
    score.add_argument("--target-key", help=f"array name of the targets (default: first of {', '.join(TARGET_KEYS)})")
    score.add_argument(
        "--batch-mb", type=positive_float, default=8.0, help="split inputs along their first axis into requests of about this size"
    )
    score.add_argument("--window", type=positive_int, default=8, help="requests in flight")
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    score.set_defaults(run=cmd_score)

    from .cli_compare import add_parser  # the compare command lives in its own module (it imports this one)

    add_parser(sub)
    return p


def _tls_hint(args: argparse.Namespace, exc: LossdError) -> str:
    """A hint for a connection the server closed as it was made, of which gRPC says only "Socket
    closed": a plaintext client to a TLS server, or a TLS client without the client certificate an
    mTLS server requires, or with one it does not accept. Anything that accepts and closes (not a
    lossd server, one out of connections) says the same, so the hint names TLS as a possibility only."""
    closed = (
        isinstance(exc, UnavailableError) and "connections to all backends failing" in exc.details and exc.details.endswith("Socket closed")
    )
    if not closed:
        return ""
    if args.tls_ca_file is None:
        return " (the server closed the connection as it was made: if it uses TLS, give --tls-ca-file)"
    if args.tls_cert_file is None:
        return " (the server closed the connection as it was made: if it requires client certificates (mTLS), give --tls-cert-file and --tls-key-file)"
    return " (the server closed the connection as it was made: if it requires client certificates (mTLS), it may not accept this --tls-cert-file)"


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if "," in args.target and not args.target.startswith(("dns:", "ipv4:", "ipv6:")):
        args.target = [a.strip() for a in args.target.split(",") if a.strip()]
    try:
        return args.run(args)
    except CliError as exc:
        print(f"lossd-client: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    except LossdError as exc:
        print(f"lossd-client {args.command}: {exc.code.name}: {exc.details}{_tls_hint(args, exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # `python -m lossd_client.cli`: run the imported module's main, so that the commands defined in
    # other modules (lossd_client.cli_compare) raise the exceptions this main catches
    from lossd_client.cli import main as imported_main

    sys.exit(imported_main())
