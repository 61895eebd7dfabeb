"""The compute kernels of the runtime: the executor runs them and `tidesim calibrate` times them.

Keeping one implementation for both is what makes a calibrated profile describe the executor:
every cost the simulator charges (expert FFN, grouped experts, attention, dense weights, the
per-layer fixed work) is measured on exactly the code that later runs the Schedule.

Weight layouts follow nn.Linear ([out, in]): an expert is w13 [2 x inter, hidden] (gate rows
then up rows, fused so one GEMM computes both) and w2 [hidden, inter].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tidesim.models import ModelSpec
from tidesim_runtime.engine import stream_backend
from tidesim_runtime.engine.cpu_kernels import cpu_swiglu, cpu_swiglu_into, for_weights, linear_into, linear_swiglu


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with gate and up fused in w13. On the CPU: the process's CPU
    expert kernel (engine/cpu_kernels.py), so every CPU-side expert runs the same arithmetic."""
    if x.device.type == "cpu":
        return cpu_swiglu(x, w13, w2)
    return linear_swiglu(x, w13, w2)


def swiglu_into(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """swiglu(x, w13, w2) written into `out` (contiguous rows): four kernels (gate/up GEMM, SiLU,
    product, down GEMM) and no copy. The on-demand path, where every launch is paid per expert."""
    if x.device.type == "cpu":
        return cpu_swiglu_into(x, w13, w2, out)
    return linear_into(x, w13, w2, out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def grouped_impl(device: torch.device, dtype: torch.dtype) -> str:
    """"grouped_mm" (one kernel per projection for all experts of a layer) where torch has a
    native grouped GEMM (CUDA, bf16, compute capability 8.0+); "loop" otherwise.

    On the CPU, torch's grouped_mm is a loop with a fixed cost per group, empty groups included,
    so a plain loop over the experts that have tokens is faster and is what runs.
    """
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(F, "grouped_mm"):
        return "loop"
    major, _ = torch.cuda.get_device_capability(device)
    return "grouped_mm" if major >= 8 else "loop"


def pair_rows(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The rows start[i] .. start[i] + counts[i] - 1 of every group i, concatenated (int64): one
    numpy expression, no loop over the groups."""
    starts = np.asarray(starts, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(int(ends[-1]) if ends.size else 0, dtype=np.int64) + np.repeat(starts - (ends - counts), counts)


def slot_order(offs: np.ndarray, experts: np.ndarray, slots: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The grouped experts sorted by slot (grouped_mm takes its groups in slot order, while a
    refreshed pool holds experts in any order): (experts, slots, counts, rows), where rows are
    the experts' pair rows (offs: pair offsets per expert), slot by slot."""
    experts = np.asarray(experts, dtype=np.int64)
    slots = np.asarray(slots, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    e, s = experts[order], slots[order]
    starts = np.asarray(offs, dtype=np.int64)[e]
    counts = np.asarray(offs, dtype=np.int64)[e + 1] - starts
    return e, s, counts, pair_rows(starts, counts)


ToDevice = Callable[[np.ndarray], torch.Tensor]


def grouped_experts(x_sorted: torch.Tensor, y_sorted: torch.Tensor, offs: np.ndarray, experts: np.ndarray,
                    slots: np.ndarray, w13_pool: torch.Tensor, w2_pool: torch.Tensor, impl: str,
                    to_device: ToDevice) -> None:
    """SwiGLU of every expert resident at the gate, from its pair rows of `x_sorted` into the same
    rows of `y_sorted` (offs: pair offsets per expert; experts[i] lives in slot slots[i], in any
    slot order). The executor and calibrate both call this, so the profile's grouped charge
    includes the index building, the gather and the scatter.

    "grouped_mm": the rows are put in slot order with one gather, the whole pool runs as two
    grouped GEMMs and one elementwise kernel with per-slot offsets (slots without tokens are empty
    groups), and one scatter writes the rows back; the row index and the offsets travel to the
    device in one asynchronous copy (`to_device`: a pinned staging buffer), so the host never
    blocks. "loop": each expert with tokens computes its rows in place (swiglu_into), no gather;
    on device cpu with avx2-stream, those within its token limit as one foreign call
    (stream_backend.ExpertBatch: the same bits, no wrapper cost per expert).
    """
    e, s, counts, rows = slot_order(offs, experts, slots)
    n = int(rows.size)
    if n == 0:
        return
    if impl == "grouped_mm":
        per_slot = np.zeros(w13_pool.shape[0], dtype=np.int64)
        per_slot[s] = counts
        idx = to_device(np.concatenate([rows, np.cumsum(per_slot)]))
        pos, slot_offs = idx[:n], idx[n:].to(torch.int32)
        xs = x_sorted.index_select(0, pos)
        gu = F.grouped_mm(xs, w13_pool.transpose(-2, -1), offs=slot_offs)
        inter = w2_pool.shape[2]
        h = F.silu(gu[:, :inter]) * gu[:, inter:]
        y_sorted.index_copy_(0, pos, F.grouped_mm(h, w2_pool.transpose(-2, -1), offs=slot_offs))
        return
    starts = np.asarray(offs, dtype=np.int64)[e]
    if x_sorted.device.type == "cpu" and for_weights(x_sorted.dtype, fixed=False).name == "avx2-stream":
        listed = (counts > 0) & np.array([stream_backend.runs_kernel(x_sorted.dtype, c) for c in counts.tolist()],
                                         dtype=bool)
        if listed.any():
            batch = stream_backend.expert_batch_or_none(x_sorted, y_sorted, w13_pool, w2_pool, s[listed],
                                                        starts[listed], starts[listed] + counts[listed])
            if batch is not None:
                batch.run()
                counts = np.where(listed, 0, counts)
    for a, c, sl in zip(starts.tolist(), counts.tolist(), s.tolist(), strict=True):
        if c:
            swiglu_into(x_sorted[a:a + c], w13_pool[sl], w2_pool[sl], y_sorted[a:a + c])


def combine_index(tokens: np.ndarray, num_tokens: int) -> np.ndarray:
    """[tokens, k_max] pair indices of each token, in pair order (so in expert order), padded
    with P (a zero row): the fixed summation order of combine_pairs."""
    tokens = np.asarray(tokens, dtype=np.int64)
    pairs = int(tokens.size)
    per = np.bincount(tokens, minlength=num_tokens) if pairs else np.zeros(num_tokens, np.int64)
    k_max = int(per.max(initial=0))
    out = np.full((num_tokens, max(k_max, 1)), pairs, dtype=np.int64)
    order = np.argsort(tokens, kind="stable")
    col = np.arange(pairs, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    out[tokens[order], col] = order
    return out


def combine_pairs(y_sorted: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, hidden: int) -> torch.Tensor:
    """Weighted sum of every token's routed outputs in float32 [tokens, hidden], added in a fixed
    order: for each token its pairs in pair order (index from combine_index), one column at a
    time. That is the reference model's order (expert by expert) and, unlike index_add_ with
    repeated tokens (atomics on a GPU), the same bits on every run and device kind."""
    pairs = y_sorted.shape[0]
    yw = torch.zeros((pairs + 1, hidden), dtype=torch.float32, device=y_sorted.device)
    torch.mul(y_sorted.float(), weights.float()[:, None], out=yw[:pairs])
    g = yw[index]
    out = g[:, 0].clone()
    for j in range(1, index.shape[1]):
        out += g[:, j]
    return out


@dataclass
class LayerWeights:
    """The GPU-side weights of one MoE layer (everything but the routed experts)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    w_qkv: torch.Tensor           # [(heads + 2 kv_heads) x head_dim, hidden]
    w_o: torch.Tensor             # [hidden, heads x head_dim]
    q_norm: torch.Tensor          # [head_dim]
    k_norm: torch.Tensor
    shared_w13: torch.Tensor | None
    shared_w2: torch.Tensor | None
    gate_w: torch.Tensor          # [experts, hidden] float32 (the router runs in fp32)
    gate_bias: torch.Tensor       # [experts] float32
    mlp_w13: torch.Tensor | None = None   # dense layers only
    mlp_w2: torch.Tensor | None = None


def random_matrix(rows: int, cols: int, gen: torch.Generator, device: torch.device, dtype: torch.dtype
                  ) -> torch.Tensor:
    """A [rows, cols] matrix with entries of scale 1/sqrt(cols): at most 64 random rows, tiled.

    Timing depends on shapes, not values, and drawing hundreds of millions of normals (an lm_head)
    would take longer than the run itself.
    """
    block = torch.randn(min(rows, 64), cols, generator=gen) / math.sqrt(cols)
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    reps = -(-rows // block.shape[0])
    for i in range(reps):
        a = i * block.shape[0]
        b = min(rows, a + block.shape[0])
        out[a:b] = block[: b - a].to(device=device, dtype=dtype)
    return out


def random_layer_weights(spec: ModelSpec, device: torch.device, dtype: torch.dtype, gen: torch.Generator,
                         dense: bool = False) -> LayerWeights:
    """Random weights of one layer with the spec's shapes (values only need to be finite)."""
    h, d = spec.hidden_size, spec.head_dim

    def mat(rows: int, cols: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return random_matrix(rows, cols, gen, device, dt)

    inter_shared = spec.moe_intermediate_size * spec.num_shared_experts
    ones = torch.ones(h, device=device, dtype=dtype)
    return LayerWeights(
        input_norm=ones, post_norm=ones.clone(),
        w_qkv=mat((spec.num_heads + 2 * spec.num_kv_heads) * d, h), w_o=mat(h, spec.num_heads * d),
        q_norm=torch.ones(d, device=device, dtype=dtype), k_norm=torch.ones(d, device=device, dtype=dtype),
        shared_w13=mat(2 * inter_shared, h) if inter_shared and not dense else None,
        shared_w2=mat(h, inter_shared) if inter_shared and not dense else None,
        gate_w=mat(spec.num_experts, h, torch.float32) if not dense else torch.zeros(0, h, device=device),
        gate_bias=torch.zeros(spec.num_experts if not dense else 0, device=device),
        mlp_w13=mat(2 * spec.dense_intermediate_size, h) if dense else None,
        mlp_w2=mat(h, spec.dense_intermediate_size) if dense else None,
    )


class KVBuffer:
    """Preallocated keys and values of one layer for up to `capacity` positions."""

    def __init__(self, spec: ModelSpec, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (1, spec.num_kv_heads, max(capacity, 1), spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])


def rotary_tables(spec: ModelSpec, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, rotary_dim] (half-split layout) for the partial rotary embedding."""
    rd = int(spec.head_dim * spec.partial_rotary_factor) // 2 * 2
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, max(rd, 2), 2, dtype=torch.float64) / max(rd, 2)))
    ang = torch.arange(max(positions, 1), dtype=torch.float64)[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)[:, :rd]
    return ang.cos().float().to(device), ang.sin().float().to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    if rd == 0:
        return x
    rot = x[..., :rd]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([(rot * cos + rotated * sin).to(x.dtype), x[..., rd:]], dim=-1)


def attention(x: torch.Tensor, lw: LayerWeights, kv: KVBuffer, context: int, spec: ModelSpec,
              cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One layer's attention for x [tokens, hidden] over `context` keys (the last `tokens` of them
    are x's own): fused QKV, qk RMSNorm, partial rotary, grouped-query SDPA, output projection.

    No block mask: every query sees all `context` keys. The FLOPs are the same as with the
    block-causal mask up to the masked share, and the trace's `context` is the keys per query.
    """
    t = x.shape[0]
    ctx = max(min(context, kv.capacity), t)
    nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    qkv = F.linear(x, lw.w_qkv).view(t, nh + 2 * nkv, d)
    q, k, v = qkv.split([nh, nkv, nkv], dim=1)
    q = rms_norm(q, lw.q_norm, spec.rms_norm_eps)
    k = rms_norm(k, lw.k_norm, spec.rms_norm_eps)
    c, s = cos[ctx - t:ctx, None, :], sin[ctx - t:ctx, None, :]
    q, k = _rotate(q, c, s), _rotate(k, c, s)
    kv.k[0, :, ctx - t:ctx] = k.transpose(0, 1)
    kv.v[0, :, ctx - t:ctx] = v.transpose(0, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kv.k[:, :, :ctx], kv.v[:, :, :ctx],
                                         enable_gqa=True)
    return F.linear(out[0].transpose(0, 1).reshape(t, nh * d), lw.w_o)


def gate_logits(x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
    """Router logits in float32 [tokens, experts]."""
    return F.linear(x.float(), lw.gate_w)


def layer_front(x: torch.Tensor, lw: LayerWeights, kv: KVBuffer, context: int, spec: ModelSpec,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed GPU work of one MoE layer before its experts: norm, attention, residual, norm,
    shared expert, router. Returns (residual stream, normed MoE input, shared-expert output +
    residual) and leaves the router logits for `route_counts`."""
    h = x + attention(rms_norm(x, lw.input_norm, spec.rms_norm_eps), lw, kv, context, spec, cos, sin)
    moe_in = rms_norm(h, lw.post_norm, spec.rms_norm_eps)
    base = h
    if lw.shared_w13 is not None and lw.shared_w2 is not None:
        base = h + swiglu(moe_in, lw.shared_w13, lw.shared_w2)
    return h, moe_in, base


def dense_layer(x: torch.Tensor, lw: LayerWeights, kv: KVBuffer, context: int, spec: ModelSpec,
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """A dense (non-MoE) decoder layer: attention and the dense SwiGLU MLP."""
    assert lw.mlp_w13 is not None and lw.mlp_w2 is not None
    h = x + attention(rms_norm(x, lw.input_norm, spec.rms_norm_eps), lw, kv, context, spec, cos, sin)
    return h + swiglu(rms_norm(h, lw.post_norm, spec.rms_norm_eps), lw.mlp_w13, lw.mlp_w2)
