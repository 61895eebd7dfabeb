"""The CPU expert kernels (runtime/tidesim_runtime/engine/cpu_kernels.py): every kernel against a
float64 SwiGLU computed independently, bit-identity to `linear` where a kernel promises it, the
in-place form equal to the plain one, the refusals, and which kernel runs where."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from tidesim_runtime.engine import cpu_kernels as ck  # noqa: E402
from tidesim_runtime.engine.cpu_pool import ExpertTask, expert_task_runner  # noqa: E402

from tidesim.cli.cpu_kernel_arg import CPU_KERNEL_NAMES, DEFAULT_CPU_KERNEL, chosen_kernel, profile_kernel  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.hardware import get_profile  # noqa: E402

H, I = 256, 96
TOKENS = (1, 2, 3, 5, 8, 16, 33, 64)
# bf16 rounds gate/up and the product to 8 bits of mantissa: relative error up to a few 2^-8
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def usable(dtype: torch.dtype) -> list[ck.CpuKernel]:
    return [k for k in ck.KERNELS.values() if k.supports(dtype) and not k.why_unusable()]


def weights(dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(2 * I, H, generator=gen) / math.sqrt(H)
    w2 = torch.randn(H, I, generator=gen) / math.sqrt(I)
    return w13.to(dtype), w2.to(dtype)


def swiglu64(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The SwiGLU written out in float64 with separate gate and up matrices and an explicit SiLU."""
    xd, g, u, d = x.double(), w13[:I].double(), w13[I:].double(), w2.double()
    a, b = xd @ g.T, xd @ u.T
    return ((a / (1 + torch.exp(-a))) * b) @ d.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_a_float64_swiglu(dtype: torch.dtype) -> None:
    w13, w2 = weights(dtype, 0)
    gen = torch.Generator().manual_seed(1)
    for t in TOKENS:
        x = torch.randn(t, H, generator=gen).to(dtype)
        want = swiglu64(x, w13, w2)
        scale = float(want.abs().max())
        for k in usable(dtype):
            got = k.run(x, w13, w2)
            assert got.shape == (t, H) and got.dtype == dtype, k.name
            err = float((got.double() - want).abs().max())
            assert err <= TOL[dtype] * max(scale, 1.0), (k.name, t, err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identity_where_promised_and_into_equals_run(dtype: torch.dtype) -> None:
    w13, w2 = weights(dtype, 2)
    gen = torch.Generator().manual_seed(3)
    for t in TOKENS:
        x = torch.randn(t, H, generator=gen).to(dtype)
        # the reference model's own modules: separate gate/up/down nn.Linear arithmetic
        ref = F.linear(F.silu(F.linear(x, w13[:I])) * F.linear(x, w13[I:]), w2)
        for k in usable(dtype):
            y = k.run(x, w13, w2)
            if k.identical(dtype):
                assert torch.equal(y, ref), (k.name, t)
            out = torch.zeros(t + 3, H, dtype=dtype)
            ret = k.into(x, w13, w2, out[1:t + 1])
            assert ret.data_ptr() == out[1:t + 1].data_ptr()
            assert torch.equal(out[1:t + 1], y), (k.name, t)
            assert not out[0].any() and not out[t + 1:].any()


def test_weights_left_changes_float32_bits_somewhere_so_the_promise_is_not_vacuous() -> None:
    """weights-left does not promise float32 bit-identity; the lossless check then needs the
    same-kernel reference (kernel_reference.py)."""
    w13, w2 = weights(torch.float32, 4)
    x = torch.randn(8, H, generator=torch.Generator().manual_seed(5))
    assert not ck.KERNELS["weights-left"].identical(torch.float32)
    assert not ck.bit_identical(ck.KERNELS["weights-left"], torch.float32)
    # bf16: identical where oneDNN's native bf16 GEMM runs both forms (AVX-512, avx_ne_convert)
    assert ck.bit_identical(ck.KERNELS["weights-left"], torch.bfloat16) == (not ck.onednn_unusable(torch.bfloat16))
    y = ck.KERNELS["weights-left"].run(x, w13, w2)
    torch.testing.assert_close(y, ck.linear_swiglu(x, w13, w2), rtol=1e-5, atol=1e-5)


def test_names_default_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tuple(ck.KERNELS) == CPU_KERNEL_NAMES and ck.DEFAULT_KERNEL == DEFAULT_CPU_KERNEL
    assert chosen_kernel(None) == DEFAULT_CPU_KERNEL
    assert chosen_kernel(None, "linear") == "linear" and chosen_kernel("compiled", "linear") == "compiled"
    prof = get_profile("dev-2core-cpu")
    assert prof.cpu.kernel == "" and profile_kernel(prof) == "linear"   # calibrated before kernels were recorded
    prof.cpu.kernel = "weights-left"
    assert profile_kernel(prof) == "weights-left"
    with pytest.raises(InputError, match="--cpu-kernel must be one of"):
        chosen_kernel("fastest")
    with pytest.raises(InputError, match="--cpu-kernel must be one of"):
        ck.get_kernel("fastest")
    bf16_only = ck.CpuKernel("kt-kernel", ck.kt_backend.kt_swiglu, ck.BF16, frozenset(), "")
    monkeypatch.setitem(ck.KERNELS, "kt-kernel", bf16_only)
    with pytest.raises(InputError, match="runs bfloat16 weights only.*float32"):
        ck.check_kernel("kt-kernel", torch.float32)
    no_bf16 = ck.CpuKernel("onednn-packed", ck.onednn_packed, ck.FLOATS, ck.BF16, "",
                           dtype_unusable=lambda d: "no bf16 here" if d == torch.bfloat16 else "")
    monkeypatch.setitem(ck.KERNELS, "onednn-packed", no_bf16)
    with pytest.raises(InputError, match="--cpu-kernel onednn-packed: no bf16 here"):
        ck.check_kernel("onednn-packed", torch.bfloat16)
    assert ck.check_kernel("onednn-packed", torch.float32) is no_bf16 and not no_bf16.supports(torch.bfloat16)
    monkeypatch.setattr(ck.kt_backend, "available", lambda: (False, "kt-kernel is not installed"))
    kt = ck.CpuKernel("kt-kernel", ck.kt_backend.kt_swiglu, ck.BF16, frozenset(), "", usable=ck.kt_backend.available)
    monkeypatch.setitem(ck.KERNELS, "kt-kernel", kt)
    with pytest.raises(InputError, match="cannot run here: kt-kernel is not installed"):
        ck.check_kernel("kt-kernel", torch.bfloat16)


def packed_dtype() -> torch.dtype:
    """A dtype oneDNN packs on this CPU (bf16 needs AVX-512 or avx_ne_convert; float32 runs on any)."""
    if not ck.onednn_unusable(torch.bfloat16):
        return torch.bfloat16
    if ck.onednn_unusable(torch.float32):
        pytest.skip(ck.onednn_unusable(torch.float32))
    return torch.float32


def test_the_pool_runs_the_selected_kernel_and_slots_run_its_mutable_form() -> None:
    """The worker pool's task body runs the current kernel on the host banks (fixed weights);
    on weights that may change (slots) onednn-packed runs its repacking form, same arithmetic,
    and a caching kernel without one (kt-kernel) falls back to linear."""
    dtype = packed_dtype()
    w13, w2 = weights(dtype, 6)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(7)).to(dtype)
    before = ck.current().name
    try:
        ck.use("onednn-packed")
        assert ck.for_weights(dtype, fixed=True).name == "onednn-packed"
        mutable = ck.for_weights(dtype, fixed=False)
        assert mutable.name == "onednn-packed" and mutable.run is ck.onednn_packed_mutable
        out = torch.empty(4, H, dtype=dtype)
        expert_task_runner(x, out, w13[None], w2[None])(ExpertTask(0, 0, 4))
        assert torch.equal(out, ck.onednn_packed(x, w13, w2))
        assert torch.equal(mutable.run(x, w13, w2), out)
        ck.use("kt-kernel")
        assert ck.for_weights(torch.bfloat16, fixed=False).name == "linear"
        assert ck.for_weights(torch.float32, fixed=True).name == "linear"   # kt-kernel cannot run float32
        ck.use("weights-left")
        assert ck.for_weights(torch.float32, fixed=False).name == "weights-left"
    finally:
        ck.use(before)
        ck.PACKED.clear()


def test_onednn_packed_float32_is_its_own_arithmetic_row_by_row() -> None:
    """float32 onednn-packed: not promised linear's bits (oneDNN's sgemm, not MKL's) from two tokens on,
    within float32 rounding of it, and every row the same whichever other rows (two or more)
    share the call, on one or two threads; one token runs linear's matrix-vector product, bit
    for bit, and packs nothing."""
    if ck.onednn_unusable(torch.float32):
        pytest.skip(ck.onednn_unusable(torch.float32))
    k = ck.KERNELS["onednn-packed"]
    assert torch.float32 in k.dtypes and not ck.bit_identical(k, torch.float32)
    w13, w2 = weights(torch.float32, 11)
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(12))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        full = k.run(x, w13, w2)
        torch.testing.assert_close(full, ck.linear_swiglu(x, w13, w2), rtol=1e-5, atol=1e-5)
        # an independent computation: oneDNN's GEMM on weights packed here, SiLU written out
        p13 = torch.ops.mkldnn._reorder_linear_weight(w13.contiguous(), None)
        p2 = torch.ops.mkldnn._reorder_linear_weight(w2.contiguous(), None)
        gu = torch.ops.mkldnn._linear_pointwise(x, p13, None, "none", [], "")
        h = gu[:, :I] / (1 + torch.exp(-gu[:, :I])) * gu[:, I:]
        torch.testing.assert_close(full, torch.ops.mkldnn._linear_pointwise(h, p2, None, "none", [], ""),
                                   rtol=1e-6, atol=1e-6)
        for t in TOKENS[1:]:
            assert torch.equal(k.run(x[:t], w13, w2), full[:t]), t
        for i in range(0, 62, 7):
            assert torch.equal(k.run(x[i:i + 2], w13, w2), full[i:i + 2]), i
        ck.PACKED.clear()
        packs = ck.PACKED.packs
        for i in range(0, 64, 7):
            assert torch.equal(k.run(x[i:i + 1], w13, w2), ck.linear_swiglu(x[i:i + 1], w13, w2)), i
            assert torch.equal(ck.onednn_packed_mutable(x[i:i + 1], w13, w2), ck.linear_swiglu(x[i:i + 1], w13, w2))
        assert ck.PACKED.packs == packs
        torch.set_num_threads(2)
        assert torch.equal(k.run(x[:8], w13, w2), full[:8])
    finally:
        torch.set_num_threads(threads)
        ck.PACKED.clear()


def test_a_weight_rewritten_in_place_is_packed_again() -> None:
    """The packed cache follows the weights' version counter: a slot refilled by a copy (any view
    of its pool) is repacked at its next use and computes the new expert; an unchanged weight is
    packed once; an inference tensor (no version counter) is packed on every mutable call."""
    dtype = packed_dtype()
    a13, a2 = weights(dtype, 13)
    b13, b2 = weights(dtype, 14)
    pool13 = torch.stack([a13, a13])
    pool2 = torch.stack([a2, a2])
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(15)).to(dtype)
    cache = ck.PACKED
    cache.clear()
    packs = cache.packs
    first = ck.onednn_packed_mutable(x, pool13[0], pool2[0])
    assert torch.equal(ck.onednn_packed_mutable(x, pool13[0], pool2[0]), first) and cache.packs == packs + 2
    assert torch.equal(first, ck.onednn_packed(x, a13, a2))
    pool13[0].copy_(b13)   # a copy into the slot (as the executor's H2D on the cpu-as-gpu path)
    pool2[0].copy_(b2)
    again = ck.onednn_packed_mutable(x, pool13[0], pool2[0])
    assert torch.equal(again, ck.onednn_packed(x, b13, b2)) and not torch.equal(again, first)
    with torch.inference_mode():
        i13, i2 = a13.clone(), a2.clone()
        n = cache.packs
        y = ck.onednn_packed_mutable(x, i13, i2)
        i13.copy_(b13)
        i2.copy_(b2)
        assert torch.equal(ck.onednn_packed_mutable(x, i13, i2), ck.onednn_packed(x, b13, b2))
        assert cache.packs == n + 4 and torch.equal(y, first)
    cache.clear()


def test_packed_cache_keeps_its_weights_so_an_address_is_never_reused() -> None:
    """Packed copies are keyed by address: the cache holds the weights, so a new tensor can
    never land on a cached address and be served another tensor's packing."""
    dtype = packed_dtype()
    cache = ck.PackedWeights()
    w = torch.randn(8, 16).to(dtype)
    cache.get(w)
    ptr = w.data_ptr()
    del w
    others = [torch.randn(8, 16).to(dtype) for _ in range(50)]
    assert all(o.data_ptr() != ptr for o in others)
    x = torch.randn(3, 16).to(dtype)
    for o in others[:3]:
        got = torch.ops.mkldnn._linear_pointwise(x, cache.get(o), None, "none", [], "")
        assert torch.equal(got, torch.ops.mkldnn._linear_pointwise(x, ck.reorder(o), None, "none", [], ""))
        torch.testing.assert_close(got, F.linear(x, o), rtol=2e-2, atol=2e-2)


def test_compiled_kernel_runs_in_a_pool_thread() -> None:
    """torch.compile's kernel is used from the worker threads, not only the main thread."""
    import threading

    w13, w2 = weights(torch.float32, 8)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(9))
    got: list[torch.Tensor] = []
    th = threading.Thread(target=lambda: got.append(ck.KERNELS["compiled"].run(x, w13, w2)))
    th.start()
    th.join(timeout=300)
    torch.testing.assert_close(got[0], ck.linear_swiglu(x, w13, w2), rtol=1e-5, atol=1e-5)


def test_kt_kernel_is_found_without_loading_and_loading_keeps_ieee_denormals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asking whether kt-kernel is usable loads nothing; running it loads the extension, whose
    fast-math start-up sets flush-to-zero, and the backend puts denormals back."""
    from tidesim_runtime.engine import kt_backend

    monkeypatch.setattr(kt_backend.importlib.util, "find_spec", lambda name: None)
    path, _, reason = kt_backend.find_extension({"amx_bf16", "amx_tile", "avx512_bf16"})
    assert path == "" and "not installed" in reason
    monkeypatch.undo()
    if kt_backend.find_extension(kt_backend.cpu_flags())[0] == "":
        pytest.skip("kt-kernel is not installed here (optional)")
    assert kt_backend.denormals_kept()
    w13, w2 = weights(torch.bfloat16, 10)
    kt_backend.kt_swiglu(torch.randn(2, H).bfloat16(), w13, w2)
    assert kt_backend.BACKEND.ext is not None and kt_backend.denormals_kept()
