"""Shared fixtures for the policy tests: a tiny model, hand-written workloads, hardware profiles
with round-number costs, and a hypothesis strategy for random small workloads."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import strategies as st

from tidesim.hardware import HardwareProfile, get_profile, profile_from_dict
from tidesim.models import ModelSpec
from tidesim.policies import PolicyOptions, build_schedule, uniform
from tidesim.policies.driver import online_policy
from tidesim.policies.step import layered_schedule
from tidesim.schedule import Schedule, schedule_problems
from tidesim.workload import Workload

MODEL = ModelSpec(
    name="policy-test", num_layers=3, first_dense_layers=1, hidden_size=64, dense_intermediate_size=128,
    moe_intermediate_size=32, num_experts=4, top_k=2, num_shared_experts=1, num_heads=2, num_kv_heads=1,
    head_dim=32, vocab_size=64, n_group=1, topk_group=1, dtype="float32", mask_token_id=63, eos_token_id=62,
)

# The hand-checked trace: 2 MoE layers, 4 experts, 4 denoising steps of block 1 (not the first).
COUNTS = np.array([
    [[3, 0, 2, 1], [0, 0, 0, 6]],
    [[0, 4, 1, 1], [1, 1, 1, 1]],
    [[2, 2, 0, 0], [5, 0, 0, 1]],
    [[0, 0, 3, 3], [0, 2, 0, 0]],
], dtype=np.int32)


def model_for(experts: int) -> ModelSpec:
    if experts == MODEL.num_experts:
        return MODEL
    return ModelSpec(**{**MODEL.to_dict(), "num_experts": experts, "top_k": min(2, experts)})


def workload(counts: np.ndarray, block: list[int] | None = None, step: list[int] | None = None,
             committed: list[int] | None = None, model: ModelSpec | None = None) -> Workload:
    counts = np.asarray(counts, dtype=np.int32)
    f, _, e = counts.shape
    model = model or model_for(e)
    tokens = np.maximum(counts.sum(axis=2).max(axis=1) // model.top_k, 1).astype(np.int64)
    arr = lambda v, default: np.asarray(default if v is None else v, dtype=np.int64)  # noqa: E731
    return Workload(
        model=model, kv_cache="prefix", tokens=tokens, context=tokens * 2,
        committed=arr(committed, np.ones(f)), prompt=np.zeros(f, dtype=np.int64),
        block=arr(block, np.ones(f)), step=arr(step, np.arange(f)), expert_tokens=counts,
    )


def hand_workload() -> Workload:
    return workload(COUNTS)


@functools.lru_cache(maxsize=32)
def profile(gpu_us: float = 10.0, cpu_us_per_token: float = 10.0, copy_us: float = 20.0,
            spec: ModelSpec = MODEL, cpu_workers: int | None = None) -> HardwareProfile:
    """H100 preset with measured-style curves: a GPU expert costs gpu_us whatever its tokens, a
    CPU expert cpu_us_per_token per token, an expert copy copy_us; small copies (activations up
    to 4096 bytes) cost 20 us."""
    data = get_profile("h100-sxm-pcie5").to_dict()
    curve = lambda x, t: {"x": x, "time_us": t}  # noqa: E731
    shape = {"hidden": spec.hidden_size, "intermediate": spec.moe_intermediate_size}
    data["gpu"]["expert_ffn"] = [{**shape, "curve": curve([1, 1000], [gpu_us, gpu_us])}]
    data["cpu"]["expert_ffn"] = [{**shape, "curve": curve([1, 1000], [cpu_us_per_token, 1000 * cpu_us_per_token])}]
    data["pcie"]["h2d"] = curve([1, 4096, spec.expert_bytes], [20.0, 20.0, copy_us])
    if cpu_workers is not None:
        data["cpu"]["workers"] = cpu_workers
    return profile_from_dict(data, source="test")


def options(w: Workload, budget: int | list[int], tau: int | list[int] = 2, refresh: str = "sync",
            hw: HardwareProfile | None = None, **kwargs: object) -> PolicyOptions:
    layers = w.num_layers
    b = uniform(budget, layers) if isinstance(budget, int) else np.asarray(budget, dtype=np.int64)
    t = uniform(tau, layers) if isinstance(tau, int) else np.asarray(tau, dtype=np.int64)
    return PolicyOptions(budget=b, tau=t, hw=hw or profile(), refresh=refresh, **kwargs)  # type: ignore[arg-type]


def checked(name: str, w: Workload, opts: PolicyOptions) -> Schedule:
    """Build and assert the Schedule contract holds."""
    s = build_schedule(name, w, opts)
    assert schedule_problems(s, w) == []
    return s


def mask(shape: tuple[int, ...], cells: dict[tuple[int, int], list[int]]) -> np.ndarray:
    """bool [F, L, E] from {(forward, layer): [experts]}."""
    out = np.zeros(shape, dtype=bool)
    for (f, l), experts in cells.items():
        out[f, l, experts] = True
    return out


def residency(rows: list[list[list[int]]], experts: int = 4) -> np.ndarray:
    """bool [F, L, E] from per-forward, per-layer lists of resident experts."""
    out = np.zeros((len(rows), len(rows[0]), experts), dtype=bool)
    for f, layers in enumerate(rows):
        for l, experts_on in enumerate(layers):
            out[f, l, experts_on] = True
    return out


@st.composite
def workloads(draw: st.DrawFn, max_experts: int = 6) -> Workload:
    """Random small workloads: optional prefill, blocks of random length, optional commit forwards."""
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, max_experts))
    block, step, committed = [], [], []
    if draw(st.booleans()):
        block.append(-1), step.append(0), committed.append(0)
    for b in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 4))
        block += [b] * n
        step += list(range(n))
        committed += [1] * n
        if draw(st.booleans()):
            block.append(b), step.append(n), committed.append(0)
    f = len(block)
    flat = draw(st.lists(st.integers(0, 6), min_size=f * layers * experts, max_size=f * layers * experts))
    counts = np.asarray(flat, dtype=np.int32).reshape(f, layers, experts)
    return workload(counts, block=block, step=step, committed=committed)


def layer_by_layer(name: str, w: Workload, options: PolicyOptions) -> Schedule:
    """The live engine's way: one step call per (forward, layer), in layer order."""
    return layered_schedule(online_policy(name, w.model, options, layers=w.num_layers), w)
