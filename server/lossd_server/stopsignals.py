"""The signals that stop lossd, in every process of it (no grpc and no torch here).

SIGTERM (systemd, Kubernetes, ``docker stop``), SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH
session that started the server went away) all start the drain; a second one skips what is left
of it. SIGHUP ignored on entry (``nohup lossd-server``) stays ignored: whoever started the server
asked it to outlive its terminal.
"""

from __future__ import annotations

import signal

#: Every signal lossd may take as a stop request.
ALL = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals to handle as a stop request: :data:`ALL`, less SIGHUP while it is ignored."""
    return tuple(sig for sig in ALL if sig != signal.SIGHUP or signal.getsignal(sig) != signal.SIG_IGN)
