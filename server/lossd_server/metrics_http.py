"""The ``/metrics`` HTTP listener, bounded: prometheus-client's exposition behind a few hard limits.

prometheus-client's own ``start_http_server`` starts one thread per connection and gives a
connection all the time it wants: nothing bounds the threads, the file descriptors or the memory
that idle, slow or oversized requests hold, and once the process is out of file descriptors its
gRPC port stops accepting too. Both the single-process server (:mod:`lossd_server.metrics`) and the
``--workers`` supervisor (:mod:`lossd_server.workers`) serve their registry here instead. The answer
itself is prometheus-client's (:func:`prometheus_client.make_wsgi_app`: the text or OpenMetrics
format chosen by ``Accept``, gzip when ``Accept-Encoding`` allows it, ``name[]`` filters, OPTIONS,
405 for other methods), served by :mod:`wsgiref` one request per connection as before, within:

- :data:`MAX_CONNECTIONS` connections at once; one more is answered 503 and closed by the thread
  that accepts it, which gives it no thread of its own;
- :data:`HEAD_TIMEOUT_S` to deliver the whole request head (request line and headers), counted from
  the start of its thread (at the accept) and enforced across every read: a client sending a byte a second is closed at the end
  of it, like an idle one;
- :data:`MAX_HEAD_BYTES` for that head: past it, 431 (414 when the request line alone is that long);
- :data:`SEND_TIMEOUT_S` to take the whole response, from its first byte: a client that stops
  reading is dropped.

A connection therefore holds a thread, a file descriptor and at most :data:`MAX_HEAD_BYTES` of
request for about ``HEAD_TIMEOUT_S + SEND_TIMEOUT_S`` at most, and never more than
:data:`MAX_CONNECTIONS` of them exist. The listener has no authentication: it is plain HTTP meant
for a cluster-internal scrape (README: Metrics). No grpc, no torch.
"""

from __future__ import annotations

import errno
import io
import re
import socket
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

#: Connections served at once; one more is answered 503 and closed without a thread.
MAX_CONNECTIONS = 16
#: Seconds from the accept to the end of the request head (all of it, however it trickles in).
HEAD_TIMEOUT_S = 5.0
#: Bytes of request head (request line and headers) read at most: 431 past it.
MAX_HEAD_BYTES = 16 * 1024
#: Seconds the client gets to take the whole response once it is ready.
SEND_TIMEOUT_S = 10.0
#: Seconds the accepting thread waits after the process ran out of file descriptors (else it spins).
ACCEPT_BACKOFF_S = 0.1
#: Connections the kernel queues for the accepting thread (socketserver's default, 5, makes a burst
#: of clients wait for SYN retransmissions, seconds, before they are served or refused).
LISTEN_BACKLOG = 64

_HEAD_END = re.compile(rb"\n\r?\n")
_BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n"
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class HeadTooLarge(Exception):
    """The request head did not end within :data:`MAX_HEAD_BYTES` (``args[0]``: whether its request line did)."""


def read_head(sock: socket.socket, deadline: float, limit: int = MAX_HEAD_BYTES) -> bytes | None:
    """The bytes of ``sock`` up to the blank line that ends the request head (and any that came with
    it); None when the client closed, or ``deadline`` (monotonic) passed, before that.

    Raises :class:`HeadTooLarge` past ``limit`` bytes. The socket's timeout is set to the time left
    before every read, so the deadline holds for the whole head, not for each read."""
    buf = bytearray()
    start = 0
    while _HEAD_END.search(buf, start) is None:
        if len(buf) >= limit:
            raise HeadTooLarge(b"\n" in buf)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(4096, limit - len(buf)))
        except (TimeoutError, ConnectionError):
            return None
        if not chunk:
            return None
        start = max(0, len(buf) - 2)  # a blank line may straddle the chunks
        buf += chunk
    return bytes(buf)


class DeadlineWriter(io.BufferedIOBase):
    """The response's ``wfile``: everything written within :data:`SEND_TIMEOUT_S` of the first write,
    else the connection is given up as aborted (:mod:`wsgiref` then ends the request quietly, as when
    the client hangs up)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.deadline: float | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.deadline is None:
            self.deadline = time.monotonic() + SEND_TIMEOUT_S
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)  # sendall's timeout bounds the whole call
            self._sock.sendall(data)
        except TimeoutError:
            raise ConnectionAbortedError(f"the client did not take the response within {SEND_TIMEOUT_S:g}s") from None
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self._sock.fileno()


class MetricsRequestHandler(WSGIRequestHandler):
    """wsgiref's handler (one request, then the connection closes), fed a head read within the limits."""

    def setup(self) -> None:  # in the connection's thread, started as it is accepted
        self.connection = self.request
        self.head_deadline = time.monotonic() + HEAD_TIMEOUT_S
        self.rfile = io.BytesIO()
        self.wfile = DeadlineWriter(self.connection)

    def handle(self) -> None:
        try:
            head = read_head(self.connection, self.head_deadline)
            if head is None:
                return  # closed, or the head did not come in time: nothing to answer
            self.rfile = io.BytesIO(head)
            super().handle()
        except HeadTooLarge as exc:
            self.requestline = self.request_version = self.command = ""
            try:
                self.send_error(431 if exc.args[0] else 414)
            except ConnectionError:
                pass
        except ConnectionError:
            pass  # the client hung up, or did not take an error page in time (wsgiref handles its own)

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing (as prometheus-client's handler)."""


class MetricsHTTPServer(ThreadingMixIn, WSGIServer):
    """A WSGI server of daemon threads, at most :data:`MAX_CONNECTIONS` of them (one per connection)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], family: int, app: Any) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, MetricsRequestHandler)
        self.set_app(app)

    def get_request(self) -> tuple[socket.socket, Any]:
        try:
            request, address = super().get_request()
        except OSError as exc:
            if exc.errno in _OUT_OF_FDS:
                time.sleep(ACCEPT_BACKOFF_S)  # the listening socket stays readable: do not spin
            raise
        return request, address

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            refuse(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def refuse(sock: socket.socket) -> None:
    """Answer 503 if the socket takes it at once (it never blocks), for a connection past the cap."""
    try:
        sock.setblocking(False)
        sock.send(_BUSY)
    except OSError:
        pass


def serve(host: str, port: int, registry: Any) -> MetricsHTTPServer:
    """Serve ``registry`` on ``host:port`` (0: the OS picks) from a daemon thread; OSError when it
    cannot bind. Stop it with ``shutdown()`` then ``server_close()``; ``server_address`` has the port."""
    from prometheus_client import make_wsgi_app

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    httpd = MetricsHTTPServer((sockaddr[0], port), family, make_wsgi_app(registry))
    threading.Thread(target=httpd.serve_forever, name="lossd-metrics-http", daemon=True).start()
    return httpd
