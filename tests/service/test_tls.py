"""TLS and mTLS with certificates the test generates, against real server processes."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lossd_client import LossClient, UnavailableError
from serverproc import start_server


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _issue(subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, *, server: bool = False, client: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return cert, key


class Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate, and an unrelated CA's client."""

    def __init__(self, directory: Path) -> None:
        ca = _issue("lossd test CA", None)
        server = _issue("lossd server", ca, server=True)
        client = _issue("lossd client", ca, client=True)
        other_ca = _issue("other CA", None)
        stranger = _issue("stranger", other_ca, client=True)
        self.ca = ca[0].public_bytes(serialization.Encoding.PEM)
        self.other_ca = other_ca[0].public_bytes(serialization.Encoding.PEM)
        self.client_cert, self.client_key = client[0].public_bytes(serialization.Encoding.PEM), _pem_key(client[1])
        self.stranger_cert, self.stranger_key = stranger[0].public_bytes(serialization.Encoding.PEM), _pem_key(stranger[1])
        self.files = {
            "ca": directory / "ca.pem",
            "cert": directory / "server.pem",
            "key": directory / "server-key.pem",
        }
        self.files["ca"].write_bytes(self.ca)
        self.files["cert"].write_bytes(server[0].public_bytes(serialization.Encoding.PEM))
        self.files["key"].write_bytes(_pem_key(server[1]))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _check_evaluation(client: LossClient) -> None:
    logits = np.random.default_rng(3).standard_normal((6, 5)).astype(np.float32)
    target = np.array([0, 4, 1, 2, 3, 4])
    got = client.cross_entropy(logits, target)
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)), F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target)))


@pytest.fixture(scope="module")
def tls_server(pki):
    proc = start_server("--drain-s", "0", "--tls-cert-file", str(pki.files["cert"]), "--tls-key-file", str(pki.files["key"]))
    yield proc
    assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def mtls_server(pki):
    proc = start_server(
        "--drain-s", "0", "--tls-cert-file", str(pki.files["cert"]), "--tls-key-file", str(pki.files["key"]), "--tls-client-ca-file", str(pki.files["ca"])
    )
    yield proc
    assert proc.stop() == 0, proc.log()


def test_tls_client_with_the_ca_is_served(tls_server, pki):
    assert "tls on" in tls_server.log()
    with LossClient(tls_server.address, timeout_s=30, root_certificates=pki.ca) as client:
        assert client.health() == "SERVING"
        _check_evaluation(client)


def test_plaintext_client_to_tls_server_fails_cleanly(tls_server):
    with LossClient(tls_server.address, timeout_s=10, retries=2) as client, pytest.raises(UnavailableError):
        client.server_info()


def test_tls_client_with_another_ca_is_refused(tls_server, pki):
    with LossClient(tls_server.address, timeout_s=10, retries=2, root_certificates=pki.other_ca) as client, pytest.raises(UnavailableError):
        client.server_info()


def test_mtls_client_with_certificate_is_served(mtls_server, pki):
    kwargs = {"root_certificates": pki.ca, "private_key": pki.client_key, "certificate_chain": pki.client_cert}
    with LossClient(mtls_server.address, timeout_s=30, **kwargs) as client:
        assert client.health() == "SERVING"
        _check_evaluation(client)


def test_mtls_client_without_certificate_is_refused(mtls_server, pki):
    with LossClient(mtls_server.address, timeout_s=10, retries=2, root_certificates=pki.ca) as client, pytest.raises(UnavailableError):
        client.server_info()


def test_mtls_client_with_certificate_from_another_ca_is_refused(mtls_server, pki):
    kwargs = {"root_certificates": pki.ca, "private_key": pki.stranger_key, "certificate_chain": pki.stranger_cert}
    with LossClient(mtls_server.address, timeout_s=10, retries=2, **kwargs) as client, pytest.raises(UnavailableError):
        client.server_info()


def test_client_ca_without_server_certificate_is_a_config_error(pki):
    done = subprocess.run(
        [sys.executable, "-m", "lossd_server", "--port", "0", "--metrics-port", "0", "--tls-client-ca-file", str(pki.files["ca"])],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--tls-client-ca-file needs --tls-cert-file" in done.stderr


#: Under this address space a file read without bound ends in MemoryError instead of the machine's memory.
_AS_LIMIT = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"


def _tls_file(kind: str, directory: Path, pki: Pki) -> str:
    """A path that is no TLS file lossd may read: a device, a named pipe, a PEM file past MAX_PEM_BYTES."""
    import os

    if kind == "device":
        return "/dev/zero"
    if kind == "fifo":
        path = directory / "fifo.pem"
        os.mkfifo(path)
        return str(path)
    path = directory / "huge.pem"
    path.write_bytes(pki.ca * (2 * 1024 * 1024 // len(pki.ca) + 1))  # valid PEM, 2 MiB: read whole, it was accepted
    return str(path)


@pytest.mark.parametrize(
    ("option", "kind", "reason"),
    [
        ("--tls-cert-file", "device", "not a regular file: a character device"),  # read until memory ran out
        ("--tls-key-file", "fifo", "not a regular file: a named pipe"),  # the start hung for ever
        ("--tls-client-ca-file", "fifo", "not a regular file: a named pipe"),
        ("--tls-client-ca-file", "huge", "larger than 1048576 bytes"),
    ],
)
def test_a_tls_file_that_is_no_small_regular_file_stops_the_start_with_one_line(pki, tmp_path, option, kind, reason):
    files = {"--tls-cert-file": str(pki.files["cert"]), "--tls-key-file": str(pki.files["key"]), option: _tls_file(kind, tmp_path, pki)}
    flags = [part for pair in files.items() for part in pair]
    code = f"{_AS_LIMIT}\nimport sys\nfrom lossd_server.__main__ import main\nsys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lossd-server: error: {option} {files[option]}: cannot read it ({reason}"), done.stderr


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lossd_client.cli", *args], capture_output=True, text=True, timeout=120)


def test_the_cli_names_tls_as_a_possible_cause_of_a_connection_closed_as_it_was_made(tls_server, mtls_server, pki):
    """A plaintext client to a TLS server and a TLS client without a client certificate to an mTLS
    one said only 'UNAVAILABLE ... Socket closed'; gRPC says the same of anything that accepts and
    closes, so the CLI adds TLS as a possibility, with the options that would supply it."""
    plain = _cli("--target", tls_server.address, "--timeout-s", "30", "health")
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.rstrip().endswith("Socket closed (the server closed the connection as it was made: if it uses TLS, give --tls-ca-file)")
    no_cert = _cli("--target", mtls_server.address, "--timeout-s", "30", "--tls-ca-file", str(pki.files["ca"]), "info")
    assert no_cert.returncode == 1, no_cert.stderr
    assert no_cert.stderr.rstrip().endswith("give --tls-cert-file and --tls-key-file)"), no_cert.stderr
    served = _cli("--target", tls_server.address, "--timeout-s", "30", "--tls-ca-file", str(pki.files["ca"]), "health")
    assert (served.returncode, served.stdout.strip(), served.stderr) == (0, "SERVING", "")
