"""Raise the soft limit on open files (RLIMIT_NOFILE) to the hard limit at start-up.

Every connection holds a file. Many systems start services with a soft limit of 1024 (or lower)
under a hard limit of tens of thousands; past the soft limit accept() fails ("too many open
files") and the port is dead to everyone, health checks included, until connections close. The
soft limit is the process's own to raise up to the hard one, so lossd does, once, before it
starts any worker (workers inherit it). It never lowers a limit, and a refusal is logged and
ignored: the server then runs with the limit it was given.
"""

from __future__ import annotations

import logging

log = logging.getLogger("lossd")


def _ceiling(hard: int, unlimited: int) -> int:
    """The hard limit; when it is unlimited, the kernel's own per-process maximum (Linux)."""
    if hard != unlimited:
        return hard
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return unlimited


def raise_open_files_limit() -> tuple[int, int] | None:
    """Set the soft RLIMIT_NOFILE to the hard limit; (old, new) when it was raised, else None."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = _ceiling(hard, resource.RLIM_INFINITY)
        if soft == resource.RLIM_INFINITY or target == resource.RLIM_INFINITY or soft >= target:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("could not raise the open files limit (RLIMIT_NOFILE) to the hard limit: %s", exc)
        return None
    log.info("open files limit (RLIMIT_NOFILE) raised from %d to %d, the hard limit", soft, target)
    return soft, target
