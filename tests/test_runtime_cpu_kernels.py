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
            if dtype in k.identical_to_linear:
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
    assert torch.float32 not in ck.KERNELS["weights-left"].identical_to_linear
    assert not ck.bit_identical(ck.KERNELS["weights-left"], torch.float32)
    assert ck.bit_identical(ck.KERNELS["weights-left"], torch.bfloat16)
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
    with pytest.raises(InputError, match="runs bfloat16 weights only.*float32"):
        ck.check_kernel("onednn-packed", torch.float32)
    monkeypatch.setattr(ck.kt_backend, "available", lambda: (False, "kt-kernel is not installed"))
    kt = ck.CpuKernel("kt-kernel", ck.kt_backend.kt_swiglu, ck.BF16, frozenset(), "", usable=ck.kt_backend.available)
    monkeypatch.setitem(ck.KERNELS, "kt-kernel", kt)
    with pytest.raises(InputError, match="cannot run here: kt-kernel is not installed"):
        ck.check_kernel("kt-kernel", torch.bfloat16)


def test_the_pool_runs_the_selected_kernel_and_slots_never_get_a_weight_cache() -> None:
    """The worker pool's task body runs the current kernel on the host banks (fixed weights);
    SwiGLU on weights that may change (slots) falls back to linear for a kernel that caches
    packed weights."""
    w13, w2 = weights(torch.bfloat16, 6)
    x = torch.randn(4, H, generator=torch.Generator().manual_seed(7)).bfloat16()
    before = ck.current().name
    try:
        ck.use("onednn-packed")
        assert ck.for_weights(torch.bfloat16, fixed=True).name == "onednn-packed"
        assert ck.for_weights(torch.bfloat16, fixed=False).name == "linear"
        assert ck.for_weights(torch.float32, fixed=True).name == "linear"   # cannot run float32
        out = torch.empty(4, H, dtype=torch.bfloat16)
        expert_task_runner(x, out, w13[None], w2[None])(ExpertTask(0, 0, 4))
        assert torch.equal(out, ck.onednn_packed(x, w13, w2))
        ck.use("weights-left")
        assert ck.for_weights(torch.float32, fixed=False).name == "weights-left"
    finally:
        ck.use(before)
        ck.PACKED.clear()


def test_packed_cache_keeps_its_weights_so_an_address_is_never_reused() -> None:
    """Packed copies are keyed by address: the cache holds the weights, so a new tensor can
    never land on a cached address and be served another tensor's packing."""
    cache = ck.PackedWeights()
    w = torch.randn(8, 16).bfloat16()
    cache.get(w)
    ptr = w.data_ptr()
    del w
    others = [torch.randn(8, 16).bfloat16() for _ in range(50)]
    assert all(o.data_ptr() != ptr for o in others)
    x = torch.randn(3, 16).bfloat16()
    for o in others[:3]:
        got = torch.ops.mkldnn._linear_pointwise(x, cache.get(o), None, "none", [], "")
        assert torch.equal(got, F.linear(x, o))


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
