"""The server's peak extra memory for one large request stays within 1.3x the request's bytes.

Measured on a real server process: its peak resident set (VmHWM in /proc/<pid>/status) after a
warm-up call, then after one 256 MB request. Linux only.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import pytest
import torch
from lossd_client import LossClient, LossRequest
from lossd_server import engine
from lossd_server.service import ANSWER_COPIES
from serverproc import start_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")

RATIO = 1.3


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


def extra_peak(server, client: LossClient, req: LossRequest, warm: LossRequest):
    client.evaluate(warm)  # connection, channel buffers and engine paths exist before the baseline
    time.sleep(0.2)
    before = peak_rss(server.proc.pid)
    result = client.evaluate(req)
    return peak_rss(server.proc.pid) - before, result


@pytest.fixture
def fresh_server():
    proc = start_server()
    yield proc
    proc.stop()


def test_fp32_request_of_256_mb(fresh_server):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32000, generator=gen)
    t = torch.randint(0, 32000, (2048,), generator=gen)
    nbytes = x.numel() * 4
    with LossClient(fresh_server.address, timeout_s=300) as c:
        extra, result = extra_peak(fresh_server, c, LossRequest(x, t), LossRequest(x[:64], t[:64]))
    assert extra <= RATIO * nbytes, f"server peak grew by {extra / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB request"
    want = torch.nn.functional.cross_entropy(x, t)
    assert math.isclose(float(result.loss), float(want), rel_tol=1e-5)


def test_bf16_language_model_request_of_256_mb(fresh_server):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 512, 32000, generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, 32000, (8, 512), generator=gen)
    nbytes = logits.numel() * 2
    req = LossRequest(logits, tokens, reduction="none", class_axis=-1, shift_targets=True, extras=("target_logprob", "entropy"), sequence_stats=True)
    warm = LossRequest(logits[:1, :16], tokens[:1, :16], reduction="none", class_axis=-1, shift_targets=True, extras=("target_logprob",), sequence_stats=True)
    with LossClient(fresh_server.address, timeout_s=300) as c:
        extra, result = extra_peak(fresh_server, c, req, warm)
    assert extra <= RATIO * nbytes, f"server peak grew by {extra / 2**20:.0f} MiB for a {nbytes / 2**20:.0f} MiB request"
    assert result.extras["target_logprob"].shape == (8, 512) and result.sequences.nll_sum.shape == (8,)
    # spot-check one sequence against torch (float32 math on the bf16 logits)
    nll = torch.nn.functional.cross_entropy(logits[3, :-1].float(), tokens[3, 1:], reduction="sum")
    assert math.isclose(result.sequences.nll_sum[3], float(nll), rel_tol=1e-5)


def test_the_statistics_of_millions_of_empty_sequences_stay_within_what_the_server_reserved(fresh_server):
    """A request of a few bytes ([B, 0] targets with sequence_stats) is answered with B sequences'
    statistics: the server's memory grows by no more than it reserved for them (it once held
    twice that: every statistic as a Python list at once)."""
    sequences = 2_000_000
    x, t = np.empty((sequences, 0, 5), np.float32), np.empty((sequences, 0), np.uint8)
    options = {"class_axis": -1, "sequence_stats": True}
    plan = engine.plan(engine.LossSpec(**options), x.shape, torch.float32, torch.from_numpy(t))
    reserved = plan.working_nbytes() + ANSWER_COPIES * plan.answer_nbytes()
    with LossClient(fresh_server.address, timeout_s=300) as c:
        extra, result = extra_peak(fresh_server, c, LossRequest(x, t, **options), LossRequest(x[:1000], t[:1000], **options))
    assert result.sequences.nll_sum.shape == (sequences,) and int(result.sequences.tokens.sum()) == 0
    assert extra <= reserved, f"server peak grew by {extra / 2**20:.0f} MiB, it reserved {reserved / 2**20:.0f} MiB"
