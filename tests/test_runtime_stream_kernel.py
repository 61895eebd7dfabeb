"""The avx2-stream CPU expert kernel (runtime/tidesim_runtime/engine/stream_backend.py and
stream_gemm.cpp): its numbers against a float64 SwiGLU at 1 to 64 tokens and odd shapes in both
dtypes, its fixed summation order (same bits twice, a token's output independent of the other
tokens of the call and of the thread count), the weight layouts it accepts, its refusal where it
cannot be built, and a live decode with it that is lossless against the same-kernel plain decode
in float32 and bfloat16, and `tidesim generate --check-lossless` with it."""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from runtime_cases import SPEC  # noqa: E402
from tidesim_runtime.engine import cpu_kernels as ck  # noqa: E402
from tidesim_runtime.engine import stream_backend as sb  # noqa: E402

from tidesim.errors import InputError  # noqa: E402

STREAM = ck.KERNELS["avx2-stream"]
WHY = STREAM.why_unusable()
needs_kernel = pytest.mark.skipif(bool(WHY), reason=f"avx2-stream cannot run here: {WHY}")
# float32 sums of up to 2048 products (with cancellation): 1e-5 of the largest output, as for the
# other kernels (tests/test_runtime_cpu_kernels.py); bf16 adds the output's one rounding to nearest,
# at most half a bf16 ulp (2^-9 of the element, 2^-8 allowed)
F32_TOL = 1e-5
# (hidden, inter): mini's own, a K % 8 tail in both GEMMs, rows not a multiple of the 3-row block,
# fewer rows than one block, and one column
SHAPES = [(2048, 512), (37, 13), (260, 100), (8, 1), (1, 2)]


def weights(h: int, i: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(2 * i, h, generator=gen) / math.sqrt(h)).to(dtype),
            (torch.randn(h, i, generator=gen) / math.sqrt(i)).to(dtype))


def swiglu64(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The SwiGLU in float64 from the same (rounded) inputs, gate and up written apart."""
    i = w2.shape[1]
    xd, g, u, d = x.double(), w13[:i].double(), w13[i:].double(), w2.double()
    a, b = xd @ g.T, xd @ u.T
    return ((a / (1 + torch.exp(-a))) * b) @ d.T


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_a_float64_swiglu_at_1_to_64_tokens_and_odd_shapes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    for h, i in SHAPES:
        w13, w2 = weights(h, i, dtype, h + i)
        for t in (1, 2, 3, 4, 5, 7, 8, 9, 16, 33, 64):
            x = torch.randn(t, h, generator=gen).to(dtype)
            got = STREAM.run(x, w13, w2)
            assert got.shape == (t, h) and got.dtype == dtype
            want = swiglu64(x, w13, w2)
            # the inputs are the same bf16 numbers in both, so bf16 differs only by its final rounding
            err = (got.double() - want).abs()
            bound = F32_TOL * max(float(want.abs().max()), 1e-30) + (
                want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0.0)
            assert bool((err <= bound).all()), (h, i, t, float((err / bound).max()))


def gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0])
    sb.BACKEND.gemm(x, w, y)
    return y


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_sums_in_the_documented_order(dtype: torch.dtype) -> None:
    """One output computed by hand in the order stream_gemm.cpp states: 8 lanes, lane j the fused
    multiply-adds of columns j, j+8, ... in order; lanes added (0+4, 1+5, 2+6, 3+7), then
    (a+c, b+d), then the two; the K % 8 tail added column by column. float64 products rounded
    once per FMA reproduce float32 FMAs exactly here (products of a bf16 or float32 weight and a
    float32 token fit in 48 bits; the sum is rounded once)."""
    gen = torch.Generator().manual_seed(11)
    k = 8 * 70 + 5
    w = torch.randn(7, k, generator=gen).to(dtype)   # blocks of 6, 4 and 3 rows plus single rows
    x = torch.randn(5, k, generator=gen)
    calls = {n: gemm(x[:n], w) for n in (1, 2, 5)}     # the 1-, 2- and many-token loops

    def f32(v: float) -> float:
        return float(torch.tensor(v, dtype=torch.float64).float())

    for r in range(7):
        for t in range(5):
            wr, xt = w[r].double().tolist(), x[t].double().tolist()
            lanes = [0.0] * 8
            for j in range(8):
                for kk in range(j, k - 5, 8):
                    lanes[j] = f32(wr[kk] * xt[kk] + lanes[j])   # FMA: exact product, one rounding
            q = [f32(lanes[j] + lanes[j + 4]) for j in range(4)]
            p = [f32(q[0] + q[2]), f32(q[1] + q[3])]
            s = f32(p[0] + p[1])
            for kk in range(k - 5, k):
                s = f32(wr[kk] * xt[kk] + s)
            for n, y in calls.items():
                if t < n:
                    assert float(y[t, r]) == s, (r, t, n)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_twice_and_a_token_is_independent_of_its_companions_and_threads(dtype: torch.dtype) -> None:
    """Up to the kernel's token limit (above it `linear` runs, whose rows may depend on the batch)."""
    h, i = 260, 100
    n = min(64, sb.MAX_TOKENS[dtype] or 64)
    w13, w2 = weights(h, i, dtype, 5)
    x = torch.randn(n, h, generator=torch.Generator().manual_seed(6)).to(dtype)
    full = STREAM.run(x, w13, w2)
    assert torch.equal(full, STREAM.run(x, w13, w2))
    for t in (0, 5, n // 2, n - 1):
        assert torch.equal(STREAM.run(x[t:t + 1], w13, w2)[0], full[t])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    assert torch.equal(STREAM.run(x[perm], w13, w2), full[perm])
    for a, b in ((0, 3), (3, 10), (10, n)):
        assert torch.equal(STREAM.run(x[a:b], w13, w2), full[a:b])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(STREAM.run(x, w13, w2), full)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_into_rows_of_a_buffer_strided_weights_and_the_token_limit() -> None:
    """`into` writes rows of a larger output in place (float32 directly, bf16 rounded once);
    weights with a row stride larger than their width (a view into a wider matrix) are read in
    place; above MAX_TOKENS float32 runs `linear` (bit-identical to it)."""
    h, i = 37, 13
    for dtype in (torch.float32, torch.bfloat16):
        w13, w2 = weights(h, i, dtype, 8)
        x = torch.randn(5, h, generator=torch.Generator().manual_seed(9)).to(dtype)
        buf = torch.full((9, h), 7.0, dtype=dtype)
        STREAM.into(x, w13, w2, buf[2:7])
        assert torch.equal(buf[2:7], STREAM.run(x, w13, w2))
        assert bool((buf[:2] == 7).all()) and bool((buf[7:] == 7).all())
        wide13 = torch.zeros(2 * i, h + 11, dtype=dtype)
        wide13[:, 3:3 + h] = w13
        wide2 = torch.zeros(h, i + 5, dtype=dtype)
        wide2[:, :i] = w2
        assert wide13[:, 3:3 + h].stride() == (h + 11, 1)
        assert torch.equal(STREAM.run(x, wide13[:, 3:3 + h], wide2[:, :i]), STREAM.run(x, w13, w2))
    limit = sb.MAX_TOKENS[torch.float32]
    assert limit is not None
    w13, w2 = weights(h, i, torch.float32, 10)
    x = torch.randn(limit + 1, h, generator=torch.Generator().manual_seed(12))
    assert torch.equal(STREAM.run(x, w13, w2), ck.linear_swiglu(x, w13, w2))
    with pytest.raises(RuntimeError, match="same dtype"):
        STREAM.run(x[:2], w13.bfloat16(), w2)


@needs_kernel
def test_runs_in_pool_threads_at_once() -> None:
    """ctypes releases the GIL for the call: worker threads each run the kernel, same bits."""
    w13, w2 = weights(2048, 512, torch.bfloat16, 13)
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(14)).bfloat16()
    want = STREAM.run(x, w13, w2)
    got: list[torch.Tensor] = []

    def work() -> None:
        torch.set_num_threads(1)
        got.append(STREAM.run(x, w13, w2))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and all(torch.equal(g, want) for g in got)


def test_unusable_where_it_cannot_be_built_and_the_kernel_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_avx2 = tmp_path / "cpuinfo"
    no_avx2.write_text("flags\t\t: fpu sse sse2 avx\n")
    b = sb.StreamBackend(directory=tmp_path, flags_path=str(no_avx2))
    assert not b.load() and b.reason == "the CPU lacks avx2, fma (the kernel is AVX2 + FMA code)"
    with_avx2 = tmp_path / "cpuinfo2"
    with_avx2.write_text("flags\t\t: fpu avx avx2 fma\n")
    b = sb.StreamBackend(compiler=str(tmp_path / "no-such-c++"), directory=tmp_path, flags_path=str(with_avx2))
    assert not b.load() and "no C++ compiler" in b.reason
    with pytest.raises(RuntimeError, match="not available: no C\\+\\+ compiler"):
        b.gemm(torch.zeros(1, 8), torch.zeros(8, 8), torch.zeros(1, 8))
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'cc1plus: fatal error: out of luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    b = sb.StreamBackend(compiler=str(broken), directory=tmp_path / "cache", flags_path=str(with_avx2))
    assert not b.load() and b.reason == f"building it with {broken} failed: cc1plus: fatal error: out of luck"
    assert not list((tmp_path / "cache").glob("*.so"))   # no half-written library left behind
    monkeypatch.setattr(sb, "BACKEND", b)
    with pytest.raises(InputError) as exc:
        ck.check_kernel("avx2-stream", torch.float32)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("--cpu-kernel avx2-stream cannot run here: building it with")


@needs_kernel
def test_the_library_is_built_once_into_the_cache_and_reused(tmp_path: Path) -> None:
    b = sb.StreamBackend(directory=tmp_path)
    assert b.load(), b.reason
    built = sorted(tmp_path.glob("stream_gemm-*.so"))
    assert [str(p) for p in built] == [b.path]
    stamp = built[0].stat().st_mtime_ns
    again = sb.StreamBackend(directory=tmp_path)
    assert again.load() and again.path == b.path and built[0].stat().st_mtime_ns == stamp


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_live_decode_with_avx2_stream_is_lossless_against_the_same_kernel(dtype: torch.dtype) -> None:
    """A live decode (resident experts, CPU pool, tide's copies) with avx2-stream gives exactly
    the tokens and routing of the plain decode with its routed experts through avx2-stream, in
    float32 (the cpu-as-gpu dtype) and in bfloat16 (the pool's dtype beside a GPU; here the
    cpu-as-gpu device is given bf16)."""
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.measure.live import lossless_check
    from tidesim_runtime.reference.generate import DecodeConfig
    from tidesim_runtime.reference.model import build_model

    from tidesim.hardware import get_profile
    from tidesim.policies import PolicyOptions, uniform

    model = build_model(SPEC, dtype, seed=0)
    layers = SPEC.num_moe_layers
    opts = PolicyOptions(budget=uniform(5, layers), tau=uniform(2, layers), hw=get_profile("h100-sxm-pcie5"))
    device = dataclasses.replace(select_device("cpu"), dtype=dtype)
    before = ck.current().name
    try:
        ck.use("avx2-stream")
        assert not ck.bit_identical(ck.current(), dtype)   # so the plain decode runs the same kernel
        result = lossless_check(model, [5, 17, 42, 99, 7, 3], DecodeConfig(gen_length=8, block_length=8),
                                "tide", opts, device)
    finally:
        ck.use(before)
    assert result.identical, result.problems
    assert result.metrics is not None and result.metrics.cpu_tokens > 0 and result.metrics.gpu_tokens > 0
    assert result.metrics.expert_copies > 0


@needs_kernel
def test_the_gpu_side_loop_and_the_pool_run_it_on_device_cpu() -> None:
    """On the cpu-as-gpu path the resident experts' loop (kernels.grouped_experts, impl "loop") and
    the pool's task body both run the process's kernel, avx2-stream included (it keeps no packed
    copy, so slots that copies rewrite need no other form)."""
    import numpy as np
    from tidesim_runtime.engine.cpu_pool import ExpertTask, expert_task_runner
    from tidesim_runtime.engine.kernels import grouped_experts

    h, i, e = 37, 13, 3
    pool13 = torch.stack([weights(h, i, torch.float32, 20 + s)[0] for s in range(e)])
    pool2 = torch.stack([weights(h, i, torch.float32, 20 + s)[1] for s in range(e)])
    x = torch.randn(7, h, generator=torch.Generator().manual_seed(21))
    offs = np.array([0, 3, 3, 7])   # expert 0: rows 0-2, expert 1: none, expert 2: rows 3-6
    before = ck.current().name
    try:
        ck.use("avx2-stream")
        assert ck.for_weights(torch.float32, fixed=False) is STREAM
        y = torch.zeros(7, h)
        grouped_experts(x, y, offs, np.array([0, 2]), np.array([2, 0]), pool13, pool2, "loop", torch.as_tensor)
        assert torch.equal(y[:3], sb.stream_swiglu(x[:3], pool13[2], pool2[2]))
        assert torch.equal(y[3:], sb.stream_swiglu(x[3:], pool13[0], pool2[0]))
        out = torch.zeros(7, h)
        expert_task_runner(x, out, pool13, pool2)(ExpertTask(1, 2, 5))
        assert torch.equal(out[2:5], sb.stream_swiglu(x[2:5], pool13[1], pool2[1]))
    finally:
        ck.use(before)


@needs_kernel
def test_generate_check_lossless_passes_with_avx2_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tidesim generate --cpu-kernel avx2-stream --check-lossless` on device cpu (float32): the
    plain decode runs the same kernel and the live decode's tokens equal it."""
    import json

    from tidesim.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("5 17 300 42 7\n9 8 7\n")
    before = ck.current().name
    try:
        assert main(["generate", "--config", "tiny", "--gen-length", "8", "--block-length", "4", "--prompts",
                     str(prompts), "--policy", "tide", "--tau", "2", "--budget", "6", "--hw", "dev-2core-cpu",
                     "--cpu-kernel", "avx2-stream", "--check-lossless", "--device", "cpu", "-o", str(tmp_path / "run"),
                     "--json"]) == 0
    finally:
        ck.use(before)
    lossless = json.loads(capsys.readouterr().out)["lossless"]
    assert lossless["identical"] is True
    assert "avx2-stream changes the last bits of float32" in lossless["reference"]
