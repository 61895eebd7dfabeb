"""Shared test kit for the simulator tests: a tiny model, a hardware profile with round numbers
(milliseconds), workloads and hand-built schedules."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tidesim.hardware import (
    CPUProfile,
    Curve,
    ExpertCurve,
    GPUProfile,
    HardwareProfile,
    PCIeProfile,
    Provenance,
)
from tidesim.models import ModelSpec
from tidesim.schedule import COPY_ON_DEMAND, CPU, GPU, Schedule
from tidesim.trace.schema import Trace, TraceMeta
from tidesim.workload import Workload, workload_from_trace

MS = 1e-3

# 2 MoE layers (layer 0 dense), 4 experts; expert = 3 x 16 x 8 float32 = 1536 B; activation 64 B/token
SPEC = ModelSpec(name="t2x4", num_layers=3, first_dense_layers=1, hidden_size=16, dense_intermediate_size=8,
                 moe_intermediate_size=8, num_experts=4, top_k=2, num_shared_experts=1, num_heads=2,
                 num_kv_heads=1, head_dim=8, vocab_size=16, n_group=1, topk_group=1, dtype="float32")


def profile(workers: int = 1, engines: int = 2, gbs: float = 0.000512, slows: float = 0.0) -> HardwareProfile:
    """Round numbers: 1 ms fixed GPU work per layer (dense layer 0 and each MoE layer), everything
    else on the GPU free (huge roofline), GPU expert 0.5 + 0.1 t ms, CPU expert 2 + 1 t ms,
    expert copy 3 ms and 0.125 ms per activation vector at the default bandwidth (gbs GB/s)."""
    prov = Provenance(kind="measured", source="test")
    gpu = GPUProfile(name="g", memory_gib=4.0, mem_bandwidth_gbs=1e12, bf16_tflops=1e12, mem_efficiency=1.0,
                     compute_efficiency=1.0, launch_overhead_us=0.0, layer_overhead_us=1000.0,
                     expert_ffn=[ExpertCurve(16, 8, Curve([0, 1000], [500.0, 100500.0], provenance=prov))])
    pcie = PCIeProfile(generation=4, h2d_gbs=gbs, d2h_gbs=gbs, copy_overhead_us=0.0, copy_engines=engines,
                       copy_slows_compute=slows)
    cpu = CPUProfile(name="c", cores=workers, workers=workers, mem_bandwidth_gbs=1.0, gflops=1.0,
                     expert_ffn=[ExpertCurve(16, 8, Curve([0, 1000], [2000.0, 1002000.0], provenance=prov),
                                             workers=workers)])
    return HardwareProfile(name="round", description="round numbers for tests", provenance=prov, gpu=gpu,
                           pcie=pcie, cpu=cpu)


def trace(counts: list, spec: ModelSpec = SPEC, committed: int = 2, block: int = 0) -> Trace:
    """A trace of one prompt; counts [F, L, E] tokens per expert; tokens per forward = the
    largest layer's routed pairs / top_k."""
    et = np.asarray(counts, dtype=np.int32)
    f = et.shape[0]
    tokens = np.maximum(et.sum(axis=2).max(axis=1) // max(spec.top_k, 1), 1)
    forwards = pd.DataFrame({"prompt": [0] * f, "block": [block] * f, "step": list(range(f)), "phase": ["step"] * f,
                             "tokens": tokens, "context": tokens, "committed": [committed] * f})
    meta = TraceMeta(model=spec, block_length=4, threshold=0.9, kv_cache="prefix", gen_length=committed * f,
                     source="synthetic")
    return Trace(meta, forwards, et)


def workload(counts: list, spec: ModelSpec = SPEC, committed: int = 2, block: int = 0) -> Workload:
    return workload_from_trace(trace(counts, spec, committed, block))


def blank(w: Workload, budget: int = 4, policy: str = "hand") -> Schedule:
    shape = w.expert_tokens.shape
    return Schedule(policy=policy, budget=np.full(shape[1], budget), initial_resident=np.zeros(shape[1:], bool),
                    placement=np.zeros(shape, np.int8), copy=np.zeros(shape, np.int8),
                    demote=np.zeros(shape, bool), resident=np.zeros(shape, bool))


def all_gpu(w: Workload) -> Schedule:
    s = blank(w)
    s.initial_resident[:] = True
    s.resident[:] = True
    s.placement[w.expert_tokens > 0] = GPU
    return s


def all_cpu(w: Workload) -> Schedule:
    s = blank(w, budget=0)
    s.placement[w.expert_tokens > 0] = CPU
    return s


def on_demand(w: Workload) -> Schedule:
    """Nothing resident across forwards: every activated expert is copied in and dropped after."""
    s = blank(w)
    s.placement[w.expert_tokens > 0] = GPU
    s.copy[w.expert_tokens > 0] = COPY_ON_DEMAND
    return s


def random_schedule(w: Workload, budget: int, seed: int, allow_async: bool = True,
                    allow_on_demand: bool = True) -> Schedule:
    """A random valid schedule: per layer-forward a random target set refreshed synchronously or
    asynchronously (some leavers demoted), other activated experts on the CPU or copied on demand."""
    from tidesim.schedule import COPY_ASYNC_REFRESH, COPY_SYNC_REFRESH

    rng = np.random.default_rng(seed)
    F, L, E = w.expert_tokens.shape
    s = blank(w, budget=budget)
    for layer in range(L):
        s.initial_resident[layer, rng.permutation(E)[:rng.integers(0, budget + 1)]] = True
    resident = s.initial_resident.copy()
    for f in range(F):
        for layer in range(L):
            before = resident[layer].copy()
            target = np.zeros(E, bool)
            target[rng.permutation(E)[:rng.integers(0, budget + 1)]] = True
            mode_async = allow_async and rng.random() < 0.4
            new = target & ~before
            leave = before & ~target
            s.copy[f, layer, new] = COPY_ASYNC_REFRESH if mode_async else COPY_SYNC_REFRESH
            s.demote[f, layer] = leave & (rng.random(E) < 0.5)
            usable = before if mode_async else target
            act = w.expert_tokens[f, layer] > 0
            for e in np.flatnonzero(act):
                if usable[e]:
                    s.placement[f, layer, e] = GPU
                elif allow_on_demand and not new[e] and not before[e] and rng.random() < 0.4:
                    s.placement[f, layer, e] = GPU
                    s.copy[f, layer, e] = COPY_ON_DEMAND
                else:
                    s.placement[f, layer, e] = CPU
            resident[layer] = target
            s.resident[f, layer] = target
    return s
