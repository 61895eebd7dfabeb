"""The runtime's kernels: grouped experts equal one SwiGLU per expert, the in-place on-demand
SwiGLU equals the plain one bit for bit, and the number of kernels one on-demand expert launches
(counted at torch's dispatcher on the CPU; on CUDA the profiler counts the GPU kernels)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.kernels import grouped_experts, swiglu, swiglu_into  # noqa: E402
from tidesim_runtime.engine.slots import ExpertBank  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]
ALLOCATIONS = {"aten::empty", "aten::empty_strided", "aten::empty_like"}
# one GEMM whichever name reaches the dispatcher (composite ops decompose differently by mode)
GEMMS = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm"}


class CountKernels(TorchDispatchMode):
    """Counts the operators that reach a backend kernel: views and bare allocations launch none."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name
        if not func.is_view and name not in ALLOCATIONS:
            self.ops.append("gemm" if name in GEMMS else name)
        return func(*args, **(kwargs or {}))


def count_kernels(fn) -> list[str]:  # type: ignore[no-untyped-def]
    with torch.inference_mode(), CountKernels() as counter:
        fn()
    return counter.ops


def test_grouped_experts_equals_one_swiglu_per_expert() -> None:
    gen = torch.Generator().manual_seed(0)
    bank = ExpertBank.empty(SPEC, 5, torch.device("cpu"), torch.float32)
    bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen))
    x = torch.randn(7, SPEC.hidden_size, generator=gen)
    counts, slots = [3, 0, 4], [4, 1, 2]
    y = grouped_experts(x, counts, slots, bank.w13, bank.w2, "loop")
    want = torch.cat([swiglu(x[:3], bank.w13[4], bank.w2[4]), swiglu(x[3:], bank.w13[2], bank.w2[2])])
    torch.testing.assert_close(y, want)




def test_swiglu_into_writes_swiglu_in_place_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    bank = ExpertBank.empty(SPEC, 2, torch.device("cpu"), torch.float32)
    bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen))
    x = torch.randn(9, SPEC.hidden_size, generator=gen)
    out = torch.zeros(12, SPEC.hidden_size)
    ret = swiglu_into(x[2:7], bank.w13[1], bank.w2[1], out[3:8])
    assert ret.data_ptr() == out[3:8].data_ptr()
    assert torch.equal(out[3:8], swiglu(x[2:7], bank.w13[1], bank.w2[1]))
    assert not out[:3].any() and not out[8:].any()


def test_on_demand_swiglu_launches_four_kernels_and_no_copy() -> None:
    gen = torch.Generator().manual_seed(2)
    bank = ExpertBank.empty(SPEC, 1, torch.device("cpu"), torch.float32)
    x = torch.randn(5, SPEC.hidden_size, generator=gen)
    out = torch.zeros(5, SPEC.hidden_size)
    ops = count_kernels(lambda: swiglu_into(x, bank.w13[0], bank.w2[0], out))
    assert ops == ["gemm", "aten::silu", "aten::mul", "gemm"]
    # the plain SwiGLU written into rows of an output buffer costs a copy more
    ops = count_kernels(lambda: out.copy_(swiglu(x, bank.w13[0], bank.w2[0])))
    assert len(ops) == 5 and ops[-1] == "aten::copy_"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_demand_swiglu_launches_four_gpu_kernels() -> None:
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    bank = ExpertBank.empty(SPEC, 1, dev, torch.bfloat16)
    x = torch.randn(5, SPEC.hidden_size, device=dev, dtype=torch.bfloat16)
    out = torch.zeros(5, SPEC.hidden_size, device=dev, dtype=torch.bfloat16)
    swiglu_into(x, bank.w13[0], bank.w2[0], out)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        swiglu_into(x, bank.w13[0], bank.w2[0], out)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    assert len(kernels) == 4, [e.name for e in kernels]
