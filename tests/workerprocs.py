"""Which worker process holds which connection: /proc, for the ``--workers N`` tests (Linux).

SO_REUSEPORT spreads connections over the workers by a hash of the client's address and port, so
a test cannot choose where a connection lands; it can see where it landed. A worker's sockets are
the ``socket:[inode]`` links under ``/proc/<pid>/fd``; ``/proc/net/tcp`` and ``tcp6`` give each
inode's local and remote ports. A client connection is known by its local port (this process's
socket whose remote port is the server's), the worker by the socket on the other end.

Also a load of threads (:class:`Load`), stopping a server and whatever it left (by pid), and a
worker entry whose warm-up waits for a file (:func:`gated_worker`, run by ``python tests/workerprocs.py``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable

from lossd_server.spawn import worker_pids

ESTABLISHED = "01"
#: Environment: a path; worker 1's warm-up waits until it exists (gated_worker).
GATE_ENV = "LOSSD_TEST_WARMUP_GATE"


def _tcp_entries() -> Iterable[tuple[int, int, int]]:
    """(local port, remote port, inode) of every established TCP socket in this network namespace."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != ESTABLISHED:
                continue
            local, remote = (int(addr.rsplit(":", 1)[1], 16) for addr in fields[1:3])
            yield local, remote, int(fields[9])


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def peers_of(pid: int, port: int) -> set[int]:
    """Remote (client) ports of the connections process ``pid`` accepted on ``port``."""
    inodes = _socket_inodes(pid)
    return {remote for local, remote, inode in _tcp_entries() if local == port and inode in inodes}


def own_ports(port: int) -> set[int]:
    """Local ports of this process's connections to ``port``."""
    inodes = _socket_inodes(os.getpid())
    return {local for local, remote, inode in _tcp_entries() if remote == port and inode in inodes}


def worker_of(client_port: int, pids: dict[int, int], port: int) -> int | None:
    """The index of the worker holding the connection from ``client_port`` (None: not found)."""
    for index, pid in pids.items():
        if client_port in peers_of(pid, port):
            return index
    return None


def wait_for(predicate: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something true (bounded); raises AssertionError otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_everything(server, timeout_s: float = 60.0) -> int:
    """Stop a ``--workers`` server and everything it started; the supervisor's exit status.

    SIGTERM twice (drain, then skip what is left of it), SIGKILL after ``timeout_s``; then, only
    after a failed test (the supervisor stops its own workers and removes its metrics directory),
    any worker left is killed by its pid and the directory of a killed supervisor removed."""
    if server.proc.poll() is None:
        server.signal(signal.SIGTERM)
        time.sleep(0.1)
        if server.proc.poll() is None:
            server.signal(signal.SIGTERM)
    code = server.stop(timeout_s)
    if code == -signal.SIGKILL and "aggregated from " in server.log():
        shutil.rmtree(server.log().split("aggregated from ")[1].split(")")[0], ignore_errors=True)
    for pid in worker_pids(server.log()).values():
        if alive(pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    ours = b"multiprocessing" in f.read()
            except OSError:
                ours = False
            if ours:
                os.kill(pid, signal.SIGKILL)
    return code


def owners(server, client_ports: Iterable[int], timeout_s: float = 10.0) -> list[int]:
    """The index of the worker holding each of this process's connections from ``client_ports``
    (a worker accepts a connection a moment after the client sees it connected: bounded wait)."""
    pids = worker_pids(server.log())
    found = []
    for client_port in sorted(client_ports):
        deadline = time.monotonic() + timeout_s
        while (index := worker_of(client_port, pids, server.port)) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no worker of {pids} holds the connection from port {client_port}")
            time.sleep(0.02)
        found.append(index)
    return found


def channel_per_worker(server, workers: int = 2, attempts: int = 40) -> dict:
    """One connected grpc channel held by each worker (channels are opened until every worker holds
    one; bounded). The caller closes them."""
    import grpc

    channels: dict = {}
    for _ in range(attempts):
        before = own_ports(server.port)
        channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(channel).result(timeout=30)
        (index,) = owners(server, own_ports(server.port) - before)
        if index in channels:
            channel.close()
        else:
            channels[index] = channel
        if len(channels) == workers:
            return channels
    raise AssertionError(f"{attempts} channels did not reach every worker: {sorted(channels)}")


class Load:
    """``threads`` threads calling ``call(seed)`` with fresh seeds until the ``with`` block ends;
    counts the calls and keeps every failure."""

    def __init__(self, call: Callable[[int], object], threads: int = 3) -> None:
        self.call = call
        self.failures: list[BaseException] = []
        self.done = 0
        self._seeds = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                seed = next(self._seeds)
            try:
                self.call(seed)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(exc)
            with self._lock:
                self.done += 1

    def wait_calls(self, n: int, timeout_s: float = 120.0) -> None:
        """Until ``n`` more calls finished (or one failed); bounded."""
        target = self.done + n
        wait_for(lambda: self.done >= target or self.failures, timeout_s, f"{n} more calls")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)


def gated_worker(index, config, conn) -> None:
    """lossd's worker entry, except that worker 1's warm-up waits until the file $LOSSD_TEST_WARMUP_GATE exists."""
    from lossd_server import app, workers

    gate = os.environ[GATE_ENV]
    real_warm_up = app.warm_up

    def gated_warm_up(device) -> None:
        while index == 1 and not os.path.exists(gate):
            time.sleep(0.02)
        real_warm_up(device)

    app.warm_up = gated_warm_up
    workers.worker_main(index, config, conn)


if __name__ == "__main__":  # python tests/workerprocs.py --workers 2 ...: lossd-server with gated_worker
    import logging

    from lossd_server import config as config_mod
    from lossd_server import workers

    cfg = config_mod.load(sys.argv[1:])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    sys.exit(workers.serve(cfg, gated_worker))
