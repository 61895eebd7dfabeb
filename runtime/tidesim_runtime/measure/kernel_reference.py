"""The plain decode a lossless check compares against, with the runtime's CPU expert kernel.

The runtime computes every CPU-side routed expert with the process's CPU expert kernel
(engine/cpu_kernels.py). Where that kernel computes the reference model's bits (`linear`, or a
kernel bit-identical to it in the run's dtype) the plain decode is the model's own expert loop.
Where a faster kernel changes the last bits (another accumulation order), the plain decode runs
its routed experts through the same kernel, so the check still asks for identical tokens: it
tests that every routed pair is computed once with its own weights, not which GEMM order ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import cast

import torch

from tidesim_runtime.engine import cpu_kernels, stream_backend
from tidesim_runtime.reference.model import MLP, LLaDA2Model, SparseMoeBlock, pairs_by_expert, run_experts_locally


def adjacent_w13(m: MLP) -> bool:
    """Whether the expert's up rows follow its gate rows in memory (host banks)."""
    g, u = m.gate_proj.weight.detach(), m.up_proj.weight.detach()
    return g.is_contiguous() and u.is_contiguous() and u.data_ptr() == g.data_ptr() + g.numel() * g.element_size()


def fused_w13(m: MLP) -> torch.Tensor:
    """The expert's gate rows then up rows as one [2I, H] matrix: a view where they are adjacent
    in memory (host banks, deploy.bind_host_experts), else a copy."""
    g, u = m.gate_proj.weight.detach(), m.up_proj.weight.detach()
    if adjacent_w13(m):
        return g.as_strided((2 * g.shape[0], g.shape[1]), (g.shape[1], 1))
    return torch.cat([g, u])


def kernel_expert(experts: torch.nn.ModuleList, kernel: cpu_kernels.CpuKernel
                  ) -> Callable[[int, torch.Tensor], torch.Tensor]:
    def run(e: int, x: torch.Tensor) -> torch.Tensor:
        m = cast(MLP, experts[e])
        return kernel.run(x, fused_w13(m), m.down_proj.weight.detach())
    return run


def run_experts_listed(block: SparseMoeBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                       kernel: cpu_kernels.CpuKernel) -> torch.Tensor:
    """run_experts_locally(expert=kernel_expert(block.experts, kernel)) with avx2-stream's experts
    computed as one list (stream_backend.ExpertBatch, an OpenMP team over experts at torch's
    thread count) instead of one call each; the same rows in, the same per-expert function, and
    the same weighting and index_add_ in expert order afterwards, so the same bits. Experts above
    the kernel's token limit, or with gate and up rows apart, run one call each as before."""
    out = torch.zeros_like(x, dtype=torch.float32)
    counts, token_of, weight_of = pairs_by_expert(idx, w, len(block.experts))
    xs = x[token_of]                       # every pair's token, expert by expert
    ys = torch.empty_like(xs)
    starts = [0, *itertools.accumulate(counts)]
    # in the list: experts whose gate and up rows are adjacent (the bank-bound model of generate);
    # fusing the others copies their weights, and copies of every listed expert at once cost more
    # memory traffic than the list saves (measured: performance.md), so those run one call each
    listed = [e for e, n in enumerate(counts)
              if n and stream_backend.runs_kernel(x.dtype, n) and adjacent_w13(cast(MLP, block.experts[e]))]
    alone = set(e for e, n in enumerate(counts) if n) - set(listed)
    if listed:
        weights = [(fused_w13(cast(MLP, block.experts[e])), cast(MLP, block.experts[e]).down_proj.weight.detach())
                   for e in listed]
        stream_backend.expert_batch_of(xs, ys, weights, [starts[e] for e in listed],
                                       [starts[e + 1] for e in listed]).run()
    one = kernel_expert(block.experts, kernel)
    for e in sorted(alone):
        ys[starts[e]:starts[e + 1]] = one(e, xs[starts[e]:starts[e + 1]])
    for e, n in enumerate(counts):
        if n == 0:
            continue
        a = starts[e]
        y = ys[a:a + n].float() * weight_of[a:a + n, None]
        out.index_add_(0, token_of[a:a + n], y)
    return out.to(x.dtype)


def reference_rule(dtype: torch.dtype) -> str:
    """How the plain decode computes routed experts for a run in `dtype` (for summaries)."""
    kernel = cpu_kernels.current()
    if cpu_kernels.bit_identical(kernel, dtype):
        return f"CPU expert kernel {kernel.name} computes the reference model's bits; plain decode: the model's own"
    return (f"CPU expert kernel {kernel.name} changes the last bits of {str(dtype).replace('torch.', '')}; "
            "plain decode: the model's routed experts through the same kernel")


@contextmanager
def same_kernel_reference(model: LLaDA2Model) -> Iterator[None]:
    """Within the block, the model's routed experts run the current CPU expert kernel when it is
    not bit-identical to the model's own arithmetic in the model's dtype (else nothing changes)."""
    blocks = model.moe_blocks()
    kernel = cpu_kernels.current()
    dtype = cast(MLP, blocks[0][1].experts[0]).down_proj.weight.dtype if blocks else torch.float32
    if not blocks or cpu_kernels.bit_identical(kernel, dtype):
        yield
        return
    saved = [b.expert_runner for _, b in blocks]
    try:
        for _, b in blocks:
            b.expert_runner = (partial(run_experts_listed, kernel=kernel) if kernel.name == "avx2-stream"
                               else partial(run_experts_locally, expert=kernel_expert(b.experts, kernel)))
        yield
    finally:
        for (_, b), fn in zip(blocks, saved, strict=True):
            b.expert_runner = fn
