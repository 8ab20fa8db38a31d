"""Keep the server's resident memory close to what it is using (glibc malloc tuning).

A request streamed through EvaluateChunked passes multi-megabyte buffers between threads: gRPC's
threads receive the messages, the event loop copies them into Python bytes, the engine thread
upcasts and evaluates them. With glibc's defaults (one arena per contending thread, and an mmap
threshold that rises to 32 MiB once large blocks are freed) those buffers end up in thread heaps
that are not reused by the other threads nor returned: a 256 MB bf16 request grew the server's
peak resident set by 1.6-1.9x its size (tests/test_memory.py). One arena and a fixed 1 MiB mmap
threshold (every buffer of a megabyte or more is its own mapping, unmapped when freed) keep the
growth to a few chunks (0.2x measured). ``LOSSD_MALLOC_ARENA_MAX`` and
``LOSSD_MALLOC_MMAP_THRESHOLD`` change them; 0 leaves glibc's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("lossd.allocator")

_M_ARENA_MAX = -8
_M_MMAP_THRESHOLD = -3
DEFAULT_ARENA_MAX = 1
DEFAULT_MMAP_THRESHOLD = 1024 * 1024


def tune(arena_max: int | None = None, mmap_threshold: int | None = None) -> bool:
    """Limit glibc's malloc arenas and/or fix its mmap threshold; call before threads start.

    ``LOSSD_MALLOC_ARENA_MAX`` / ``LOSSD_MALLOC_MMAP_THRESHOLD`` override the defaults; 0 leaves
    glibc's own behaviour. False where nothing was changed.
    """
    if arena_max is None:
        arena_max = int(os.environ.get("LOSSD_MALLOC_ARENA_MAX", DEFAULT_ARENA_MAX))
    if mmap_threshold is None:
        mmap_threshold = int(os.environ.get("LOSSD_MALLOC_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    changed = False
    for option, value in ((_M_ARENA_MAX, arena_max), (_M_MMAP_THRESHOLD, mmap_threshold)):
        if value > 0:
            if mallopt(option, value):
                changed = True
            else:
                log.warning("mallopt(%d, %d) was refused", option, value)
    return changed
