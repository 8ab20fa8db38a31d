"""One typed settings object, fed by CLI flags and LOSSD_* environment variables.

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import os
import re
import ssl
import stat
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

from .fair_queue import SHARE_BY

MiB = 1024 * 1024
GiB = 1024 * MiB


def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup's memory limit when that is lower (containers)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_budget_bytes() -> int:
    """Half the machine's (or container's) memory: the rest is torch, gRPC and the page cache."""
    return max(1 * GiB, machine_memory_bytes() // 2)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "auto"
    cuda_memory_fraction: float = 0.0
    workers: int = 1
    #: --workers N: a worker whose event loop has not answered the supervisor's ping for this long
    #: is killed (SIGKILL) and replaced. A stuck loop (a deadlock, SIGSTOP) otherwise keeps being
    #: handed new connections by the kernel, and its callers hang. The loop can legitimately be
    #: busy: gRPC copies a returned answer into its own buffer on it (~0.45 s per GiB measured, so
    #: about 1 s for the largest answer allowed, max_send_message_bytes, 2 GiB; lossd builds large
    #: answers off the loop, see answers.py); add inline batches, GC pauses and an oversubscribed
    #: host. 30 s stays above that with room and still bounds a hang to half a minute; 0 turns the
    #: check off.
    worker_stall_timeout_s: float = 30.0
    max_message_bytes: int = 64 * MiB
    max_send_message_bytes: int = 2**31 - 1
    memory_budget_bytes: int = dataclasses.field(default_factory=default_memory_budget_bytes)
    transport_window_bytes: int = 1 * MiB
    stream_idle_timeout_s: float = 60.0
    max_memory_wait_s: float = 60.0
    idle_read_yield_s: float = 2.0
    max_stream_in_flight: int = 32
    max_batch_rows: int = 65536
    max_batch_bytes: int = 32 * MiB
    max_wait_ms: float = 2.0
    max_queue_requests: int = 2048
    max_queue_bytes: int = 2048 * MiB
    #: Who shares the queue (lossd_server.fair_queue): a full queue makes room for a caller below
    #: its share of max_queue_requests / max_queue_bytes (the limit over the callers with queued
    #: work) by pushing out the latest requests of the caller holding the most, and callers are
    #: served in turn by work. A caller is a connection (connection), every connection from one
    #: address (address: behind NAT, or a client that opens many connections), or everyone (off:
    #: one queue, first come first served, a full queue refuses). Before, 16 connections sending
    #: kl_div requests of a second of compute each kept the queue full, and a 5 ms request of
    #: another caller was refused at once (0 of 38).
    fair_share_by: str = "connection"
    chunk_bytes: int = 4 * MiB
    max_chunks_in_flight: int = 4
    max_top_k: int = 20
    #: Longest request id (EvaluateRequest, ChunkHeader, CompareRequest, CompareHeader), in UTF-8
    #: bytes. The id is echoed in the answer, so a 100 MB id held 100 MB per answer a client does
    #: not read, counted nowhere. Ids are labels (a UUID is 36 bytes, evaluate_many numbers its
    #: items, a dataset key or file path a few hundred bytes): 1 KiB fits them and bounds an
    #: answer's echo of one, 1 MiB for a packed message's 1024 answers.
    max_id_bytes: int = 1024
    #: Most elements a request's broadcast output may have when it has more than its larger
    #: operand (kl_div: an input [2**20, 1] against a target [1, 2**20] is 1.1e12 elements from
    #: 8 MiB, hours of the engine thread with every other caller waiting; a 'mean' holds nothing,
    #: so the memory budget never sees it). The engine computes 160-180 million such elements per
    #: second of CPU on one core of the 2-core VM of the benchmarks (90-120 million per second of
    #: wall time while other work shares the machine), so 2**27 (134 million) keeps such a request
    #: to about 0.8 s of CPU, 1.5 s end to end. A request whose output is no larger than an operand
    #: is never refused.
    max_broadcast_elements: int = 2**27
    compute_threads: int = 1
    inline_batch_bytes: int = 1 * MiB
    torch_threads: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    drain_s: float = 1.0
    grace_s: float = 30.0
    allow_client_shm: bool = False
    allow_compressed_requests: bool = False
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    warmup: bool = True
    max_connection_age_s: float = 0.0
    #: Calls in progress on a connection aged out get this long; a bound of its own, not grace_s
    #: (30 s, for a stop), which cut evaluate_many streams that run for minutes. 600 s lets a long
    #: evaluation pass finish and still closes an abandoned connection; 0 is gRPC's default: no limit.
    max_connection_age_grace_s: float = 600.0
    #: A connection with no call in progress for this long is closed (GOAWAY; a client reconnects
    #: on its next call). Without it an idle connection is held for ever: 300 connections that sent
    #: the HTTP/2 preface and nothing else used up a 256-file limit, and new connections, health
    #: checks included, were refused until they left. 300 s costs a client that calls at least
    #: every five minutes nothing, and the others one reconnect; 0 is gRPC's default: never.
    max_connection_idle_s: float = 300.0
    #: A connection that has not completed its handshake (TLS, then the client's HTTP/2 preface and
    #: SETTINGS) this long after it was accepted is closed. A real client sends its preface at once;
    #: with gRPC's default, connections that sent nothing (or half a preface) held a file for 60 s.
    #: Raise it for clients on slow links.
    handshake_timeout_s: float = 10.0
    #: Calls one server process (each worker) serves at once (lossd_server.admission), past
    #: which a new call is refused RESOURCE_EXHAUSTED at once. A call costs about 13 KB of gRPC and
    #: Python state before it reads a byte, outside the memory budget (80,000 calls that sent no
    #: message took a server on a 600 MiB budget to 1,061 MiB); this bounds that state (~130 MB).
    #: Health checks have as many slots again, apart, so that a full server still answers its
    #: probes (both pools full: ~260 MB).
    max_concurrent_calls: int = 10_000
    #: Health-check messages read at once (lossd_server.unary_reads.health_reads), each reserving
    #: read_reservation_bytes of a budget of their own, apart from memory_budget_bytes: gRPC's
    #: transport takes a whole message of up to its receive limit before the health servicer can
    #: refuse it (20 concurrent 100 MB health checks took an idle server from 249 to 1,015 MiB).
    #: A probe's message is a few bytes, read in microseconds, so two are plenty; a health call
    #: past them waits in line, and a read that has completed nothing for idle_read_yield_s gives
    #: its place to it. At the default max_message_bytes: 2 x 258 MiB at most.
    max_health_reads: int = 2
    log_level: str = "INFO"
    #: On a worker's config (:meth:`per_worker`): the configured memory_budget_bytes and the number
    #: of workers its share came from, for refusals to name both; None on any other config. Not a
    #: setting (a class variable: no flag, no LOSSD_ variable), and it travels to the worker process.
    memory_budget_share_of: ClassVar[tuple[int, int] | None] = None

    @property
    def receive_limit_bytes(self) -> int:
        """gRPC's own receive limit: above max_message_bytes, so that a unary request over it (up
        to about twice it) is answered with a message that points to EvaluateChunked; beyond
        this gRPC answers RESOURCE_EXHAUSTED with its own message."""
        return min(2**31 - 1, 2 * self.max_message_bytes + MiB)

    @property
    def read_reservation_bytes(self) -> int:
        """Budget reserved while a message is being read: gRPC's transport may receive a whole
        message of up to the receive limit and holds it next to its Python copy until the copy
        is made."""
        return 2 * self.receive_limit_bytes

    def per_worker(self, port: int) -> ServerConfig:
        """The settings of one of ``workers`` processes serving ``port`` together.

        The memory budget is split evenly (each worker holds ``memory_budget_bytes // workers``
        for its callers, so the host total stays the configured number); torch's intra-op
        threads, when left to lossd (0), are ``(CPU count - workers) // workers``, at least 1:
        each worker leaves a core to its own gRPC and event loop, as one process leaves one.
        """
        threads = self.torch_threads
        if threads == 0 and self.workers > 1:  # one process: the batcher's own default (CPU count - 1)
            threads = max(1, ((os.cpu_count() or 1) - self.workers) // self.workers)
        worker = dataclasses.replace(self, port=port, memory_budget_bytes=self.memory_budget_bytes // self.workers, torch_threads=threads)
        if self.workers > 1:
            object.__setattr__(worker, "memory_budget_share_of", (self.memory_budget_bytes, self.workers))  # frozen
        return worker

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


#: Worker processes (--workers): each is its own torch interpreter (about 250 MB resident before any
#: call), and more of them than cores only adds memory; 256 is a core each on the largest machines.
#: Unbounded, --workers 3000 passed the checks and the supervisor set out to start 3000 interpreters.
MAX_WORKERS = 256

_HELP = {
    "host": "address to bind (0.0.0.0 inside containers)",
    "port": "gRPC port; 0 lets the OS pick (the chosen port is logged)",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "cuda_memory_fraction": "on CUDA: the fraction of the device's memory this process may allocate (0: torch's default, all of it)",
    "workers": "server processes sharing the port (SO_REUSEPORT), each with its own event loop, batcher, engine and memory_budget_bytes / workers; 1 = one process; "
    f"at most {MAX_WORKERS} (each is a torch interpreter of ~250 MB: more workers than cores only add memory)",
    "worker_stall_timeout_s": "with workers > 1: a worker whose event loop has not answered the supervisor for this long "
    "(a deadlock, SIGSTOP) is killed and replaced; well above the second or two a busy loop takes (0: never)",
    "max_message_bytes": "largest request message (its tensor bytes, class weights included, and id) received; bigger requests must use EvaluateChunked",
    "max_send_message_bytes": "largest answer sent; a request whose answer would be larger is refused before it is computed",
    "memory_budget_bytes": "bytes held for callers at once (messages, tensors, chunks, answers), split evenly over the workers; past it calls wait or are refused",
    "transport_window_bytes": "bytes gRPC's transport accepts per call before the server reads them (HTTP/2 stream window)",
    "stream_idle_timeout_s": "a call whose client sends nothing (or reads nothing) for this long ends with DEADLINE_EXCEEDED",
    "max_memory_wait_s": "longest a call waits in line for server memory (or until its deadline, if sooner) before RESOURCE_EXHAUSTED",
    "idle_read_yield_s": "while calls wait in line for memory, a call whose client has completed no message for this long (gRPC reports whole messages only, so a slow upload counts as nothing sent) gives its read reservation to them and ends RESOURCE_EXHAUSTED (0: never)",
    "max_stream_in_flight": "EvaluateStream / EvaluatePacked: messages read and not yet answered per stream",
    "max_health_reads": "health-check messages read at once, each reserving read_reservation_bytes (twice gRPC's receive limit) of a budget of their own, apart from memory_budget_bytes; a health call past them waits in line",
    "max_batch_rows": "a batch closes when it holds this many rows (positions)",
    "max_batch_bytes": "a batch closes when it holds this many bytes of work (a request's input, or its broadcast output or answer when larger)",
    "max_wait_ms": "0 turns batching off (every request its own engine pass); any positive value turns the work-conserving batcher on "
    "(no timer ever holds a request back: the value is no delay)",
    "max_queue_requests": "queued requests beyond this are answered RESOURCE_EXHAUSTED",
    "max_queue_bytes": "queued bytes of work (a request's input, or its broadcast output or answer when larger) beyond this are "
    "answered RESOURCE_EXHAUSTED",
    "fair_share_by": "who shares the batcher queue: connection, address (every connection of one peer address together) or off "
    "(one queue, first come first served); a full queue makes room for a caller below its share of max_queue_requests / "
    "max_queue_bytes (the limit / the callers with queued work) by pushing out the latest requests of the caller holding the most, "
    "and callers are served in turn by work",
    "chunk_bytes": "compute-dtype bytes of logits evaluated per engine chunk (bounds extra memory)",
    "max_chunks_in_flight": "EvaluateChunked / CompareChunked: received chunks held at once per call",
    "max_top_k": "Compare: largest top_k (classes returned per position and model, with their log-probabilities)",
    "max_id_bytes": "longest request id (UTF-8 bytes; it is echoed in the answer); a longer one is refused INVALID_ARGUMENT",
    "max_broadcast_elements": "most elements a request's broadcast output may have when it has more than its larger operand "
    "(kl_div's input against its target); past it the request is refused RESOURCE_EXHAUSTED before any compute",
    "compute_threads": "engine worker threads",
    "inline_batch_bytes": "CPU batches of at most this many bytes of work (input, or answer / broadcast output when larger) are computed on the event loop (cheaper than a thread hop); 0: always on an engine thread",
    "torch_threads": "torch intra-op threads per worker; 0 = (CPU count - workers) / workers, at least 1 (a core per worker stays free for gRPC and its event loop)",
    "metrics_host": "address of the Prometheus /metrics HTTP server",
    "metrics_port": "port of the Prometheus /metrics HTTP server; 0 disables it, -1 lets the OS pick (the chosen port is logged)",
    "drain_s": "after SIGTERM: seconds to keep accepting while health reports NOT_SERVING",
    "grace_s": "after draining: seconds in-flight calls get to finish",
    "allow_client_shm": "honour same-host shared-memory tensor references",
    "allow_compressed_requests": "accept gzip/deflate-compressed request messages (off: they are refused UNIMPLEMENTED; "
    "a 122 KB compressed message can decompress to a max_message_bytes read, so each costs the server ~1000x what it costs the sender)",
    "tls_cert_file": "PEM server certificate chain (enables TLS)",
    "tls_key_file": "PEM server private key",
    "tls_client_ca_file": "PEM CA bundle; when set, clients must present a certificate it signed (mTLS)",
    "warmup": "run a warm-up evaluation before reporting SERVING",
    "max_connection_age_s": "close client connections after this long (0: never) so clients discover new replicas",
    "max_connection_age_grace_s": "with max_connection_age_s: how long calls in progress on a connection being closed may still run (0: no limit)",
    "max_connection_idle_s": "close a connection with no call in progress for this long (GOAWAY: clients reconnect on their next call); "
    "bounds the files idle or abandoned connections hold (0: never)",
    "handshake_timeout_s": "close a connection that has not completed its TLS and HTTP/2 handshake this long after it was accepted",
    "max_concurrent_calls": "calls one process (each worker) serves at once; past it new calls are refused RESOURCE_EXHAUSTED "
    "(bounds the per-call state outside the memory budget); health checks have as many slots again, apart",
    "log_level": "logging level",
}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(f: dataclasses.Field):
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind.startswith("bool"):
        return _parse_bool
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def _default(f: dataclasses.Field) -> object:
    if f.default_factory is not dataclasses.MISSING:
        return f"{f.default_factory()} ({f.default_factory.__doc__.splitlines()[0].rstrip('.').lower()})"
    return f.default


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lossd-server", description="lossd: torch-exact loss evaluation over gRPC")
    for f in fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        env = "LOSSD_" + f.name.upper()
        conv = _converter(f)
        if conv is _parse_bool:
            p.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{_HELP[f.name]} [env {env}; default {_default(f)}]",
            )
        else:
            p.add_argument(flag, dest=f.name, type=conv, default=None, help=f"{_HELP[f.name]} [env {env}; default {_default(f)}]")
    return p


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config from flags, then LOSSD_* variables, then defaults."""
    environ = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    values = {}
    from_env = set()
    for f in fields(ServerConfig):
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        env = environ.get("LOSSD_" + f.name.upper())
        if env is not None:
            try:
                values[f.name] = _converter(f)(env)
            except ValueError as exc:
                raise SystemExit(f"LOSSD_{f.name.upper()}: {exc}") from None
            from_env.add(f.name)
    config = ServerConfig(**values)
    validate(config, from_env)
    check_environment(environ)
    return config


INT32_MAX = 2**31 - 1
#: Every integer setting fits int64 (GetServerInfo carries the limits in int64 fields).
INT64_MAX = 2**63 - 1
#: gRPC takes its connection timers as int32 milliseconds.
MAX_GRPC_MS_S = INT32_MAX / 1000
#: Threads of one kind per process: more than any machine has cores is a typo, and torch would start them.
MAX_THREADS = 1024


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting accepts; a float must also be finite (never nan or inf)."""

    low: float
    high: float | None = None
    above: bool = False  # low itself is refused (> low)
    off: bool = False  # 0 is accepted too: it turns the setting off
    note: str = ""  # what a special value means, or why the bound

    def accepts(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.off and value == 0:
            return True
        if value < self.low or (self.above and value == self.low):
            return False
        high = self.high if self.high is not None or isinstance(value, float) else INT64_MAX
        return high is None or value <= high

    def describe(self, floating: bool, value: float | None = None) -> str:
        if self.off:
            text = f"0 (off) or at least {_number(self.low)}"
        else:
            text = f"{'>' if self.above else '>='} {_number(self.low)}"
        high = self.high if self.high is not None or floating or value is None or value <= INT64_MAX else INT64_MAX
        if high is not None:
            text += f" and <= {_number(high)}"
        if self.note:
            text += f" ({self.note})"
        return text + (", a finite number" if floating else "")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


#: Every numeric setting's accepted values, checked at load (:func:`validate`). 0 is accepted
#: where the README documents what it means (off, never, no limit, lossd's default).
BOUNDS: dict[str, Bounds] = {
    "port": Bounds(0, 65535, note="0: the OS picks"),
    "metrics_port": Bounds(-1, 65535, note="-1: the OS picks, 0: off"),
    "cuda_memory_fraction": Bounds(0, 1, note="0: torch's default"),
    "workers": Bounds(1, MAX_WORKERS, note="each a torch interpreter; more than the cores only adds memory"),
    # the supervisor waits for its workers a quarter of this at a time, with poll()'s int32
    # milliseconds: 1e7 passed the checks and crashed the supervisor (OverflowError) at the start
    "worker_stall_timeout_s": Bounds(1, MAX_GRPC_MS_S, off=True, note="int32 milliseconds, as the other timers"),
    "max_message_bytes": Bounds(1024, INT32_MAX, note="gRPC's message limit"),
    "max_send_message_bytes": Bounds(1024, INT32_MAX, note="gRPC's message limit"),
    "memory_budget_bytes": Bounds(1),
    "transport_window_bytes": Bounds(64 * 1024, INT32_MAX, note="gRPC's int32 window"),
    "stream_idle_timeout_s": Bounds(0, above=True),
    "max_memory_wait_s": Bounds(0, above=True),
    "idle_read_yield_s": Bounds(0, note="0: never"),
    "max_stream_in_flight": Bounds(1),
    "max_health_reads": Bounds(1, 1024, note="each may hold twice gRPC's receive limit"),
    "max_batch_rows": Bounds(1),
    "max_batch_bytes": Bounds(1),
    "max_wait_ms": Bounds(0, note="0: batching off"),
    "max_queue_requests": Bounds(1),
    "max_queue_bytes": Bounds(1),
    "chunk_bytes": Bounds(1),
    "max_chunks_in_flight": Bounds(1),
    "max_top_k": Bounds(0, 2**32 - 1, note="a request's top_k is a uint32"),
    "compute_threads": Bounds(1, MAX_THREADS),
    "inline_batch_bytes": Bounds(0, note="0: always on an engine thread"),
    "torch_threads": Bounds(0, MAX_THREADS, note="0: lossd picks"),
    "drain_s": Bounds(0),
    "grace_s": Bounds(0),
    "max_connection_age_s": Bounds(0, MAX_GRPC_MS_S, note="0: never; gRPC's int32 milliseconds"),
    "max_connection_age_grace_s": Bounds(0, MAX_GRPC_MS_S, note="0: no limit; gRPC's int32 milliseconds"),
    "max_connection_idle_s": Bounds(0, MAX_GRPC_MS_S, note="0: never; gRPC's int32 milliseconds"),
    "handshake_timeout_s": Bounds(0.001, MAX_GRPC_MS_S, note="gRPC's int32 milliseconds"),
    "max_concurrent_calls": Bounds(1, INT32_MAX, note="gRPC's int32"),
    "max_broadcast_elements": Bounds(1),
    "max_id_bytes": Bounds(32, note="evaluate_many numbers its items with decimal ids"),
}

#: Settings given by name: the accepted spellings (a regular expression) and how to say them.
CHOICES: dict[str, tuple[str, str]] = {
    "device": (r"auto|cpu|cuda(:[0-9]+)?", "auto, cpu, cuda or cuda:N"),
    "log_level": (r"(?i)debug|info|warning|error|critical", "DEBUG, INFO, WARNING, ERROR or CRITICAL"),
    "fair_share_by": ("|".join(SHARE_BY), "connection, address or off"),
}

#: Settings that are an address to bind, resolved at the start (:func:`host_problem`).
HOSTS = ("host", "metrics_host")

#: Settings read from the environment only (glibc's allocator, :mod:`lossd_server.allocator`): 0 leaves glibc's default.
ENV_ONLY = {name: Bounds(0, INT32_MAX, note="0: glibc's default") for name in ("LOSSD_MALLOC_ARENA_MAX", "LOSSD_MALLOC_MMAP_THRESHOLD")}


def host_problem(host: str) -> str | None:
    """Why ``host`` cannot even be looked up (None: it can; whether it resolves is the start's matter).

    socket.getaddrinfo encodes a name with Python's IDNA codec first, which raises UnicodeError (no
    OSError) for a label that is empty or longer than 63 characters, or a character IDNA refuses:
    ``--host`` with a 64-character label was a traceback from deep in the start, exit status 1.
    """
    try:
        host.strip("[]").encode("idna")
    except UnicodeError as exc:
        return str(exc.__cause__ or exc)
    return None


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for a one-line message, cut after ``limit`` characters."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def setting_name(name: str, from_env: Collection[str] = ()) -> str:
    """How a message names a setting: its flag, led by its environment variable when it came from there."""
    flag = "--" + name.replace("_", "-")
    return f"LOSSD_{name.upper()} ({flag})" if name in from_env else flag


def validate(config: ServerConfig, from_env: Collection[str] = ()) -> None:
    """SystemExit with one line naming the first setting out of its range (``from_env``: the
    settings that came from LOSSD_* variables, named by them)."""
    for name, bounds in BOUNDS.items():
        value = getattr(config, name)
        if not bounds.accepts(value):
            raise SystemExit(f"{setting_name(name, from_env)} must be {bounds.describe(isinstance(value, float), value)}, got {value!r}")
    for name, (pattern, spellings) in CHOICES.items():
        value = getattr(config, name)
        if not re.fullmatch(pattern, value):
            raise SystemExit(f"{setting_name(name, from_env)} must be {spellings}, got {value!r}")
    for name in HOSTS:
        problem = host_problem(getattr(config, name))
        if problem is not None:
            raise SystemExit(
                f"{setting_name(name, from_env)} must be an IP address or a host name whose labels (between dots) have 1 to 63 characters, "
                f"got {_shown(getattr(config, name))} ({problem})"
            )
    if config.memory_budget_bytes // config.workers < 2 * config.read_reservation_bytes:
        each = f", for each of --workers={config.workers}" if config.workers > 1 else ""
        raise SystemExit(
            f"{setting_name('memory_budget_bytes', from_env)} must be at least {2 * config.read_reservation_bytes * config.workers} "
            f"(twice what reading one message of --max-message-bytes={config.max_message_bytes} may take{each}), got {config.memory_budget_bytes}"
        )
    if (config.tls_cert_file is None) != (config.tls_key_file is None):
        raise SystemExit("--tls-cert-file and --tls-key-file go together")
    if config.tls_client_ca_file and not config.tls_cert_file:
        raise SystemExit("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
    check_tls_files(config, from_env)


def check_environment(environ: Mapping[str, str]) -> None:
    """The environment-only settings (:data:`ENV_ONLY`): integers in their range, else SystemExit naming them."""
    for env, bounds in ENV_ONLY.items():
        text = environ.get(env)
        if text is None:
            continue
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not bounds.accepts(value):
            raise SystemExit(f"{env} must be an integer {bounds.describe(False, value)}, got {text!r}")


#: Largest TLS file read (--tls-cert-file, --tls-key-file, --tls-client-ca-file): a certificate
#: chain or key is a few KiB and a whole system CA bundle about 220 KiB. Unbounded, /dev/zero was
#: read until memory ran out.
MAX_PEM_BYTES = 1 * MiB

_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


def read_pem_file(path: str, limit: int = MAX_PEM_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; else OSError whose strerror says why.

    Opened with O_NONBLOCK and checked with fstat before a byte is read: a named pipe hung the start
    for ever (open waits for a writer), and /dev/zero was read until memory ran out.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
            raise OSError(errno.EINVAL, f"not a regular file: {kind}", path)
        data = b""
        while len(data) <= limit:  # bounded: each read returns at least a byte, or ends the loop
            more = os.read(fd, limit + 1 - len(data))
            if not more:
                break
            data += more
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes, which no PEM certificate, key or CA bundle is", path)
    return data


def check_tls_files(config: ServerConfig, from_env: Collection[str] = ()) -> None:
    """The TLS files are readable PEM, and the key is the certificate's (as gRPC will need them)."""
    if not config.tls_cert_file:
        return
    pem = {}
    for name, marker in (("tls_cert_file", "CERTIFICATE"), ("tls_key_file", "PRIVATE KEY"), ("tls_client_ca_file", "CERTIFICATE")):
        path = getattr(config, name)
        if not path:
            continue
        try:
            pem[name] = read_pem_file(path)
        except OSError as exc:
            raise SystemExit(f"{setting_name(name, from_env)} {path}: cannot read it ({exc.strerror})") from None
        if not re.search(rb"-----BEGIN [A-Z0-9 ]*" + marker.encode() + rb"-----", pem[name]):
            raise SystemExit(f"{setting_name(name, from_env)} {path}: not a PEM file with a {marker.lower()} (-----BEGIN ...{marker}-----)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        cert, key = setting_name("tls_cert_file", from_env), setting_name("tls_key_file", from_env)
        raise SystemExit(
            f"{key} {config.tls_key_file} is not the (unencrypted) private key of the certificate in {cert} {config.tls_cert_file} ({exc})"
        ) from None
    if "tls_client_ca_file" in pem:
        try:
            context.load_verify_locations(cadata=pem["tls_client_ca_file"].decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise SystemExit(
                f"{setting_name('tls_client_ca_file', from_env)} {config.tls_client_ca_file}: not a PEM CA bundle ({exc})"
            ) from None
