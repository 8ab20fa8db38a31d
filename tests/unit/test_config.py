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


def test_handshake_timeout_from_flag_and_environment_and_validated() -> None:
    """A connection that has not started HTTP/2 is closed after 10 s by default (gRPC's: 60 s); the
    setting is above 0 and within gRPC's int32 milliseconds."""
    assert config.load([], environ={}).handshake_timeout_s == 10.0
    env = {"LOSSD_HANDSHAKE_TIMEOUT_S": "30"}
    assert config.load([], environ=env).handshake_timeout_s == 30.0
    assert config.load(["--handshake-timeout-s", "2.5"], environ=env).handshake_timeout_s == 2.5
    for bad in ("0", "-1", "inf", "nan", "2147484"):
        with pytest.raises(SystemExit, match="--handshake-timeout-s"):
            config.load(["--handshake-timeout-s", bad], environ={})
    assert "LOSSD_HANDSHAKE_TIMEOUT_S" in config.parser().format_help()


def test_call_limit_from_flag_and_environment_and_validated() -> None:
    """A bound on the calls held before they read a byte, per process."""
    assert config.load([], environ={}).max_concurrent_calls == 10_000
    env = {"LOSSD_MAX_CONCURRENT_CALLS": "50"}
    assert config.load([], environ=env).max_concurrent_calls == 50
    assert config.load(["--max-concurrent-calls", "9"], environ=env).max_concurrent_calls == 9
    with pytest.raises(SystemExit, match="--max-concurrent-calls must be >= 1"):
        config.load(["--max-concurrent-calls", "0"], environ={})


# Values that were accepted (and then ignored, half-applied or crashed the start with a traceback):
# every one is refused at load, with one line naming the flag, or the variable it came from.
BAD_VALUES = [
    ("drain_s", "nan"),
    ("grace_s", "nan"),
    ("grace_s", "inf"),
    ("stream_idle_timeout_s", "nan"),
    ("max_memory_wait_s", "nan"),
    ("worker_stall_timeout_s", "nan"),
    ("worker_stall_timeout_s", "inf"),
    ("max_wait_ms", "nan"),
    ("max_wait_ms", "1e309"),
    ("idle_read_yield_s", "nan"),
    ("max_connection_age_s", "nan"),
    ("max_connection_age_grace_s", "inf"),
    ("max_connection_idle_s", "inf"),
    ("max_connection_idle_s", "1e306"),
    # the supervisor's poll() takes a quarter of it in int32 milliseconds: 1e7 crashed it at the start
    ("worker_stall_timeout_s", "1e7"),
    ("worker_stall_timeout_s", "2147483.648"),
    ("worker_stall_timeout_s", "1e308"),
    # each worker is a torch interpreter: 3000 passed the checks and the supervisor set out to start them
    ("workers", "257"),
    ("workers", "3000"),
    ("max_batch_rows", "0"),
    ("max_batch_rows", "-5"),
    ("max_batch_bytes", "0"),
    ("max_batch_bytes", "-1"),
    ("max_queue_bytes", "0"),
    ("max_queue_bytes", "-1"),
    ("chunk_bytes", "0"),
    ("chunk_bytes", "-1"),
    ("inline_batch_bytes", "-1"),
    ("torch_threads", "-3"),
    ("torch_threads", "100000"),
    ("compute_threads", "100000"),
    ("max_top_k", "100000000000"),
    ("max_concurrent_calls", "99999999999"),
    ("transport_window_bytes", "99999999999"),
    ("max_message_bytes", "99999999999"),
    # past int64, which GetServerInfo's fields hold (it answered UNKNOWN "Value out of range")
    ("max_id_bytes", "99999999999999999999"),
    ("max_broadcast_elements", str(2**63)),
    ("max_batch_rows", str(2**63)),
    ("max_batch_bytes", str(2**64)),
    ("max_queue_requests", str(2**63)),
    ("max_queue_bytes", str(2**63)),
    ("log_level", "LOUD"),
    ("log_level", "5"),
    ("device", "tpu"),
    ("device", "cuda:x"),
]


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_a_bad_value_is_refused_at_load_naming_the_setting_and_its_range(field: str, value: str, source: str) -> None:
    flag, env = "--" + field.replace("_", "-"), "LOSSD_" + field.upper()
    argv, environ = ([flag, value], {}) if source == "flag" else ([], {env: value})
    with pytest.raises(SystemExit) as refused:
        config.load(argv, environ=environ)
    message = str(refused.value)
    named = flag if source == "flag" else f"{env} ({flag})"
    assert message.startswith(f"{named} must be "), message
    parsed = config._converter(next(f for f in dataclasses.fields(ServerConfig) if f.name == field))(value)
    assert message.endswith(f", got {parsed!r}"), message
    assert "\n" not in message


def test_every_numeric_setting_has_bounds_and_every_named_one_its_choices() -> None:
    """A setting added to ServerConfig is checked at load too: a number gets a row in BOUNDS."""
    for f in dataclasses.fields(ServerConfig):
        if isinstance(getattr(ServerConfig(), f.name), int | float) and not isinstance(getattr(ServerConfig(), f.name), bool):
            assert f.name in config.BOUNDS, f"{f.name} has no bounds"
    assert set(config.CHOICES) <= {f.name for f in dataclasses.fields(ServerConfig)}


@pytest.mark.parametrize(
    "argv",
    [
        ["--worker-stall-timeout-s", "0"],
        ["--idle-read-yield-s", "0"],
        ["--max-wait-ms", "0"],
        ["--inline-batch-bytes", "0"],
        ["--torch-threads", "0"],
        ["--max-top-k", "0"],
        ["--max-connection-age-s", "0", "--max-connection-age-grace-s", "0", "--max-connection-idle-s", "0"],
        ["--max-connection-idle-s", "2147483.647"],
        ["--worker-stall-timeout-s", "2147483.647"],
        ["--workers", "256", "--memory-budget-bytes", str(2**50)],
        ["--max-concurrent-calls", str(2**31 - 1)],
        ["--cuda-memory-fraction", "1"],
        ["--metrics-port", "-1"],
        ["--max-batch-rows", "1", "--max-batch-bytes", "1", "--max-queue-bytes", "1", "--chunk-bytes", "1"],
        ["--log-level", "debug"],
        ["--device", "cuda:3"],  # valid spelling: whether this machine has it is a start-up matter
    ],
)
def test_the_documented_special_and_edge_values_are_accepted(argv: list[str]) -> None:
    config.load(argv, environ={})


@pytest.mark.parametrize(
    ("env", "value"), [("LOSSD_MALLOC_ARENA_MAX", "abc"), ("LOSSD_MALLOC_ARENA_MAX", "-1"), ("LOSSD_MALLOC_MMAP_THRESHOLD", "-5")]
)
def test_the_allocator_variables_are_checked_at_load(env: str, value: str) -> None:
    with pytest.raises(SystemExit, match=f"^{env} must be an integer >= 0"):
        config.load([], environ={env: value})
    assert config.load([], environ={env: "0"}).workers == 1


def _self_signed(directory, name: str) -> tuple[str, str]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def test_tls_files_are_checked_at_load(tmp_path) -> None:
    """Missing files were a FileNotFoundError traceback; files that are no PEM were reported as a port in use."""
    cert, key = _self_signed(tmp_path, "a")
    other_cert, other_key = _self_signed(tmp_path, "b")
    text = tmp_path / "hostname"
    text.write_text("not-a-certificate\n")
    assert (
        config.load(["--tls-cert-file", cert, "--tls-key-file", key, "--tls-client-ca-file", other_cert], environ={}).tls_cert_file == cert
    )
    refused = {
        "--tls-cert-file /nonexistent: cannot read it": ["--tls-cert-file", "/nonexistent", "--tls-key-file", "/nonexistent"],
        f"--tls-cert-file {text}: not a PEM file with a certificate": ["--tls-cert-file", str(text), "--tls-key-file", str(text)],
        f"--tls-key-file {text}: not a PEM file with a private key": ["--tls-cert-file", cert, "--tls-key-file", str(text)],
        f"--tls-key-file {other_key} is not the (unencrypted) private key of the certificate in --tls-cert-file {cert}": [
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            other_key,
        ],  # fmt: skip
        f"--tls-client-ca-file {key}: not a PEM file with a certificate": [
            "--tls-cert-file",
            cert,
            "--tls-key-file",
            key,
            "--tls-client-ca-file",
            key,
        ],
    }
    for message, argv in refused.items():
        with pytest.raises(SystemExit) as error:
            config.load(argv, environ={})
        assert str(error.value).startswith(message), (message, str(error.value))
    with pytest.raises(SystemExit, match=r"^LOSSD_TLS_KEY_FILE \(--tls-key-file\) /nonexistent: cannot read it"):
        config.load(["--tls-cert-file", cert], environ={"LOSSD_TLS_KEY_FILE": "/nonexistent"})


@pytest.mark.parametrize("field", ["host", "metrics_host"])
@pytest.mark.parametrize("value", ["a" * 64 + ".example", "a" * 300, "a..b", "\udcff"])
def test_a_host_name_the_resolver_cannot_be_asked_for_is_refused_at_load_naming_the_setting(field: str, value: str) -> None:
    """A label over 63 characters was a UnicodeError traceback from the IDNA codec, deep in the start (exit status 1)."""
    flag, env = "--" + field.replace("_", "-"), "LOSSD_" + field.upper()
    for argv, environ, named in (([flag, value], {}, flag), ([], {env: value}, f"{env} ({flag})")):
        with pytest.raises(SystemExit) as refused:
            config.load(argv, environ=environ)
        message = str(refused.value)
        assert message.startswith(f"{named} must be an IP address or a host name whose labels (between dots) have 1 to 63 characters, got ")
        assert "\n" not in message and len(message) < 300, message


@pytest.mark.parametrize("value", ["127.0.0.1", "::1", "[::1]", "0.0.0.0", "localhost", "a" * 63 + ".example.", "bücher.example"])
def test_addresses_and_host_names_within_the_rules_are_accepted(value: str) -> None:
    assert config.load(["--host", value, "--metrics-host", value], environ={}).host == value


def test_tls_files_are_read_only_when_regular_and_at_most_max_pem_bytes(tmp_path) -> None:
    """A TLS file was read whole, whatever it was: /dev/zero until memory ran out, a named pipe for ever."""
    import os

    cert, key = _self_signed(tmp_path, "a")
    huge = tmp_path / "huge.pem"
    huge.write_bytes(Path(cert).read_bytes() * (config.MAX_PEM_BYTES // len(Path(cert).read_bytes()) + 1))
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo)
    assert config.read_pem_file(cert) == Path(cert).read_bytes()
    refused = {
        f"--tls-cert-file {huge}: cannot read it (larger than {config.MAX_PEM_BYTES} bytes": [huge, key],
        f"--tls-key-file {fifo}: cannot read it (not a regular file: a named pipe)": [cert, fifo],
        f"--tls-key-file {tmp_path}: cannot read it (Is a directory)": [cert, tmp_path],  # as before
    }
    for message, (cert_file, key_file) in refused.items():
        with pytest.raises(SystemExit) as error:
            config.load(["--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)], environ={})
        assert str(error.value).startswith(message), (message, str(error.value))
