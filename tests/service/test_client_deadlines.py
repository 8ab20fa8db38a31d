"""The clients against a fake server (tests/fake_lossd.py) that answers slowly or claims message limits
no lossd server has, or a very small one (probe 18 F5, F6, F11): ``timeout_s`` is one deadline for
the whole call, a ServerInfo no lossd server sends is refused, and a request is never cut into more
than core.MAX_HEADER_PARTS calls."""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lossd_client
import numpy as np
import pytest
from lossd_client import AsyncLossClient, LossClient, LossRequest, core
from lossd_client.errors import DeadlineExceededError, InternalError, InvalidArgumentError

FAKE = str(Path(__file__).resolve().parents[1] / "fake_lossd.py")

#: The calls' deadline, and how long each slow answer of the fake server takes: the lookup and the
#: call each fit in the deadline, both together do not (by a second either way).
TIMEOUT_S = 3.0
DELAY_S = 2.0


class Fake:
    """A running fake server: its address and the calls it received."""

    def __init__(self, address: str, calls: Path) -> None:
        self.address = address
        self._calls = calls

    def calls(self) -> list[str]:
        return self._calls.read_text().splitlines()


@contextmanager
def fake_server(tmp_path: Path, **mode: Any) -> Iterator[Fake]:
    """tests/fake_lossd.py in a process of its own on 127.0.0.1, killed by its PID at the end."""
    calls = tmp_path / f"calls-{time.monotonic_ns()}.log"
    calls.touch()
    client_root = os.path.dirname(os.path.dirname(lossd_client.__file__))  # the client under test
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [client_root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, FAKE, str(calls), json.dumps(mode)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        port = proc.stdout.readline().strip() if ready else ""
        assert port.isdigit(), f"the fake server did not start (exit status {proc.poll()})"
        yield Fake(f"127.0.0.1:{port}", calls)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()


def class_indices(rows: int, classes: int) -> LossRequest:
    """A 'mean' cross_entropy request of ``rows`` rows with int64 class-index targets."""
    rng = np.random.default_rng(rows)
    return LossRequest(rng.standard_normal((rows, classes), dtype=np.float32), rng.integers(0, classes, rows))


def sent(fake: Fake, *methods: str) -> int:
    return sum(call in methods for call in fake.calls())


# ---------------------------------------------------------------------------- F5: one deadline
def test_a_slow_lookup_and_a_slow_evaluate_share_one_deadline(tmp_path):
    """GetServerInfo and Evaluate took 2.7 s each and a call with timeout_s=3 returned after 5.43 s:
    each RPC was given the whole timeout. Now the Evaluate gets what the lookup left of it."""
    with fake_server(tmp_path, info_delay_s=DELAY_S, eval_delay_s=DELAY_S) as fake:
        req = class_indices(64, 8)  # 2 KiB: needs the server's limit first, then one Evaluate
        with LossClient(fake.address, timeout_s=TIMEOUT_S) as client, pytest.raises(DeadlineExceededError):
            client.evaluate(req)

        async def main() -> None:
            async with AsyncLossClient(fake.address) as client:
                with pytest.raises(DeadlineExceededError):
                    await client.evaluate(req, timeout_s=TIMEOUT_S)

        asyncio.run(main())
        assert sent(fake, "GetServerInfo") == 2 and sent(fake, "Evaluate") == 2  # each lookup answered, each Evaluate sent


def test_the_parts_of_a_split_request_share_the_calls_deadline(tmp_path):
    """Each part of a request cut over connections=2 got a full timeout of its own, after the lookup."""
    with fake_server(tmp_path, info_delay_s=DELAY_S, eval_delay_s=DELAY_S, max_receive_message_bytes=64 * 1024) as fake:
        req = class_indices(2000, 16)  # 128 KB: EvaluateChunked, cut in two parts
        with LossClient(fake.address, timeout_s=TIMEOUT_S, connections=2) as client, pytest.raises(DeadlineExceededError):
            client.evaluate(req)

        async def main() -> None:
            async with AsyncLossClient(fake.address, timeout_s=TIMEOUT_S, connections=2) as client:
                with pytest.raises(DeadlineExceededError):
                    await client.evaluate(req)

        asyncio.run(main())
        assert sent(fake, "EvaluateChunked") == 4


def test_a_slow_lookup_and_a_slow_compare_share_one_deadline(tmp_path):
    reference = np.random.default_rng(0).standard_normal((2, 64, 8), dtype=np.float32)  # 4 KiB: needs the limit
    with fake_server(tmp_path, info_delay_s=DELAY_S, compare_delay_s=DELAY_S) as fake:
        with LossClient(fake.address, timeout_s=TIMEOUT_S) as client, pytest.raises(DeadlineExceededError):
            client.compare(reference, reference)

        async def main() -> None:
            async with AsyncLossClient(fake.address, timeout_s=TIMEOUT_S) as client:
                with pytest.raises(DeadlineExceededError):
                    await client.compare(reference, reference)

        asyncio.run(main())
        assert sent(fake, "Compare") == 2


# ---------------------------------------------------------------------------- F11: absurd limits
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_receive_message_bytes", 0),
        ("max_receive_message_bytes", -1),
        ("max_receive_message_bytes", 300),
        ("max_send_message_bytes", 1023),
    ],
)
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_server_info_with_limits_no_lossd_server_has_is_refused_not_kept(tmp_path, name, value, kind):
    """A claimed max_receive_message_bytes of 0 or -1 was kept for the client's lifetime, and every
    request over 512 bytes was refused as the caller's fault ("split the request by sequences")."""
    want = f"the server's GetServerInfo answer has {name} = {value}, under the 1024 bytes every lossd server allows"
    req = class_indices(128, 8)  # 4 KiB: needs the server's limit
    with fake_server(tmp_path, **{name: value}) as fake:
        if kind == "sync":
            with LossClient(fake.address, timeout_s=60) as client:
                for call in (client.server_info, client.server_info, lambda: client.evaluate(req)):
                    with pytest.raises(InternalError) as info:
                        call()
                    assert str(info.value).startswith(want)
        else:

            async def main() -> None:
                async with AsyncLossClient(fake.address, timeout_s=60) as client:
                    for call in (client.server_info, client.server_info, lambda: client.evaluate(req)):
                        with pytest.raises(InternalError) as info:
                            await call()
                        assert str(info.value).startswith(want)

            asyncio.run(main())
        assert sent(fake, "GetServerInfo") == 3  # never kept: each call asked again
        assert sent(fake, "Evaluate", "EvaluateChunked") == 0


# ---------------------------------------------------------------------------- F6: the part cap
@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_request_needing_more_parts_than_the_cap_is_refused_before_anything_is_sent(tmp_path, kind):
    """A claimed limit of 300 bytes cut a 4.9 MB request into 5120 EvaluateChunked calls (21.2 s with
    timeout_s=3). At lossd's smallest limit (1024 bytes) a part's header holds ~100 class indices:
    a request that needs a few parts is still cut; one that needs more than MAX_HEADER_PARTS is
    refused naming the count, and nothing of it is sent."""
    small, big = class_indices(1000, 8), class_indices(20_000, 2)  # ~10 parts; ~180 parts
    refused = (
        rf"^target: each part's chunk header .* would be cut into \d+ parts, over the {core.MAX_HEADER_PARTS} calls one request may take"
    )
    with fake_server(tmp_path, max_receive_message_bytes=1024) as fake:
        if kind == "sync":
            with LossClient(fake.address, timeout_s=60) as client:
                assert client.evaluate(small).counted == 1000
                parts = sent(fake, "EvaluateChunked")
                with pytest.raises(InvalidArgumentError, match=refused):
                    client.evaluate(big)
        else:

            async def main() -> int:
                async with AsyncLossClient(fake.address, timeout_s=60) as client:
                    assert (await client.evaluate(small)).counted == 1000
                    parts = sent(fake, "EvaluateChunked")
                    with pytest.raises(InvalidArgumentError, match=refused):
                        await client.evaluate(big)
                    return parts

            parts = asyncio.run(main())
        assert 1 < parts <= core.MAX_HEADER_PARTS
        assert sent(fake, "EvaluateChunked") == parts and sent(fake, "Evaluate") == 0  # nothing of the refused request
