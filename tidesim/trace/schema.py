"""Trace format v1: what an expert-activation trace of block-diffusion decoding holds.

A trace is a sequence of forward passes (prompt, block, denoising step). For every forward it
records how many tokens were processed and, for every MoE layer, how many of them were routed to
each expert; optionally the token-level top-k routing. docs/trace-format.md documents the columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tidesim import __version__
from tidesim.errors import InputError
from tidesim.models import ModelSpec

FORMAT_VERSION = 1
METADATA_KEY = b"tidesim.trace"
KV_CACHE_MODES = ("none", "prefix")
SOURCES = ("captured", "synthetic", "converted")
PHASES = ("prefill", "step", "commit")
# diffusion: blocks of denoising steps; autoregressive: a prefill, then one forward per generated
# token (block length 1; `block` and `step` both count the decode forwards, so TIDE's refresh
# clock "step % tau" counts tokens). docs/trace-format.md, "Autoregressive traces".
DECODES = ("diffusion", "autoregressive")
FORWARD_COLUMNS = ["prompt", "block", "step", "phase", "tokens", "context", "committed"]


@dataclass
class TraceMeta:
    """File-level metadata: how the trace was made and for which model and decode settings."""

    model: ModelSpec
    block_length: int
    threshold: float
    kv_cache: str
    gen_length: int
    source: str
    top_k: int = 0
    num_experts: int = 0
    generator: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    prompts: list[dict[str, Any]] = field(default_factory=list)
    tool_version: str = __version__
    notes: str = ""
    format_version: int = FORMAT_VERSION
    decode: str = "diffusion"

    def __post_init__(self) -> None:
        if not self.top_k:
            self.top_k = self.model.top_k
        if not self.num_experts:
            self.num_experts = self.model.num_experts

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        if self.decode == "diffusion":   # the default: written only when it differs, so traces of
            del out["decode"]            # diffusion decoding keep the bytes they had before the field
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TraceMeta:
        required = ["model", "block_length", "threshold", "kv_cache", "gen_length", "source",
                    "top_k", "num_experts", "format_version", "tool_version"]
        for key in required:
            if key not in data:
                raise InputError(f"metadata field {key!r} is missing")
        known = {f for f in cls.__dataclass_fields__}
        extra = sorted(set(data) - known)
        if extra:
            raise InputError(f"metadata has unknown field {extra[0]!r}")
        values = dict(data)
        values["model"] = ModelSpec.from_dict(data["model"])
        return cls(**values)


@dataclass
class Trace:
    """A decoded trace in memory.

    forwards: one row per forward pass, columns FORWARD_COLUMNS, in execution order.
    expert_tokens: int32 [forwards, MoE layers, experts], tokens routed to each expert.
    topk_ids / topk_weights: optional token-level routing, one array [tokens, top_k] per
    (forward, layer), indexed forward * layers + layer.
    """

    meta: TraceMeta
    forwards: pd.DataFrame
    expert_tokens: np.ndarray
    topk_ids: list[np.ndarray] | None = None
    topk_weights: list[np.ndarray] | None = None

    @property
    def model(self) -> ModelSpec:
        return self.meta.model

    @property
    def autoregressive(self) -> bool:
        return self.meta.decode == "autoregressive"

    @property
    def num_forwards(self) -> int:
        return int(self.expert_tokens.shape[0])

    @property
    def moe_layer_ids(self) -> list[int]:
        return self.meta.model.moe_layer_ids

    @property
    def generated_tokens(self) -> int:
        return int(self.forwards["committed"].sum())

    def select_prompts(self, prompts: list[int]) -> Trace:
        """The sub-trace of the given prompt ids (for held-out evaluation)."""
        mask = self.forwards["prompt"].isin(prompts).to_numpy()
        idx = np.flatnonzero(mask)
        layers = self.expert_tokens.shape[1]
        def pick(items: list[np.ndarray] | None) -> list[np.ndarray] | None:
            if items is None:
                return None
            return [items[f * layers + layer] for f in idx for layer in range(layers)]
        meta = TraceMeta(**{**self.meta.__dict__})
        meta.prompts = [p for p in self.meta.prompts if p.get("id") in set(prompts)]
        return Trace(
            meta=meta,
            forwards=self.forwards.iloc[idx].reset_index(drop=True),
            expert_tokens=self.expert_tokens[idx],
            topk_ids=pick(self.topk_ids),
            topk_weights=pick(self.topk_weights),
        )

    @property
    def prompt_ids(self) -> list[int]:
        return sorted(int(p) for p in self.forwards["prompt"].unique())
