"""Start-up errors that only the running machine can tell (a device, an address): one line naming the real cause."""

from __future__ import annotations

import errno
import socket

import pytest
from lossd_server import app, ports
from lossd_server.config import ServerConfig
from lossd_server.ports import StartupError


@pytest.mark.parametrize("name", ["cuda:99", "tpu"])
def test_a_device_this_machine_lacks_is_a_startup_error_naming_the_setting(name):
    """A SystemExit (or torch's RuntimeError) here killed a --workers N worker without telling the supervisor why."""
    with pytest.raises(StartupError, match=r"^--device / LOSSD_DEVICE "):
        app.resolve_device(name)
    assert app.resolve_device("cpu").type == "cpu"


def test_an_unresolvable_or_foreign_metrics_host_is_named_as_the_host():
    """It was reported as a port problem ("choose another --metrics-port")."""
    unknown = ports.metrics_port_error("bogus.invalid", -1, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert "cannot resolve bogus.invalid" in str(unknown) and "--metrics-host / LOSSD_METRICS_HOST" in str(unknown)
    assert "--metrics-port" not in str(unknown)
    foreign = ports.metrics_port_error("192.0.2.1", 9464, OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"))
    assert "192.0.2.1 is not an address of this machine" in str(foreign) and "--metrics-host" in str(foreign)
    taken = ports.metrics_port_error("127.0.0.1", 9464, OSError(errno.EADDRINUSE, "Address already in use"))
    assert "choose another --metrics-port" in str(taken)


def test_a_host_that_is_not_local_is_named_as_the_host_with_port_0_too():
    with pytest.raises(StartupError, match=r"192\.0\.2\.1 is not an address of this machine; choose another --host / LOSSD_HOST"):
        ports.check_bindable("192.0.2.1", 0)


def test_a_host_label_over_63_characters_is_a_startup_error_not_a_unicode_error():
    """The IDNA codec raises UnicodeError (no OSError) before the name is looked up: a traceback, exit status 1."""
    with pytest.raises(StartupError, match=r"^cannot resolve --host a{64}\.example: label"):
        ports.check_bindable("a" * 64 + ".example", 0)


def test_a_tls_port_gRPC_refuses_points_to_the_tls_files():
    """Every failure of add_secure_port was reported as a port in use, also when gRPC refused the key."""
    tls = ServerConfig(tls_cert_file="server.pem", tls_key_file="key.pem")
    message = str(app._listen_error(tls, tls=True))
    assert "gRPC refused the certificate chain or private key" in message and "--tls-cert-file server.pem" in message
    assert "port is in use" in str(app._listen_error(ServerConfig(), tls=False))
