"""What each part of a hardware profile costs (seconds, vectorised over numpy arrays): an expert's
FFN on the GPU or on one CPU worker, a copy over PCIe, attention and the dense work on the GPU.

Measured curves are interpolated piecewise-linearly between measured points; outside them, or for
shapes never measured, a roofline with efficiency factors is used and the fallback is said as a
note (tidesim.notes), so extrapolation is never silent. Each function reads one part only (its
first argument), so a cache of its results is keyed by that part's content (part_digest).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tidesim.hardware_parts import US, CPUProfile, Curve, ExpertCurve, GPUProfile, PCIeProfile
from tidesim.models import ModelSpec
from tidesim.notes import note


# ----- experts ------------------------------------------------------------------------------------
def gpu_expert_time(gpu: GPUProfile, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One expert's FFN on the GPU for the given token counts, one kernel launch included."""
    roof = _roofline(tokens, spec, *gpu_expert_roof(gpu))
    return _from_curves(gpu.expert_ffn, tokens, spec, roof, "gpu.expert_ffn")


def gpu_expert_roof(gpu: GPUProfile) -> tuple[float, float, float]:
    """The GPU expert roofline's bandwidth (GB/s), GFLOP/s and overhead (us)."""
    return (gpu.mem_bandwidth_gbs * gpu.mem_efficiency, gpu.bf16_tflops * 1e3 * gpu.compute_efficiency,
            gpu.launch_overhead_us)


def cpu_expert_time(cpu: CPUProfile, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One expert's FFN on one CPU worker (cores / workers threads, bandwidth shared)."""
    roof = _roofline(tokens, spec, *cpu_expert_roof(cpu))
    return _from_curves(cpu.expert_ffn, tokens, spec, roof, "cpu.expert_ffn")


def cpu_expert_roof(cpu: CPUProfile) -> tuple[float, float, float]:
    """The CPU expert roofline's bandwidth (GB/s), GFLOP/s and overhead (us), per worker."""
    w = max(cpu.workers, 1)
    return (cpu.mem_bandwidth_gbs * cpu.mem_efficiency / w, cpu.gflops * cpu.compute_efficiency / w,
            cpu.task_overhead_us)


def cpu_expert_latency(cpu: CPUProfile, tokens: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One expert computed with the whole CPU (every worker's cores and DRAM bandwidth), the
    latency Fiddler profiles when it decides between the CPU and a copy."""
    return cpu_expert_time(cpu, tokens, spec) / max(cpu.workers, 1)


# ----- copies -------------------------------------------------------------------------------------
def h2d_time(pcie: PCIeProfile, nbytes: np.ndarray | float) -> np.ndarray:
    return _copy_time(pcie, nbytes, pcie.h2d, pcie.h2d_gbs, "pcie.h2d")


def d2h_time(pcie: PCIeProfile, nbytes: np.ndarray | float) -> np.ndarray:
    return _copy_time(pcie, nbytes, pcie.d2h, pcie.d2h_gbs, "pcie.d2h")


# ----- the GPU's fixed work -----------------------------------------------------------------------
def attention_time(gpu: GPUProfile, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """One layer's attention (fused QKV, scores, output projection) on the GPU."""
    tokens = np.asarray(tokens, dtype=float)
    context = np.asarray(context, dtype=float)
    measured = [a for a in gpu.attention if a.get("hidden") == spec.hidden_size
                and a.get("heads") == spec.num_heads and a.get("kv_heads") == spec.num_kv_heads]
    if measured:
        return _grid_time(measured[0], tokens, context, "gpu.attention")
    note(f"gpu.attention[{spec.name}]: roofline estimate (not measured)")
    h, kv, d, nh = spec.hidden_size, spec.num_kv_heads, spec.head_dim, spec.num_heads
    bpp = spec.bytes_per_param
    proj_params = h * (nh + 2 * kv) * d + nh * d * h
    flops = 2 * proj_params * tokens + 4 * nh * d * tokens * context
    nbytes = proj_params * bpp + 2 * kv * d * context * bpp + 2 * h * tokens * bpp
    return _gpu_roofline(gpu, flops, nbytes, launches=4)


def gpu_dense_time(gpu: GPUProfile, tokens: np.ndarray, params: int, spec: ModelSpec, launches: int = 1
                   ) -> np.ndarray:
    """A dense weight matrix set (shared expert, gate, dense MLP, lm_head) over `tokens`."""
    tokens = np.asarray(tokens, dtype=float)
    flops = 2.0 * params * tokens
    nbytes = params * spec.bytes_per_param + 2 * spec.hidden_size * tokens * spec.bytes_per_param
    return _gpu_roofline(gpu, flops, nbytes, launches=launches)


LAYER_SHAPE_KEYS = ("hidden", "heads", "kv_heads", "head_dim", "experts", "top_k", "shared_intermediate")


def layer_shape(spec: ModelSpec) -> dict[str, int]:
    """What a MoE layer's fixed path depends on besides tokens and context: the attention shape,
    the shared expert's width, the router's experts and the pairs per token. A gpu.layer_fixed
    grid applies to a model whose shape equals its keys."""
    values = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_experts, spec.top_k,
              spec.moe_intermediate_size * spec.num_shared_experts)
    return dict(zip(LAYER_SHAPE_KEYS, values, strict=True))


def gpu_layer_fixed_time(gpu: GPUProfile, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Per MoE layer, work that always runs on the GPU: norms and overhead, attention,
    shared expert and the gate. A measured grid of that whole path for the layer's shape
    (gpu.layer_fixed, what `tidesim calibrate` times on the executor's own code) is used where
    there is one; else the path is composed of the attention grid (or roofline), the shared
    expert's and gate's rooflines and the constant layer_overhead_us."""
    grid = layer_fixed_grid(gpu, spec)
    if grid is not None:
        return _grid_time(grid, np.asarray(tokens, dtype=float), np.asarray(context, dtype=float),
                          "gpu.layer_fixed")
    return composed_layer_fixed_time(gpu, tokens, context, spec)


def layer_fixed_grid(gpu: GPUProfile, spec: ModelSpec) -> dict[str, Any] | None:
    """The first measured gpu.layer_fixed grid whose shape keys equal the model's layer_shape."""
    shape = layer_shape(spec)
    return next((g for g in gpu.layer_fixed if all(g.get(k) == v for k, v in shape.items())), None)


def composed_layer_fixed_time(gpu: GPUProfile, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec
                              ) -> np.ndarray:
    """The fixed path composed of its parts: attention, the shared expert's and the gate's
    rooflines, and the constant layer_overhead_us (calibrate fits that constant against this)."""
    shared = gpu_dense_time(gpu, tokens, spec.shared_expert_params, spec, launches=3)
    gate = gpu_dense_time(gpu, tokens, spec.gate_params, spec, launches=2)
    return attention_time(gpu, tokens, context, spec) + shared + gate + gpu.layer_overhead_us * US


def gpu_forward_fixed_time(gpu: GPUProfile, tokens: np.ndarray, context: np.ndarray, spec: ModelSpec
                           ) -> np.ndarray:
    """Per forward, GPU work outside the MoE layers: dense layers (with their attention),
    embedding lookup and lm_head."""
    dense = spec.first_dense_layers * (
        attention_time(gpu, tokens, context, spec)
        + gpu_dense_time(gpu, tokens, spec.dense_mlp_params, spec, launches=3)
        + gpu.layer_overhead_us * US
    )
    head = gpu_dense_time(gpu, tokens, spec.vocab_size * spec.hidden_size, spec, launches=2)
    return dense + head


# ----- helpers ------------------------------------------------------------------------------------
def _gpu_roofline(gpu: GPUProfile, flops: np.ndarray, nbytes: np.ndarray, launches: int) -> np.ndarray:
    compute = flops / (gpu.bf16_tflops * 1e12 * gpu.compute_efficiency)
    memory = nbytes / (gpu.mem_bandwidth_gbs * 1e9 * gpu.mem_efficiency)
    return np.maximum(compute, memory) + launches * gpu.launch_overhead_us * US


def _roofline(tokens: np.ndarray, spec: ModelSpec, gbs: float, gflops: float, overhead_us: float) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=float)
    memory = spec.expert_bytes / (gbs * 1e9)
    compute = tokens * spec.expert_flops_per_token / (gflops * 1e9)
    return np.maximum(memory, compute) + overhead_us * US


def _from_curves(curves: list[ExpertCurve], tokens: np.ndarray, spec: ModelSpec, roofline: np.ndarray,
                 where: str) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=float)
    match = [c for c in curves if c.matches(spec)]
    if not match:
        note(f"{where}[{spec.hidden_size}x{spec.moe_intermediate_size}]: roofline estimate (shape not measured)")
        return roofline
    curve = match[0].curve
    measured, outside = curve.interpolate(tokens)
    if not outside.any():
        return measured
    note(f"{where}[{spec.hidden_size}x{spec.moe_intermediate_size}]: tokens outside the "
         f"measured {curve.x[0]:g}..{curve.x[-1]:g}, roofline scaled to the nearest point")
    xs = np.asarray(curve.x, dtype=float)
    edge = np.where(tokens > xs[-1], xs[-1], xs[0])
    edge_roof = _roofline(edge, spec, 1.0, 1.0, 0.0)
    here_roof = _roofline(tokens, spec, 1.0, 1.0, 0.0)
    edge_measured, _ = curve.interpolate(edge)
    scaled = edge_measured * here_roof / np.maximum(edge_roof, 1e-30)
    return np.where(outside, scaled, measured)


def _copy_time(pcie: PCIeProfile, nbytes: np.ndarray | float, curve: Curve | None, gbs: float, where: str
               ) -> np.ndarray:
    nbytes = np.asarray(nbytes, dtype=float)
    linear = pcie.copy_overhead_us * US + nbytes / (gbs * 1e9)
    linear = np.where(nbytes > 0, linear, 0.0)
    if curve is None:
        return linear
    measured, outside = curve.interpolate(nbytes)
    outside &= nbytes > 0          # an empty copy costs nothing: never an extrapolation
    if outside.any():
        note(f"{where}: sizes outside the measured {curve.x[0]:g}..{curve.x[-1]:g} bytes, bandwidth model used")
    return np.where(nbytes > 0, np.where(outside, linear, measured), 0.0)


def _grid_time(grid: dict[str, Any], tokens: np.ndarray, context: np.ndarray, where: str) -> np.ndarray:
    """Piecewise-linear in a measured (tokens x context) grid: in tokens held at the grid's edges
    outside it, in context extended linearly beyond its last point and held below its first; a
    note says when either was outside."""
    tk = np.asarray(grid["tokens"], dtype=float)
    cx = np.asarray(grid["context"], dtype=float)
    table = np.asarray(grid["time_us"], dtype=float) * US  # [len(tk), len(cx)]
    if ((tokens < tk[0]) | (tokens > tk[-1]) | (context < cx[0]) | (context > cx[-1])).any():
        note(f"{where}: tokens or context outside the measured grid, clamped linear")
    per_ctx = np.stack([np.interp(tokens, tk, table[:, j]) for j in range(len(cx))], axis=-1)
    idx = np.clip(np.searchsorted(cx, context) - 1, 0, max(len(cx) - 2, 0))
    if len(cx) == 1:
        return per_ctx[..., 0]
    lo, hi = cx[idx], cx[idx + 1]
    frac = np.clip((context - lo) / (hi - lo), 0.0, None)
    a = np.take_along_axis(per_ctx, idx[..., None], axis=-1)[..., 0]
    b = np.take_along_axis(per_ctx, (idx + 1)[..., None], axis=-1)[..., 0]
    return a + (b - a) * frac
