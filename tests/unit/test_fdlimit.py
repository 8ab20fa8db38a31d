"""Raising the soft open files limit: up to the hard one, never down, and a refusal is not fatal."""

from __future__ import annotations

import logging
import resource

import pytest
from lossd_server import fdlimit


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The process's RLIMIT_NOFILE as a dict the test sets; setrlimit records what it was asked."""
    state: dict = {"now": (1024, 4096), "set": [], "refuse": None}

    def getrlimit(which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return state["now"]

    def setrlimit(which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        if state["refuse"]:
            raise state["refuse"]
        state["set"].append(value)
        state["now"] = value

    monkeypatch.setattr(resource, "getrlimit", getrlimit)
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    return state


def test_the_soft_limit_is_raised_to_the_hard_one_and_logged_once(limits, caplog):
    with caplog.at_level(logging.INFO, logger="lossd"):
        assert fdlimit.raise_open_files_limit() == (1024, 4096)
        assert fdlimit.raise_open_files_limit() is None  # already there: nothing to do, nothing logged
    assert limits["set"] == [(4096, 4096)]
    assert [r.getMessage() for r in caplog.records] == ["open files limit (RLIMIT_NOFILE) raised from 1024 to 4096, the hard limit"]


@pytest.mark.parametrize("now", [(4096, 4096), (resource.RLIM_INFINITY, resource.RLIM_INFINITY), (resource.RLIM_INFINITY, 4096)])
def test_a_limit_is_never_lowered(limits, now):
    limits["now"] = now
    assert fdlimit.raise_open_files_limit() is None
    assert limits["set"] == []


def test_an_unlimited_hard_limit_raises_to_the_kernels_maximum(limits, monkeypatch):
    monkeypatch.setattr(fdlimit, "_ceiling", lambda hard, unlimited: 65536 if hard == unlimited else hard)
    limits["now"] = (1024, resource.RLIM_INFINITY)
    assert fdlimit.raise_open_files_limit() == (1024, 65536)
    assert limits["set"] == [(65536, resource.RLIM_INFINITY)]


def test_a_refusal_is_logged_and_the_server_goes_on(limits, caplog):
    limits["refuse"] = OSError(1, "Operation not permitted")
    with caplog.at_level(logging.WARNING, logger="lossd"):
        assert fdlimit.raise_open_files_limit() is None
    assert limits["now"] == (1024, 4096)
    assert "could not raise the open files limit" in caplog.text
