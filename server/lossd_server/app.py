"""Server lifecycle: build, warm up, serve, drain on SIGTERM/SIGINT/SIGHUP, stop.

Health is NOT_SERVING until a warm-up evaluation has run on the configured device. On SIGTERM,
SIGINT or SIGHUP (:mod:`lossd_server.stopsignals`) health turns NOT_SERVING at once while the
server keeps accepting for ``drain_s`` (load balancers notice). Then it lets the event loop take
every call gRPC's transport holds (answers wait until no call has started for a moment), starts
gRPC's graceful stop (GOAWAY: new calls go elsewhere) and exits once every call it received has
been answered, at most ``grace_s``. A port already in use stops the server before it announces anything (exit status 2).
With ``--workers N`` every worker process runs :func:`listen` on the shared port and its health
follows the supervisor's decision (:mod:`lossd_server.workers`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from lossd_client._proto.lossd.v1 import loss_pb2 as pb

from . import engine, grpc_log, server_reflection, stopsignals, unary_reads
from .admission import Admission
from .batcher import Batcher
from .budget import MemoryBudget
from .config import ServerConfig, read_pem_file
from .ports import StartupError, check_bindable, metrics_port_error
from .service import LossServicer, add_to_server
from .stopsignals import stop_signals

log = logging.getLogger("lossd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LossService"].full_name


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; StartupError naming --device when this machine
    lacks the device (its spelling was checked with the config)."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise StartupError(f"--device / LOSSD_DEVICE must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError(f"--device / LOSSD_DEVICE {name}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise StartupError(f"--device / LOSSD_DEVICE {name}: this machine has only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise StartupError(f"--device / LOSSD_DEVICE must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


def warm_up(device: torch.device) -> None:
    """One real evaluation per loss kind on the device (loads kernels, initialises CUDA)."""
    x = torch.randn(4, 8)
    t = torch.tensor([0, 3, -100, 7])
    engine.evaluate(engine.LossSpec(), x, t, device=device)
    engine.evaluate(engine.LossSpec(loss=engine.NLL), x.log_softmax(1), t, device=device)
    engine.evaluate(engine.LossSpec(loss=engine.BCE_WITH_LOGITS), x, torch.rand(4, 8), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: What a stop request asks for: start the drain, or skip what is left of it.
DRAIN, HURRY = 1, 2

#: Before gRPC's graceful stop, answers are held until no call has started for this long: the event
#: loop has then taken every call gRPC's transport received (see LossServer._begin_graceful_stop).
QUIET_S = 0.1
#: ... and at most this long (or the grace, when shorter): clients that call on a timer, not once
#: answered, may never let it be quiet.
HOLD_MAX_S = 0.5
#: ... and this long once the stop has begun, so that its GOAWAY reaches the clients before their answers.
GOAWAY_S = 0.05


class StopSignal:
    """Stop requests: the first one starts the drain, a second one skips what is left of it.

    A request comes from this process's own signals (:meth:`__call__`) or is ordered from outside
    (:meth:`order`: with ``--workers N``, the supervisor's relay of the signals it got). Each source
    is counted on its own and the furthest one decides: a signal to the whole process group
    (systemd's KillMode=control-group, ``kill -TERM -PGID``, Ctrl-C) reaches a worker twice, once
    directly and once relayed as ``stop``, in either order, and that is one stop, not two (the
    second copy used to hurry: calls in flight were cut). A second group signal is the worker's
    second signal and the supervisor's ``hurry``: it hurries, once.
    """

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()
        self._signals = 0
        self._ordered = 0

    def __call__(self) -> None:
        """This process received a stop signal."""
        self._signals += 1
        self._update()

    def order(self, level: int) -> None:
        """A stop ordered from outside (``DRAIN`` or ``HURRY``); repeating an order changes nothing."""
        self._ordered = max(self._ordered, level)
        self._update()

    def _update(self) -> None:
        level = max(self._signals, self._ordered)
        if level >= DRAIN:
            self.requested.set()
        if level >= HURRY:
            self.hurry.set()


@dataclass
class LossServer:
    """A running lossd server (gRPC + health + reflection + metrics)."""

    config: ServerConfig
    device: torch.device
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    batcher: Batcher
    servicer: LossServicer
    port: int
    metrics_port: int | None = None
    stop_signal: StopSignal = field(default_factory=StopSignal)

    async def set_serving(self, serving: bool) -> None:
        """Ignored once shutting down (the health servicer is then NOT_SERVING for good)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    @property
    def stopping(self) -> bool:
        return self.stop_signal.requested.is_set()

    def request_stop(self) -> None:
        """Start the drain (as a first stop signal would); calling it again does not hurry."""
        self.stop_signal.order(DRAIN)

    async def warm(self) -> None:
        """Run the warm-up evaluation on the device (off the event loop); health is left as it is."""
        if self.config.warmup:
            await asyncio.get_running_loop().run_in_executor(None, warm_up, self.device)

    async def warm_up_and_serve(self) -> None:
        """Run the warm-up evaluation on the device, then report SERVING (unless already stopping)."""
        await self.warm()
        if self.stopping:
            log.info("warm-up done on %s, but stopping: staying NOT_SERVING", self.device)
            return
        await self.set_serving(True)
        log.info("warm-up done on %s: SERVING", self.device)

    async def wait_and_shutdown(self) -> None:
        """Wait for a stop request, then drain (NOT_SERVING, still accepting) and stop."""
        await self.stop_signal.requested.wait()
        await self.health.enter_graceful_shutdown()
        log.info("stopping: health NOT_SERVING; still accepting calls for %.1fs (drain)", self.config.drain_s)
        hurry = self.stop_signal.hurry
        try:
            await asyncio.wait_for(hurry.wait(), self.config.drain_s)
        except TimeoutError:
            pass
        grace = 0.0 if hurry.is_set() else self.config.grace_s
        calls = self.servicer.calls
        log.info("drain over: no new calls; %d call(s) in progress get at most %.1fs", calls.active, grace)
        # gRPC's own graceful stop: GOAWAY, so clients send new calls elsewhere (a call it refuses
        # is one the server never saw, which clients replay transparently), and what it received
        # goes on; the streams that are not lossd calls (health Watch, reflection) would keep it to
        # the end of the grace, so it is cut short once every lossd call is done
        if grace > 0:
            stopping = await self._begin_graceful_stop(grace)
            finished = asyncio.ensure_future(calls.wait_finished(time.monotonic() + grace))
            hurried = asyncio.ensure_future(hurry.wait())
            await asyncio.wait((finished, hurried, stopping), return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
            hurried.cancel()
        log.info("stopping; %d call(s) still in progress are cut", calls.unfinished)
        calls.cut_at(time.monotonic())
        # one stop(0) after the graceful one has begun: two shutdowns that both start the core
        # server's shutdown crashed a worker (SIGSEGV) in 5 of 20 stops hurried by a second signal
        await self.server.stop(0)
        if grace > 0:
            await stopping
        await self.batcher.close()
        log.info("stopped")

    async def _begin_graceful_stop(self, grace: float) -> asyncio.Future:
        """Start gRPC's graceful stop (``server.stop(grace)``) once the event loop has taken every
        call gRPC's transport received; the stop's task is returned.

        gRPC's stop cancels the calls its transport received that the event loop has not taken yet
        (they wait in gRPC's core, taken one at a time) and those that reach the transport before
        the client reads the GOAWAY: CANCELLED, which plain gRPC clients do not replay. Under load
        that was most calls in flight (30 of 32, every stop, from a client that calls again once
        answered). So answers are held first, and such clients send nothing new, until no call has
        started for QUIET_S (at most HOLD_MAX_S, or the grace); the stop begins, and the held
        answers go out GOAWAY_S (at most half the grace) later, behind its GOAWAY: the clients' next calls go to another
        connection or replica, or are refused UNAVAILABLE when there is none. Calls sent without
        waiting for answers (on a timer) may still reach the transport after the stop began and
        before their client read the GOAWAY: gRPC cancels those, lossd never sees them.
        """
        calls = self.servicer.calls
        calls.hold_answers()
        try:
            held_since = time.monotonic()
            quiet = asyncio.ensure_future(calls.wait_quiet(QUIET_S, held_since + min(grace, HOLD_MAX_S)))
            hurried = asyncio.ensure_future(self.stop_signal.hurry.wait())
            await asyncio.wait((quiet, hurried), return_when=asyncio.FIRST_COMPLETED)
            if quiet.done():  # else hurried: a task just cancelled has no result to read yet
                held_s = time.monotonic() - held_since
                if quiet.result():
                    log.info("every call received has started (answers held %.2fs): graceful stop", held_s)
                else:
                    log.info("calls still arriving after %.2fs (answers held): graceful stop anyway", held_s)
            quiet.cancel()
            hurried.cancel()
            stopping = asyncio.ensure_future(self.server.stop(grace))
            calls.cut_at(time.monotonic() + grace)  # gRPC cuts what is left at the end of the grace
            # the stop's first step starts gRPC's shutdown, which sends the GOAWAY; within the grace,
            # which ends every call gRPC has (a 0.01 s grace lost every held answer to a 0.05 s wait)
            await asyncio.sleep(min(GOAWAY_S, grace / 2))
        finally:
            calls.release_answers()
        return stopping


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """The TLS files (checked with the config; StartupError if one went away since)."""
    if not config.tls_cert_file:
        return None
    pem = {}
    for name in ("tls_key_file", "tls_cert_file", "tls_client_ca_file"):
        path = getattr(config, name)
        if path:
            try:
                pem[name] = read_pem_file(path)
            except OSError as exc:
                raise StartupError(f"--{name.replace('_', '-')} / LOSSD_{name.upper()} {path}: cannot read it ({exc.strerror})") from None
    client_ca = pem.get("tls_client_ca_file")
    key, chain = pem["tls_key_file"], pem["tls_cert_file"]
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def _connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """How long a connection may take to start and, once started, stay without a call."""
    options = [("grpc.server_handshake_timeout_ms", _ms(config.handshake_timeout_s))]
    if config.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", max(1, _ms(config.max_connection_idle_s))))
    return options


def _connection_age_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC's connection age: the age, and how long calls in progress then get (unset: no limit)."""
    if config.max_connection_age_s <= 0:
        return []
    options = [("grpc.max_connection_age_ms", _ms(config.max_connection_age_s))]
    if config.max_connection_age_grace_s > 0:
        options.append(("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_s)))
    return options


def _ms(seconds: float) -> int:
    """Seconds as a gRPC millisecond option (an int32)."""
    return min(2**31 - 1, int(seconds * 1000))


async def listen(config: ServerConfig, *, interceptors=(), observer=None, reuse_port: bool = False) -> LossServer:
    """Build, bind and start the server with health NOT_SERVING (no warm-up yet).

    ``reuse_port``: bind with SO_REUSEPORT, next to the other worker processes of ``--workers N``
    (the port was checked and is held by their supervisor: see :mod:`lossd_server.workers`).
    """
    if not reuse_port:  # port 0 too: a host that is not local is named as such
        check_bindable(config.host, config.port)
    device = resolve_device(config.device)
    if device.type == "cuda" and config.cuda_memory_fraction > 0:
        torch.cuda.set_per_process_memory_fraction(config.cuda_memory_fraction, device)
    options = [
        ("grpc.max_receive_message_length", config.receive_limit_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        # A call the server does not read holds at most transport_window_bytes in gRPC's transport:
        # without BDP probing the HTTP/2 stream window stays at this lookahead (with it, an unread
        # call was measured holding ~16 MiB). Loopback throughput: 1.7 GB/s vs 1.3-1.5 GB/s default.
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.transport_window_bytes),
        # 1: identity only. gRPC decompresses requests before the servicer sees them: 60 "zip
        # bombs" of 122 KB (126 MB each decompressed) stalled a good call for 29 s.
        ("grpc.compression_enabled_algorithms_bitset", 0b111 if config.allow_compressed_requests else 0b1),
    ]
    options += _connection_options(config) + _connection_age_options(config)
    grpc_log.install()  # a client that left before its status was sent is not logged as an ERROR
    # --max-concurrent-calls is lossd's admission (the innermost interceptor), not gRPC's
    # maximum_concurrent_rpcs, which refused calls without running the handlers the metrics wrap (uncounted)
    admission = Admission(config.max_concurrent_calls)
    server = grpc.aio.server(interceptors=[*interceptors, admission], options=options)
    batcher = Batcher(config, device, observer=observer)
    await batcher.start()
    shm_reader = None
    if config.allow_client_shm:
        from .shm import read_shared_tensor

        shm_reader = read_shared_tensor
    servicer = LossServicer(config, device, batcher, _memory_budget(config, observer), shm_reader)
    add_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    unary_reads.add_health(server, health_servicer, unary_reads.health_reads(config), servicer.calls)
    services = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    server.add_generic_rpc_handlers((server_reflection.handlers(services, servicer.reads),))
    creds = _server_credentials(config)
    try:
        port = server.add_insecure_port(config.address) if creds is None else server.add_secure_port(config.address, creds)
    except RuntimeError:
        port = 0
    if port == 0:
        await batcher.close()
        raise _listen_error(config, tls=creds is not None)
    lossd = LossServer(config, device, server, health_servicer, batcher, servicer, port)
    await lossd.set_serving(False)
    await server.start()
    log.info("lossd listening on %s:%d (device %s, tls %s): NOT_SERVING until warm-up", config.host, port, device, "on" if creds else "off")
    return lossd


def _memory_budget(config: ServerConfig, observer) -> MemoryBudget:
    """The server's budget: memory_budget_bytes, a worker's share of it under --workers N."""
    return MemoryBudget(
        config.memory_budget_bytes,
        idle_read_yield_s=config.idle_read_yield_s,
        on_yield=getattr(observer, "on_read_yielded", None),
        share_of=config.memory_budget_share_of,
    )


def _listen_error(config: ServerConfig, *, tls: bool) -> StartupError:
    """gRPC could not add the port. The address was found bindable just before (or is held by the
    supervisor), so with TLS the likely cause is the certificate or key gRPC was given."""
    if tls:
        return StartupError(
            f"cannot listen on {config.address} with TLS: gRPC refused the certificate chain or private key "
            f"(--tls-cert-file {config.tls_cert_file} / --tls-key-file {config.tls_key_file}, LOSSD_TLS_CERT_FILE / LOSSD_TLS_KEY_FILE)"
        )
    return StartupError(
        f"cannot listen on {config.address}: the port is in use or the address is not local (--host/--port, LOSSD_HOST/LOSSD_PORT)"
    )


async def start(config: ServerConfig, *, interceptors=(), observer=None) -> LossServer:
    """listen(), then warm up and report SERVING."""
    lossd = await listen(config, interceptors=interceptors, observer=observer)
    await lossd.warm_up_and_serve()
    return lossd


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT/SIGHUP, then drain and stop (returns normally: exit status 0)."""
    from . import metrics

    stop_signal = StopSignal()
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, stop_signal)
    try:
        httpd = metrics.bind_http(config)  # before anything is announced: a taken port stops the start here
    except OSError as exc:
        raise metrics_port_error(config.metrics_host, config.metrics_port, exc) from None
    try:
        interceptor = metrics.RpcMetricsInterceptor()
        lossd = await listen(config, interceptors=[interceptor], observer=metrics.BatchMetrics())
        interceptor.server_cutting = lossd.servicer.calls.cutting
    except BaseException:
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        raise
    lossd.stop_signal = stop_signal
    lossd.metrics_port = metrics.start_http(config, lossd, httpd)
    if lossd.metrics_port:
        log.info("metrics on http://%s:%d/metrics", config.metrics_host, lossd.metrics_port)
    await lossd.warm_up_and_serve()
    await lossd.wait_and_shutdown()
    # stopped: a stop signal from now on (an orchestrator's second SIGTERM) must not kill the exit by
    # the default action, which the loop's close restores (exit status -15 instead of 0)
    handled = stop_signals()  # before ignore(), which SIGHUP's list depends on
    stopsignals.ignore()
    for sig in handled:
        loop._signal_handlers.pop(sig, None)  # noqa: SLF001 - else the loop's close restores the default action
