"""Engine scratch memory: buffers kept between chunks stay small; huge rows are counted in the plan."""

from __future__ import annotations

import concurrent.futures

import torch
from lossd_server import engine
from lossd_server.engine import comparison, scratch
from lossd_server.engine.compare import plan_compare
from lossd_server.engine.spec import DEFAULT_CHUNK_BYTES


def _kept(name: str, dtype: torch.dtype) -> torch.Tensor | None:
    return getattr(scratch._SCRATCH, "buffers", {}).get((name, dtype))


def in_a_fresh_thread(run) -> None:
    """``run()`` in a new thread (its own buffers); its assertion errors are raised here."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()


def test_a_buffer_over_keep_bytes_is_made_for_its_chunk_and_not_kept():
    def run() -> None:
        small = scratch.scratch("t", 1000, torch.float32)
        assert _kept("t", torch.float32) is not None and small.numel() == 1000
        big_n = scratch.KEEP_BYTES // 4 + 1
        big = scratch.scratch("t", big_n, torch.float32)
        assert big.numel() == big_n
        assert _kept("t", torch.float32).numel() == 1000, "the oversized buffer was kept"

    in_a_fresh_thread(run)


def test_a_thread_keeps_at_most_keep_total_bytes_whatever_its_buffer_names():
    """Each name under KEEP_BYTES, but 14 names of them (a comparison with extras) kept 14 x 32 MiB
    per thread after huge rows; now the thread's total is capped and a buffer past it is made for
    its chunk only."""

    def run() -> None:
        n = scratch.KEEP_BYTES // 4  # 32 MiB of float32: the most one name keeps
        for i in range(14):
            assert scratch.scratch(f"name{i}", n, torch.float32).numel() == n
            assert scratch.kept_bytes() <= scratch.KEEP_TOTAL_BYTES
        assert scratch.kept_bytes() == scratch.KEEP_TOTAL_BYTES
        assert _kept("name13", torch.float32) is None and _kept("name0", torch.float32) is not None

    in_a_fresh_thread(run)


def test_rows_bigger_than_a_chunk_count_their_temporaries_in_the_working_bytes():
    vocab = 15_000_000  # one float32 row: 60 MB, far over a 4 MiB chunk
    row_bytes = vocab * 4
    target = torch.zeros(1, dtype=torch.int64)
    loss = engine.plan(engine.LossSpec(), (1, vocab), torch.float32, target)
    small = engine.plan(engine.LossSpec(), (1, 1000), torch.float32, target)
    assert loss.working_nbytes() >= 4 * (row_bytes - DEFAULT_CHUNK_BYTES)
    assert small.working_nbytes() < 1024
    cmp = comparison.ComparisonPlan(plan_compare((1, vocab), torch.bfloat16, (1, vocab), torch.bfloat16))
    assert cmp.working_nbytes() >= 10 * (row_bytes - DEFAULT_CHUNK_BYTES)


def test_no_rows_count_no_row_temporaries_and_one_row_counts_them_as_before():
    """(0, 2**40) logits have no row of 4 TiB to make: their working bytes are those of (0, 7)
    (they were refused RESOURCE_EXHAUSTED for 16 TiB, probe 13 F4); one such row still counts
    its temporaries in full."""
    from lossd_server.engine.plan import LOSS_ROW_COPIES

    vocab = 2**40
    row_bytes = vocab * 4
    for shape, tshape, axis in (((0, vocab), (0,), None), ((2, 0, vocab), (2, 0), -1), ((0, vocab, 3), (0, 3), None)):
        spec = engine.LossSpec(class_axis=axis)
        empty = torch.empty(tshape, dtype=torch.int64)
        seven = (*shape[:-1], 7) if axis == -1 else (shape[0], 7, *shape[2:])
        assert engine.plan(spec, shape, torch.float32, empty).working_nbytes() == engine.plan(spec, seven, torch.float32, empty).working_nbytes()
    one = engine.plan(engine.LossSpec(), (1, vocab), torch.float32, torch.zeros(1, dtype=torch.int64))
    assert one.working_nbytes() == LOSS_ROW_COPIES * (row_bytes - DEFAULT_CHUNK_BYTES)
    for rows in ((0,), (2, 0)):
        cmp = comparison.ComparisonPlan(plan_compare((*rows, vocab), torch.float32, (*rows, vocab), torch.float32))
        assert cmp.working_nbytes() == comparison.ComparisonPlan(plan_compare((*rows, 7), torch.float32, (*rows, 7), torch.float32)).working_nbytes() == 0
    cmp = comparison.ComparisonPlan(plan_compare((1, vocab), torch.float32, (1, vocab), torch.float32))
    assert cmp.working_nbytes() == 2 * cmp.answer_nbytes() - 2 * 4096 + comparison.COMPARE_ROW_COPIES * (row_bytes - DEFAULT_CHUNK_BYTES)
