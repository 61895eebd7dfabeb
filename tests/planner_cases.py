"""Shared inputs for the planner tests: a small synthetic trace of the `tiny` model, profiles, and
the GPU memory (GiB) that holds a given number of expert slots."""

from __future__ import annotations

import functools
from pathlib import Path

from tidesim.hardware import HardwareProfile, get_profile
from tidesim.models import PRESETS
from tidesim.trace.io import write_trace
from tidesim.trace.schema import Trace
from tidesim.trace.synth import SynthConfig, synthesize
from tidesim.workload import Workload, workload_from_trace

TINY = PRESETS["tiny"]


@functools.lru_cache(maxsize=4)
def tiny_trace(seed: int = 3) -> Trace:
    """3 prompts x 64 tokens in blocks of 16 (prefix cache), 3 MoE layers x 16 experts."""
    return synthesize(SynthConfig(model=TINY, prompts=3, gen_length=64, block_length=16, kv_cache="prefix",
                                  prompt_length=20, seed=seed))


def tiny_workload(seed: int = 3) -> Workload:
    return workload_from_trace(tiny_trace(seed))


def write_tiny_trace(folder: Path, seed: int = 3) -> Path:
    return write_trace(tiny_trace(seed), folder / "tiny.parquet")


@functools.lru_cache(maxsize=8)
def h100(workers: int | None = None, engines: int | None = None) -> HardwareProfile:
    """The H100 preset, optionally with another CPU pool size or copy-engine count."""
    hw = get_profile("h100-sxm-pcie5")
    if workers is None and engines is None:
        return hw
    data = hw.to_dict()
    if workers is not None:
        data["cpu"]["workers"] = workers
    if engines is not None:
        data["pcie"]["copy_engines"] = engines
    from tidesim.hardware import profile_from_dict

    return profile_from_dict(data)


def gib_for_slots(slots: int) -> float:
    """GPU memory whose expert room holds exactly `slots` tiny experts (reserve 1.5 GB)."""
    return (1.5e9 + TINY.non_expert_bytes + (slots + 0.5) * TINY.expert_bytes) / 2**30
