"""The directory of prometheus-client's multiprocess files under ``--workers N`` (no grpc, no torch).

The supervisor creates it at start and removes it at exit. A supervisor that cannot remove it (killed
by SIGKILL, or by a signal lossd does not handle, such as SIGQUIT) leaves it behind in the temporary
directory, so each supervisor first removes those left by others: a directory is named after the
supervisor's pid and holds files named after each worker's pid, and it goes once all of them have
exited (a worker outlives a killed supervisor while it drains).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile

log = logging.getLogger("lossd")

PREFIX = "lossd-metrics-"
#: ``lossd-metrics-<supervisor pid>-<random>``: the random part of :func:`tempfile.mkdtemp` has no dash.
_NAME = re.compile(re.escape(PREFIX) + r"(\d+)-\w+")
#: prometheus-client's file of one process: ``counter_<pid>.db``, ``gauge_livesum_<pid>.db``, ...
_FILE_PID = re.compile(r"_(\d+)\.db")


def create(parent: str | None = None) -> str:
    """A fresh directory named after this process, once those left by dead supervisors are removed."""
    remove_stale(parent)
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent)


def remove_stale(parent: str | None = None) -> list[str]:
    """Remove this user's directories in ``parent`` (the temporary directory) whose supervisor and
    workers have all exited; the paths removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for entry in os.scandir(parent):
        match = _NAME.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_uid != os.getuid():
            continue
        try:
            pids = {int(match.group(1)), *(int(m.group(1)) for name in os.listdir(entry.path) if (m := _FILE_PID.search(name)))}
        except OSError:
            continue
        if not any(_alive(pid) for pid in pids):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    if removed:
        log.info("removed %d metrics directories left by supervisors that were killed: %s", len(removed), ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: an exited process not reaped yet (a zombie) does not."""
    if not os.path.isdir("/proc/self"):  # no procfs: signal 0 (which a zombie answers too)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        return True
