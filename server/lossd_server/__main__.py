"""`lossd-server` / `python -m lossd_server`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Iterator, Sequence

from . import config as config_mod
from .stopsignals import stop_signals


class StoppedBeforeServing(BaseException):
    """SIGTERM/SIGINT/SIGHUP arrived while starting (importing torch takes about a second),
    before the server's own handlers were installed: nothing was served, so nothing can be lost."""


_deferring = False
_deferred: list[str] = []


def _stop_while_starting(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if _deferring:
        _deferred.append(name)
        return
    raise StoppedBeforeServing(name)


@contextlib.contextmanager
def _stops_deferred() -> Iterator[None]:
    """Hold a stop request until the block is over. Importing torch runs Python code called from
    C++: an exception a signal handler raises there cannot unwind through pybind11, which aborts
    the process (SIGTERM 0.0 s after the start: exit status -6, "terminate called after throwing
    an instance of 'pybind11::error_already_set'", 1 run in 20 under load)."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False
    if _deferred:
        raise StoppedBeforeServing(_deferred[0])


def main(argv: Sequence[str] | None = None) -> int:
    # Until serve() (or the worker supervisor) installs its own handlers, a stop request ends the
    # start with exit status 0, as a stop while serving does, instead of death by signal.
    for sig in stop_signals():
        signal.signal(sig, _stop_while_starting)
    try:
        return _main(argv)
    except StoppedBeforeServing as stop:
        print(f"lossd-server: {stop} while starting: stopped before serving", file=sys.stderr)
        return 0


def _main(argv: Sequence[str] | None) -> int:
    try:
        cfg = config_mod.load(argv)
    except SystemExit as exc:
        if not isinstance(exc.code, str):  # argparse (--help, a flag's type) has said it already
            raise
        print(f"lossd-server: error: {exc.code}", file=sys.stderr)  # a setting out of its range: as argparse's errors
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with _stops_deferred():
        from .fdlimit import raise_open_files_limit
        from .ports import StartupError

    raise_open_files_limit()  # before any worker starts: workers inherit it

    try:
        if cfg.workers > 1:  # a supervisor of worker processes: no grpc, no torch in this process
            with _stops_deferred():
                from . import workers

            return workers.serve(cfg)  # stopped, it leaves the stop signals ignored (see stopsignals.ignore)
        with _stops_deferred():
            from . import allocator
            from .app import serve

        allocator.tune()
        asyncio.run(serve(cfg))
    except StartupError as exc:
        print(f"lossd-server: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The ``lossd-server`` command: :func:`main`, then the process ends without the interpreter's
    teardown (see :mod:`lossd_server.process_exit`). ``main`` stays a function that returns, for callers
    in-process."""
    code = main()
    from .process_exit import exit_now

    exit_now(code)


if __name__ == "__main__":
    run()
