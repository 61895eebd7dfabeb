"""The lossless check's plain decode (runtime/tidesim_runtime/measure/kernel_reference.py): the
model's own experts where the CPU kernel computes their bits, the same kernel where it does not."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runtime_cases import SPEC  # noqa: E402
from tidesim_runtime.engine import cpu_kernels as ck  # noqa: E402
from tidesim_runtime.measure.kernel_reference import fused_w13, reference_rule, same_kernel_reference  # noqa: E402
from tidesim_runtime.reference.model import MLP, build_model, run_experts_locally  # noqa: E402


@pytest.fixture()
def kernel():  # type: ignore[no-untyped-def]
    before = ck.current().name
    yield ck.use
    ck.use(before)


def block_output(model, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    _, block = model.moe_blocks()[0]
    with torch.inference_mode():
        return block(x)


def test_linear_kernel_leaves_the_model_alone_and_weights_left_runs_its_own_arithmetic(kernel) -> None:  # type: ignore[no-untyped-def]
    model = build_model(SPEC, seed=0)
    _, block = model.moe_blocks()[0]
    x = torch.randn(6, SPEC.hidden_size, generator=torch.Generator().manual_seed(0))
    own = block_output(model, x)
    kernel("linear")
    with same_kernel_reference(model):
        assert block.expert_runner is run_experts_locally
        assert torch.equal(block_output(model, x), own)
    assert "computes the reference model's bits" in reference_rule(torch.float32)
    kernel("weights-left")
    with same_kernel_reference(model):
        assert block.expert_runner is not run_experts_locally
        via_kernel = block_output(model, x)
    assert block.expert_runner is run_experts_locally   # restored
    assert "changes the last bits of float32" in reference_rule(torch.float32)
    # the same routed sum with every expert through weights-left, computed here from the weights
    with torch.inference_mode():
        flat = x.reshape(-1, SPEC.hidden_size)
        idx, w, _ = block.gate(flat)
        want = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for j in range(idx.shape[1]):
                m = block.experts[int(idx[t, j])]
                y = ck.weights_left(flat[t:t + 1], torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                                    m.down_proj.weight)
                want[t] += y[0] * w[t, j]
        want = want + block.shared_experts(flat)
    torch.testing.assert_close(via_kernel, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_kernel, own, rtol=1e-4, atol=1e-4)


def test_fused_w13_is_a_view_over_adjacent_rows_and_a_copy_otherwise() -> None:
    bank = torch.randn(2 * 8, 4)
    m = MLP(4, 8, torch.float32)
    m.gate_proj.weight.data = bank[:8]
    m.up_proj.weight.data = bank[8:]
    v = fused_w13(m)
    assert v.data_ptr() == bank.data_ptr() and torch.equal(v, bank)
    apart = MLP(4, 8, torch.float32)
    c = fused_w13(apart)
    assert torch.equal(c, torch.cat([apart.gate_proj.weight, apart.up_proj.weight]))


@pytest.mark.parametrize("name", ["weights-left", "onednn-packed"])
def test_live_decode_with_a_kernel_that_changes_float32_bits_is_lossless_against_the_same_kernel(
        kernel, name: str) -> None:  # type: ignore[no-untyped-def]
    """End to end: a live decode (executor: resident experts, CPU pool, copies) with a kernel that
    does not compute linear's float32 bits gives exactly the tokens of the plain decode through
    the same kernel; onednn-packed runs on slots that tide's copies refill (repacked each time)."""
    from tidesim_runtime.engine.device import select_device
    from tidesim_runtime.measure.live import lossless_check
    from tidesim_runtime.reference.generate import DecodeConfig

    from tidesim.hardware import get_profile
    from tidesim.policies import PolicyOptions, uniform

    model = build_model(SPEC, seed=0)
    L = SPEC.num_moe_layers
    opts = PolicyOptions(budget=uniform(5, L), tau=uniform(2, L), hw=get_profile("h100-sxm-pcie5"))
    if ck.KERNELS[name].why_not_dtype(torch.float32):
        pytest.skip(ck.KERNELS[name].why_not_dtype(torch.float32))
    kernel(name)
    packs = ck.PACKED.packs
    assert not ck.bit_identical(ck.current(), torch.float32)
    result = lossless_check(model, [5, 17, 42, 99, 7, 3], DecodeConfig(gen_length=8, block_length=8),
                            "tide", opts, select_device("cpu"))
    assert result.identical, result.problems
    assert result.metrics is not None and result.metrics.cpu_tokens > 0 and result.metrics.gpu_tokens > 0
    assert result.metrics.expert_copies > 0   # slots were refilled while the kernel ran on them
    assert (ck.PACKED.packs > packs) == (name == "onednn-packed")
    ck.PACKED.clear()
