"""`lossd-server` / `python -m lossd_server`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from . import config as config_mod


class StoppedBeforeServing(BaseException):
    """SIGTERM/SIGINT arrived while starting (importing torch takes about a second), before the
    server's own handlers were installed: nothing was served, so nothing can be lost."""


def _stop_while_starting(signum: int, frame: object) -> None:
    raise StoppedBeforeServing(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    # Until serve() (or the worker supervisor) installs its own handlers, a stop request ends the
    # start with exit status 0, as a stop while serving does, instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_while_starting)
    try:
        return _main(argv)
    except StoppedBeforeServing as stop:
        print(f"lossd-server: {stop} while starting: stopped before serving", file=sys.stderr)
        return 0


def _main(argv: Sequence[str] | None) -> int:
    cfg = config_mod.load(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from .ports import StartupError

    try:
        if cfg.workers > 1:  # a supervisor of worker processes: no grpc, no torch in this process
            from . import workers

            return workers.serve(cfg)
        from . import allocator
        from .app import serve

        allocator.tune()
        asyncio.run(serve(cfg))
    except StartupError as exc:
        print(f"lossd-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
