"""The start-up stop rule of ``python -m lossd_server``: a stop request while torch is imported is
held until the import is over (an exception raised inside it can abort the process)."""

from __future__ import annotations

import signal

import pytest
from lossd_server import __main__ as entry
from lossd_server.stopsignals import stop_signals


def test_a_stop_during_a_deferred_block_is_raised_when_the_block_ends():
    entry._deferred.clear()
    done = []
    with pytest.raises(entry.StoppedBeforeServing, match="SIGTERM"):
        with entry._stops_deferred():
            entry._stop_while_starting(signal.SIGTERM, None)  # as the handler runs mid-import
            done.append("the rest of the block ran")
    assert done and not entry._deferring
    entry._deferred.clear()


def test_a_stop_outside_a_deferred_block_is_raised_at_once():
    with pytest.raises(entry.StoppedBeforeServing, match="SIGINT"):
        entry._stop_while_starting(signal.SIGINT, None)
    with entry._stops_deferred():
        pass  # nothing deferred: nothing raised


def test_a_sighup_ignored_on_entry_stays_ignored():
    """``nohup lossd-server``: SIGHUP is no stop request (whoever started it asked it to outlive its terminal)."""
    assert signal.SIGHUP in stop_signals()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert stop_signals() == (signal.SIGTERM, signal.SIGINT)
    finally:
        signal.signal(signal.SIGHUP, previous)
