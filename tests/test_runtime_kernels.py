"""The runtime's kernels: grouped experts (slots in any order, both implementations) equal one
SwiGLU per expert, the combine adds in the reference model's order bit for bit, the in-place on-demand
SwiGLU equals the plain one bit for bit, and the number of kernels one on-demand expert launches
(counted at torch's dispatcher on the CPU; on CUDA the profiler counts the GPU kernels)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.kernels import (  # noqa: E402
    combine_index,
    combine_pairs,
    grouped_experts,
    pair_rows,
    slot_order,
    swiglu,
    swiglu_into,
)
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


def grouped_case(dtype: torch.dtype):  # type: ignore[no-untyped-def]
    """Five experts in a pool of six slots, out of slot order, one without tokens."""
    gen = torch.Generator().manual_seed(0)
    bank = ExpertBank.empty(SPEC, 6, torch.device("cpu"), dtype)
    bank.flat.copy_(torch.randn(bank.flat.shape, generator=gen) * 0.2)
    counts = np.array([3, 0, 4, 1, 2], dtype=np.int64)
    offs = np.concatenate([[0], np.cumsum(counts)])
    x = torch.randn(int(offs[-1]), SPEC.hidden_size, generator=gen).to(dtype)
    experts = np.array([0, 1, 2, 3, 4])
    slots = np.array([4, 1, 5, 0, 2])        # a refreshed pool: slot order is not expert order
    want = torch.zeros_like(x)
    for e, s in zip(experts, slots, strict=True):
        a, b = offs[e], offs[e + 1]
        if b > a:
            want[a:b] = swiglu(x[a:b], bank.w13[s], bank.w2[s])
    return bank, offs, x, experts, slots, want


def test_slot_order_sorts_groups_by_slot_with_their_rows() -> None:
    offs = np.array([0, 3, 3, 7, 8, 10])
    e, s, counts, rows = slot_order(offs, np.array([0, 1, 2, 3, 4]), np.array([4, 1, 5, 0, 2]))
    assert e.tolist() == [3, 1, 4, 0, 2] and s.tolist() == [0, 1, 2, 4, 5]
    assert counts.tolist() == [1, 0, 2, 3, 4]
    assert rows.tolist() == [7, 8, 9, 0, 1, 2, 3, 4, 5, 6]
    assert pair_rows(np.array([5, 0]), np.array([2, 1])).tolist() == [5, 6, 0]


def test_grouped_path_out_of_slot_order_equals_one_swiglu_per_expert() -> None:
    bank, offs, x, experts, slots, want = grouped_case(torch.float32)
    y = torch.full_like(x, float("nan"))
    grouped_experts(x, y, offs, experts, slots, bank.w13, bank.w2, "loop", torch.from_numpy)
    assert torch.equal(y, want)      # in place, per expert: the same kernels bit for bit


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without grouped_mm")
def test_grouped_mm_path_out_of_slot_order_equals_one_swiglu_per_expert() -> None:
    """The CUDA path's index building, offsets, gather and scatter, run with torch's grouped GEMM
    on the CPU (bf16, as on the GPU): same rows as the per-expert reference."""
    bank, offs, x, experts, slots, want = grouped_case(torch.bfloat16)
    y = torch.full_like(x, float("nan"))
    staged: list[int] = []

    def to_device(a: np.ndarray) -> torch.Tensor:
        staged.append(a.size)
        return torch.from_numpy(a)

    grouped_experts(x, y, offs, experts, slots, bank.w13, bank.w2, "grouped_mm", to_device)
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert staged == [int(offs[-1]) + 6]     # rows and per-slot offsets in ONE transfer


def test_combine_adds_each_tokens_pairs_in_expert_order_bit_for_bit() -> None:
    """combine_pairs equals the reference model's loop (index_add_ expert by expert in float32)."""
    gen = torch.Generator().manual_seed(4)
    tokens, k, experts = 7, 3, 6
    idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=gen)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    y = torch.randn(flat.numel(), SPEC.hidden_size, generator=gen) * 1e3
    want = torch.zeros(tokens, SPEC.hidden_size)
    offs = np.concatenate([[0], np.cumsum(torch.bincount(flat, minlength=experts).numpy())])
    for e in range(experts):
        a, b = offs[e], offs[e + 1]
        want.index_add_(0, tok[a:b], y[a:b] * w.reshape(-1)[order][a:b, None])
    index = torch.from_numpy(combine_index(tok.numpy(), tokens))
    got = combine_pairs(y, w.reshape(-1)[order], index, SPEC.hidden_size)
    assert torch.equal(got, want)
    assert index.shape == (tokens, k)
    # a token with fewer pairs is padded with the zero row
    short = combine_index(np.array([0, 1, 0]), 3)
    assert short.tolist() == [[0, 2], [1, 3], [3, 3]]


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
