"""The signals that stop lossd, in every process of it (no grpc and no torch here).

SIGTERM (systemd, Kubernetes, ``docker stop``), SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH
session that started the server went away) all start the drain; a second one skips what is left
of it. SIGHUP ignored on entry (``nohup lossd-server``) stays ignored: whoever started the server
asked it to outlive its terminal.

A worker of ``--workers N`` is started with them blocked (:func:`held`) and unblocks them once its
handlers are installed: a signal to the whole process group during its start (systemd's
KillMode=control-group, Ctrl-C) used to kill it by the default action while it imported torch,
and the supervisor exited 1 (or 2) instead of 0.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

#: Every signal lossd may take as a stop request.
ALL = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals to handle as a stop request: :data:`ALL`, less SIGHUP while it is ignored."""
    return tuple(sig for sig in ALL if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN)


def block() -> set[signal.Signals]:
    """Block the stop signals in this thread: one that arrives stays pending until they are
    unblocked (:func:`accept`); the mask before."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, ALL)


def accept() -> None:
    """Unblock the stop signals in this thread: those pending are delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ALL)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The stop signals blocked for the block, then as before (one that arrived meanwhile is
    delivered at its end). A process started inside the block (fork, then exec) inherits the mask:
    no stop signal reaches it until it calls :func:`accept`, once its handlers are installed."""
    previous = block()
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore() -> None:
    """Ignore the stop signals from now on: for a process that has stopped and only exits. Python's
    finalization restores the default action of the signals it handled (termination: exit status
    -15 for a late second SIGTERM instead of 0); an ignored signal it leaves ignored."""
    for sig in stop_signals():
        signal.signal(sig, signal.SIG_IGN)
