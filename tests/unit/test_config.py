"""The server's one typed config: every setting is a flag, an environment variable and a README row."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from lossd_server import config
from lossd_server.config import ServerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(ServerConfig)])
def test_every_setting_has_help_and_a_readme_row(field: str) -> None:
    text = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert field in config._HELP and config._HELP[field]
    assert f"`--{field.replace('_', '-')}`" in text, f"README's Configuration table lacks --{field.replace('_', '-')}"


def test_memory_wait_from_flag_and_environment_and_validated() -> None:
    assert config.load([], environ={}).max_memory_wait_s == 60.0
    assert config.load([], environ={"LOSSD_MAX_MEMORY_WAIT_S": "2.5"}).max_memory_wait_s == 2.5
    assert config.load(["--max-memory-wait-s", "7"], environ={"LOSSD_MAX_MEMORY_WAIT_S": "2.5"}).max_memory_wait_s == 7.0
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit, match="--max-memory-wait-s must be > 0"):
            config.load(["--max-memory-wait-s", bad], environ={})


def test_connection_age_grace_from_flag_and_environment_and_validated() -> None:
    """Calls in progress on an aged-out connection get their own bound (not --grace-s, the stop's)."""
    assert config.load([], environ={}).max_connection_age_grace_s == 600.0
    env = {"LOSSD_MAX_CONNECTION_AGE_GRACE_S": "0"}
    assert config.load([], environ=env).max_connection_age_grace_s == 0.0
    assert config.load(["--max-connection-age-grace-s", "90"], environ=env).max_connection_age_grace_s == 90.0
    with pytest.raises(SystemExit, match="--max-connection-age-grace-s must be >= 0"):
        config.load(["--max-connection-age-grace-s", "-1"], environ={})
    assert "LOSSD_MAX_CONNECTION_AGE_GRACE_S" in config.parser().format_help()


def test_worker_stall_timeout_from_flag_and_environment_and_validated() -> None:
    assert config.load([], environ={}).worker_stall_timeout_s == 30.0
    env = {"LOSSD_WORKER_STALL_TIMEOUT_S": "0"}
    assert config.load([], environ=env).worker_stall_timeout_s == 0.0
    assert config.load(["--worker-stall-timeout-s", "5"], environ=env).worker_stall_timeout_s == 5.0
    for bad in ("-1", "0.001"):  # a tiny timeout would make the supervisor spin
        with pytest.raises(SystemExit, match="--worker-stall-timeout-s must be 0 \\(off\\) or at least 1"):
            config.load(["--worker-stall-timeout-s", bad], environ={})
    assert "LOSSD_WORKER_STALL_TIMEOUT_S" in config.parser().format_help()


def test_connection_idle_timeout_from_flag_and_environment_and_validated() -> None:
    """Idle connections are closed after five minutes by default (they were held for ever); 0 is off."""
    assert config.load([], environ={}).max_connection_idle_s == 300.0
    env = {"LOSSD_MAX_CONNECTION_IDLE_S": "0"}
    assert config.load([], environ=env).max_connection_idle_s == 0.0
    assert config.load(["--max-connection-idle-s", "2.5"], environ=env).max_connection_idle_s == 2.5
    with pytest.raises(SystemExit, match="--max-connection-idle-s must be >= 0"):
        config.load(["--max-connection-idle-s", "-1"], environ={})
    with pytest.raises(SystemExit, match="LOSSD_MAX_CONNECTION_IDLE_S"):
        config.load([], environ={"LOSSD_MAX_CONNECTION_IDLE_S": "soon"})
    assert "LOSSD_MAX_CONNECTION_IDLE_S" in config.parser().format_help()


def test_call_limit_from_flag_and_environment_and_validated() -> None:
    """A bound on the calls held before they read a byte, per process."""
    assert config.load([], environ={}).max_concurrent_calls == 10_000
    env = {"LOSSD_MAX_CONCURRENT_CALLS": "50"}
    assert config.load([], environ=env).max_concurrent_calls == 50
    assert config.load(["--max-concurrent-calls", "9"], environ=env).max_concurrent_calls == 9
    with pytest.raises(SystemExit, match="--max-concurrent-calls must be >= 1"):
        config.load(["--max-concurrent-calls", "0"], environ={})
