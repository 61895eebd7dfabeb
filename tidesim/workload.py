"""Workload: a trace reduced to the arrays policies and executors need.

Per forward pass f and MoE layer l: tokens processed, attention context, and tokens routed to
each expert. Everything downstream (policies, simulator, cost model, runtime) reads these.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Generic, TypeVar

import numpy as np

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.schema import Trace


@dataclass(frozen=True)
class Workload:
    """Arrays of one decode (or several prompts decoded one after another)."""

    model: ModelSpec
    kv_cache: str
    tokens: np.ndarray          # int64 [F] tokens processed by each forward
    context: np.ndarray         # int64 [F] keys attended per query
    committed: np.ndarray       # int64 [F] tokens committed (generated) by each forward
    prompt: np.ndarray          # int64 [F]
    block: np.ndarray           # int64 [F] block index within the prompt's generation (-1: prefill)
    step: np.ndarray            # int64 [F] denoising step within the block
    expert_tokens: np.ndarray   # int32 [F, L, E]
    phase: np.ndarray | None = None  # str [F] "prefill" / "step" / "commit" (traces carry it; None: inferred)
    decode: str = "diffusion"   # the trace's decode shape: "diffusion" or "autoregressive" (TraceMeta.decode)

    @cached_property
    def digest(self) -> str:
        """sha256 of the workload's content (its model, KV-cache mode, decode shape and every array):
        what caches of its costs and schedules are keyed by, so two equal workloads share them and
        no cache depends on which object it was given. Computed once per object (the arrays are
        not changed after a workload is built)."""
        h = hashlib.sha256(repr(sorted(self.model.to_dict().items())).encode())
        h.update(f"{self.kv_cache}|{self.decode}".encode())
        for name in ("tokens", "context", "committed", "prompt", "block", "step", "expert_tokens"):
            arr = np.ascontiguousarray(getattr(self, name))
            h.update(f"{name}:{arr.dtype}:{arr.shape}".encode())
            h.update(arr.tobytes())
        if self.phase is not None:
            h.update("|".join(map(str, self.phase)).encode())
        return h.hexdigest()

    @property
    def num_forwards(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_tokens.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.expert_tokens.shape[2])

    @property
    def generated_tokens(self) -> int:
        return int(self.committed.sum())

    @property
    def first_block(self) -> np.ndarray:
        """bool [F]: forwards of the first generated block of each prompt (TIDE refreshes on
        every step there, since routing settles only after the prompt)."""
        return self.block <= 0

    @property
    def activated(self) -> np.ndarray:
        """bool [F, L, E]: experts with at least one routed token."""
        return self.expert_tokens > 0

    def select(self, forwards: np.ndarray) -> Workload:
        """The sub-workload of the given forward indices (in order)."""
        return Workload(
            model=self.model, kv_cache=self.kv_cache, tokens=self.tokens[forwards],
            context=self.context[forwards], committed=self.committed[forwards],
            prompt=self.prompt[forwards], block=self.block[forwards], step=self.step[forwards],
            expert_tokens=self.expert_tokens[forwards], phase=None if self.phase is None else self.phase[forwards],
            decode=self.decode,
        )

    def select_prompts(self, prompts: list[int]) -> Workload:
        return self.select(np.flatnonzero(np.isin(self.prompt, prompts)))


def check_prompt_ids(ids: list[int], available: list[int], flag: str) -> None:
    """The one check that prompt ids given by a user (--prompts, --calibrate-prompts) are the trace's."""
    known = set(available)
    missing = [i for i in ids if i not in known]
    if missing:
        raise InputError(f"{flag}: prompt {missing[0]} is not in the trace (it has prompts "
                         f"{', '.join(map(str, available))})")


def workload_from_trace(trace: Trace, model: ModelSpec | None = None) -> Workload:
    """Build the workload; `model`, when given, must match the trace's model shapes."""
    spec = trace.model
    if model is not None and not same_shapes(model, spec):
        raise InputError(
            f"the trace was recorded for model {spec.name!r} (hidden {spec.hidden_size}, "
            f"{spec.num_experts} experts, {spec.num_moe_layers} MoE layers), not {model.name!r}; "
            "use a trace of that model"
        )
    f = trace.forwards
    col = lambda name: f[name].to_numpy().astype(np.int64)  # noqa: E731
    return Workload(
        model=model or spec, kv_cache=trace.meta.kv_cache, tokens=col("tokens"), context=col("context"),
        committed=col("committed"), prompt=col("prompt"), block=col("block"), step=col("step"),
        expert_tokens=trace.expert_tokens, phase=f["phase"].to_numpy().astype(str), decode=trace.meta.decode,
    )


def same_shapes(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs describe the same routed-expert structure (names may differ)."""
    keys = ("num_layers", "first_dense_layers", "hidden_size", "moe_intermediate_size", "num_experts",
            "top_k")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


T = TypeVar("T")


class PerWorkload(Generic[T]):
    """What `make` derives from one workload object, kept while that object lives: costing the same
    workload again (another schedule, another profile of a sweep) reuses it. Keyed by identity, as
    workloads are arrays, not values; an entry goes when its workload is collected."""

    def __init__(self, make: Callable[[Workload], T]) -> None:
        self._make = make
        self._kept: dict[int, tuple[weakref.ref[Workload], T]] = {}

    def __call__(self, workload: Workload) -> T:
        key = id(workload)
        kept = self._kept.get(key)
        if kept is None or kept[0]() is not workload:
            kept = (weakref.ref(workload), self._make(workload))
            self._kept[key] = kept
            weakref.finalize(workload, self._kept.pop, key, None)
        return kept[1]
