"""The gRPC port before any gRPC object exists: is it free, and holding it for worker processes.

No grpc and no torch here: the supervisor of ``--workers N`` (:mod:`lossd_server.workers`) uses
this module before it starts any worker, and the single-process server (:mod:`lossd_server.app`)
checks its port with it before gRPC tries (gRPC would log its own multi-line error first).
"""

from __future__ import annotations

import errno
import socket


class StartupError(Exception):
    """The server cannot start (a port in use, ...); the message is one line for the operator."""


def _addresses(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise StartupError(f"cannot resolve --host {host}: {exc}") from None
    except UnicodeError as exc:  # the IDNA codec: a label over 63 characters (config.validate refuses it first)
        raise StartupError(f"cannot resolve --host {host}: {exc.__cause__ or exc}") from None


def _host_error(host: str, exc: OSError) -> str | None:
    """What to say when the host, not the port, is what cannot be bound (None: the port is)."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine"
    return None


def _in_use(host: str, port: int, exc: OSError) -> StartupError:
    problem = _host_error(host, exc)
    if problem is not None:
        return StartupError(f"cannot listen on {host}:{port} ({exc.strerror}): {problem}; choose another --host / LOSSD_HOST")
    return StartupError(f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port / LOSSD_PORT (0 lets the OS pick)")


def metrics_port_error(host: str, port: int, exc: OSError) -> StartupError:
    """The start-up error for a /metrics address that cannot be bound: its host or its port."""
    problem = _host_error(host, exc)
    if problem is not None:
        return StartupError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror}): {problem}; choose another --metrics-host / LOSSD_METRICS_HOST"
        )
    return StartupError(
        f"cannot serve metrics on {host}:{port} ({exc.strerror}): choose another --metrics-port / LOSSD_METRICS_PORT (0 turns metrics off)"
    )


def check_bindable(host: str, port: int) -> None:
    """StartupError naming the setting when ``host:port`` cannot be bound."""
    for family, kind, proto, _, address in _addresses(host, port):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise _in_use(host, port, exc) from None


class PortReservation:
    """``host:port`` bound (never listening) with SO_REUSEPORT, for as long as it is open.

    Worker processes bind the same port with gRPC's ``grpc.so_reuseport`` and the kernel spreads
    incoming connections over their listening sockets; this socket never listens, so it receives
    none. It keeps the port for lossd while workers are replaced (even when every worker is
    down), and picks the port when ``port`` is 0. A process that binds without SO_REUSEPORT, a
    second lossd's start-up check included, is refused the port.

    It binds with SO_REUSEADDR too, as every server does: the connections of a server that
    stopped a moment ago wait in TIME_WAIT for 60 s, and without it the bind was refused for that
    long ("Address already in use" right after a restart). SO_REUSEADDR is cleared once bound:
    Linux lets two sockets that both have it share a port while neither listens, and this one
    never listens, so a second lossd (whose check sets it) would no longer be refused.
    """

    def __init__(self, host: str, port: int) -> None:
        check_bindable(host, port)
        self.sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, address in _addresses(host, port):
                sock = socket.socket(family, kind, proto)
                self.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
                port = sock.getsockname()[1]  # port 0: every address gets the port the first one got
        except OSError as exc:
            self.close()
            raise _in_use(host, port, exc) from None
        self.port = port

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
