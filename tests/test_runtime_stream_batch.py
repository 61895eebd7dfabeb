"""The avx2-stream expert list (stream_backend.ExpertBatch, stream_gemm.cpp's
tidesim_stream_swiglu_batch): bit-identical to one call per expert at 1 to 64 tokens with odd
shapes in float32 and bfloat16 (experts scattered in the bank, in any order, rows of any length),
each expert run exactly once when several threads share the list, the same bits on an OpenMP
team, clean errors for bad input, and the CPU pool and the cpu-as-gpu side's loop running it with
the per-expert path's bits (float32 above the token limit still `linear`)."""

from __future__ import annotations

import ctypes
import dataclasses
import math
import threading

import pytest

torch = pytest.importorskip("torch")
np = pytest.importorskip("numpy")

from tidesim_runtime.engine import cpu_kernels as ck  # noqa: E402
from tidesim_runtime.engine import stream_backend as sb  # noqa: E402
from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, expert_task_runner  # noqa: E402

WHY = ck.KERNELS["avx2-stream"].why_unusable()
pytestmark = pytest.mark.skipif(bool(WHY), reason=f"avx2-stream cannot run here: {WHY}")
DTYPES = [torch.float32, torch.bfloat16]
# (hidden, inter): a K % 8 tail in both GEMMs, rows not a multiple of any row block, fewer rows
# than one block, one column
SHAPES = [(37, 13), (260, 100), (8, 1), (1, 2)]


def bank(e: int, h: int, i: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(e, 2 * i, h, generator=gen) / math.sqrt(h)).to(dtype),
            (torch.randn(e, h, i, generator=gen) / math.sqrt(i)).to(dtype))


def one_call(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The per-expert path's library call (tidesim_stream_swiglu), at any token count."""
    out = torch.empty(x.shape, dtype=x.dtype)
    assert sb.BACKEND.load()
    sb.BACKEND.swiglu(x, w13, w2, out)
    return out


def layout(counts: list[int]) -> tuple[list[int], list[int]]:
    """Row ranges of consecutive tasks with these token counts."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
    return starts, [a + c for a, c in zip(starts, counts, strict=True)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_list_has_the_bits_of_one_call_per_expert_at_1_to_64_tokens_and_odd_shapes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    for h, i in SHAPES:
        w13, w2 = bank(7, h, i, dtype, h * 31 + i)
        counts = [1, 2, 3, 4, 5, 7, 8, 9, 16, 31, 33, 64, 0, 6]
        experts = [6, 0, 3, 3, 5, 1, 2, 4, 0, 6, 2, 5, 1, 4]     # scattered, repeated, not in bank order
        starts, stops = layout(counts)
        n = stops[-1]
        x = torch.randn(n, h, generator=gen).to(dtype)
        out = torch.full((n + 3, h), 5.0, dtype=dtype)          # a larger buffer: rows past n untouched
        sb.expert_batch(x, out, w13, w2, experts, starts, stops).run(threads=1)
        for e, a, b in zip(experts, starts, stops, strict=True):
            assert torch.equal(out[a:b], one_call(x[a:b], w13[e], w2[e])), (h, i, e, b - a)
        assert bool((out[n:] == 5).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_sharing_one_list_run_every_expert_once_with_the_same_bits(dtype: torch.dtype) -> None:
    """Two Python threads on one list (the pool's workers) and one call on an OpenMP team of two
    give the bits of one thread: each expert is taken by one runner and its bits do not depend on
    the thread count. The counter ends past the list."""
    h, i = 260, 100
    w13, w2 = bank(9, h, i, dtype, 4)
    counts = [3, 1, 1, 2, 5, 1, 4, 2, 1]
    starts, stops = layout(counts)
    x = torch.randn(stops[-1], h, generator=torch.Generator().manual_seed(5)).to(dtype)
    want = torch.empty_like(x)
    sb.expert_batch(x, want, w13, w2, list(range(9)), starts, stops).run(threads=1)
    got = torch.full_like(x, float("nan"))
    shared = sb.expert_batch(x, got, w13, w2, list(range(9)), starts, stops)
    workers = [threading.Thread(target=shared.run, kwargs={"threads": 1}) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert torch.equal(got, want) and int(shared.counter[0]) >= 9
    team = torch.full_like(x, float("nan"))
    sb.expert_batch(x, team, w13, w2, list(range(9)), starts, stops).run(threads=2)
    assert torch.equal(team, want)
    shared.reset()                                   # runnable again after reset
    got.fill_(float("nan"))
    shared.run(threads=1)
    assert torch.equal(got, want)


def test_an_empty_list_and_an_exhausted_counter_run_nothing() -> None:
    w13, w2 = bank(2, 8, 1, torch.float32, 6)
    x = torch.ones(2, 8)
    out = torch.full((2, 8), 3.0)
    sb.expert_batch(x, out, w13, w2, [], [], []).run()
    done = sb.expert_batch(x, out, w13, w2, [1], [0], [2])
    done.counter[0] = 1                               # every task already taken by another runner
    done.run()
    assert bool((out == 3).all())


def test_bad_input_is_refused_with_one_line_before_the_library_runs() -> None:
    w13, w2 = bank(3, 37, 13, torch.float32, 7)
    x, out = torch.zeros(6, 37), torch.zeros(6, 37)
    cases = [
        ((x, out, w13.bfloat16(), w2, [0], [0], [1]), "one dtype"),
        ((x.double(), out.double(), w13.double(), w2.double(), [0], [0], [1]), "float32 or bfloat16"),
        ((x, out, w13[0], w2, [0], [0], [1]), r"x and out \[N, H\]"),
        ((x, out, w13, w2[:, :, :12], [0], [0], [1]), "do not fit one SwiGLU"),
        ((x[:, :36], out, w13, w2, [0], [0], [1]), "H = 37, the weights' hidden size"),
        ((x.t().contiguous().t(), out, w13, w2, [0], [0], [1]), "unit column stride"),
        ((x, out, w13, w2, [3], [0], [1]), r"outside the bank's 0\.\.2"),
        ((x, out, w13, w2, [-1], [0], [1]), r"outside the bank's 0\.\.2"),
        ((x, out, w13, w2, [0], [0], [7]), r"outside 0\.\.6"),
        ((x, out, w13, w2, [0], [4], [3]), "ends before it starts"),
        ((x, out, w13, w2, [0], [-1], [2]), r"outside 0\.\.6"),
        ((x, out, w13, w2, [0, 1], [0], [1]), "three lists of one length"),
        ((x, out, w13, w2, [[0]], [[0]], [[1]]), "three lists of one length"),
    ]
    for args, words in cases:
        with pytest.raises(ValueError, match=words):
            sb.expert_batch(*args)


def test_the_library_refuses_a_bad_row_range_itself() -> None:
    """The foreign entry checks sizes and row ranges too (code 1), so a list built around
    expert_batch's checks cannot make it read out of bounds."""
    w13, w2 = bank(2, 8, 1, torch.float32, 8)
    x, out = torch.zeros(4, 8), torch.zeros(4, 8)
    good = sb.expert_batch(x, out, w13, w2, [0], [0], [2])
    bad = dataclasses.replace(good, starts=np.array([2], dtype=np.int64), stops=np.array([1], dtype=np.int64))
    with pytest.raises(RuntimeError, match="expert batch failed \\(code 1\\)"):
        bad.run()
    lib = sb.BACKEND.lib
    assert lib is not None
    rc = lib.tidesim_stream_swiglu_batch(-1, None, None, None, 8, None, 1, 0, 8, 1, None, 0, 8, None, 0, 8, 1,
                                         ctypes.c_void_p())
    assert rc == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_pool_runs_a_layer_as_one_list_with_the_per_expert_paths_bits(dtype: torch.dtype) -> None:
    """The pool's avx2-stream units: one list shared by the workers (the float32 tasks above the
    token limit as units of their own running `linear`), the same bits as one kernel call per
    task (stream_into, the path before the list), on one and on two workers."""
    h, i = 37, 13
    w13, w2 = bank(6, h, i, dtype, 9)
    limit = sb.MAX_TOKENS[torch.float32]
    assert limit is not None
    counts = [1, limit + 1, 4, 2, 0, limit, 3, 64]
    experts = [5, 1, 0, 2, 3, 4, 1, 3]
    starts, stops = layout(counts)
    x = torch.randn(stops[-1], h, generator=torch.Generator().manual_seed(10)).to(dtype)
    tasks = [ExpertTask(e, a, b) for e, a, b in zip(experts, starts, stops, strict=True)]
    want = torch.empty_like(x)
    for t in tasks:
        sb.stream_into(x[t.start:t.stop], w13[t.expert], w2[t.expert], want[t.start:t.stop])
    before = ck.current().name
    try:
        ck.use("avx2-stream")
        for workers in (1, 2):
            out = torch.full_like(x, float("nan"))
            runner = expert_task_runner(x, out, w13, w2)
            alone = 2 if dtype == torch.float32 else 0     # limit + 1 and 64 tokens
            order = sorted(tasks, key=lambda t: (-(t.stop - t.start), t.expert))
            assert len(runner.units(order, workers)) == alone + workers
            pool = CPUPool(workers, 1)
            try:
                pool.submit(tasks, runner).wait()
            finally:
                pool.close()
            assert torch.equal(out, want), workers
    finally:
        ck.use(before)


def test_the_pool_keeps_one_unit_per_task_for_the_other_kernels_and_odd_layouts() -> None:
    h, i = 8, 1
    w13, w2 = bank(3, h, i, torch.float32, 11)
    x, out = torch.randn(3, h), torch.empty(3, h)
    tasks = [ExpertTask(e, e, e + 1) for e in range(3)]
    before = ck.current().name
    try:
        ck.use("linear")
        assert len(expert_task_runner(x, out, w13, w2).units(tasks, 2)) == 3
        ck.use("avx2-stream")
        assert len(expert_task_runner(x, out, w13, w2).units(tasks, 2)) == 2
        wide = torch.zeros(3, 2 * i, 2 * h)[:, :, ::2]      # columns at stride 2: the list cannot take it
        runner = expert_task_runner(x, out, wide, w2)
        assert len(runner.units(tasks, 2)) == 3
    finally:
        ck.use(before)


def test_a_failing_list_surfaces_in_wait_and_the_pool_keeps_serving() -> None:
    w13, w2 = bank(2, 8, 1, torch.float32, 12)
    x, out = torch.zeros(4, 8), torch.zeros(4, 8)
    good = sb.expert_batch(x, out, w13, w2, [0], [0], [2])
    bad = dataclasses.replace(good, starts=np.array([3], dtype=np.int64), stops=np.array([2], dtype=np.int64))

    class Broken:
        def __call__(self, task: ExpertTask) -> None:
            bad.run()

    pool = CPUPool(1, 1)
    try:
        with pytest.raises(RuntimeError, match="code 1"):
            pool.submit([ExpertTask(0, 0, 2)], Broken()).wait()
        seen: list[int] = []
        pool.submit([ExpertTask(4, 0, 1)], lambda t: seen.append(t.expert)).wait()
        assert seen == [4]
    finally:
        pool.close()


def test_the_cpu_as_gpu_loop_runs_the_list_and_linear_above_the_limit() -> None:
    """kernels.grouped_experts ("loop", device cpu, avx2-stream): the experts within the float32
    token limit as one list, the one above it through `linear`; every expert's rows as the
    per-expert kernel computes them, the rows of experts not run untouched."""
    from tidesim_runtime.engine.kernels import grouped_experts

    h, i = 37, 13
    w13, w2 = bank(4, h, i, torch.float32, 13)
    limit = sb.MAX_TOKENS[torch.float32]
    assert limit is not None
    counts = [2, 0, limit + 3, 5]               # expert e has counts[e] rows
    offs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = torch.randn(int(offs[-1]) + 2, h, generator=torch.Generator().manual_seed(14))
    experts, slots = np.array([3, 0, 2, 1]), np.array([1, 3, 0, 2])   # expert -> slot
    pool13 = torch.empty_like(w13)
    pool2 = torch.empty_like(w2)
    pool13[slots], pool2[slots] = w13[experts], w2[experts]
    before = ck.current().name
    try:
        ck.use("avx2-stream")
        y = torch.full_like(x, 9.0)
        grouped_experts(x, y, offs, experts, slots, pool13, pool2, "loop", torch.as_tensor)
    finally:
        ck.use(before)
    for e, s in zip(experts.tolist(), slots.tolist(), strict=True):
        a, b = int(offs[e]), int(offs[e + 1])
        if b > a:
            assert torch.equal(y[a:b], sb.stream_swiglu(x[a:b], pool13[s], pool2[s])), e
    assert torch.equal(y[int(offs[2]):int(offs[3])], ck.linear_swiglu(x[int(offs[2]):int(offs[3])], w13[2], w2[2]))
    assert bool((y[int(offs[-1]):] == 9).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_plain_decodes_expert_list_has_the_bits_of_one_call_per_expert(dtype: torch.dtype) -> None:
    """measure/kernel_reference.run_experts_listed (the lossless check's plain decode with
    avx2-stream) against the per-expert runner it replaces, on a block whose experts get 0 to 40
    pairs (float32 above the token limit through `linear`, as the per-expert path does), both with
    separate gate/up weights (fused_w13 copies) and bank-bound ones."""
    from runtime_cases import SPEC
    from tidesim_runtime.measure.kernel_reference import fused_w13, kernel_expert, run_experts_listed
    from tidesim_runtime.reference.model import SparseMoeBlock, run_experts_locally

    torch.manual_seed(17)
    block = SparseMoeBlock(SPEC, dtype)
    for p in block.parameters():
        p.data.normal_(0.0, 0.2)
    kernel = ck.KERNELS["avx2-stream"]
    gen = torch.Generator().manual_seed(18)
    tokens, k = 48, SPEC.top_k
    x = torch.randn(tokens, SPEC.hidden_size, generator=gen).to(dtype)
    # expert 0 in every token's list (48 pairs: above float32's limit), the rest spread at random
    rest = torch.stack([torch.randperm(SPEC.num_experts - 1, generator=gen)[:k - 1] + 1 for _ in range(tokens)])
    idx = torch.cat([torch.zeros(tokens, 1, dtype=torch.long), rest], dim=1)
    w = torch.rand(tokens, k, generator=gen)
    want = run_experts_locally(block, x, idx, w, expert=kernel_expert(block.experts, kernel))
    assert torch.equal(run_experts_listed(block, x, idx, w, kernel), want)
    inter = SPEC.moe_intermediate_size
    for m in block.experts:      # gate and up rows made adjacent: fused_w13 is then a view, no copy
        both = torch.cat([m.gate_proj.weight.data, m.up_proj.weight.data])
        m.gate_proj.weight.data, m.up_proj.weight.data = both[:inter], both[inter:]
        assert fused_w13(m).data_ptr() == both.data_ptr()
    assert torch.equal(run_experts_listed(block, x, idx, w, kernel), want)
