"""Synthetic traces of autoregressive decoding (block length 1, prefix KV cache).

The forward structure is the autoregressive one (docs/trace-format.md, "Autoregressive traces"):
per prompt a prefill of its P tokens, which yields the first output token, then one decode forward
per further output token, forward j (0, 1, ...) running one token over P + j + 1 keys, with block
= step = j. Routing follows the diffusion generator's router (tidesim.trace.synth.route) on
logits = popularity + token term, where

- popularity is a per-prompt mix of a data-set-wide and a prompt-specific expert preference,
  scaled per MoE layer from `pop_scale_first` (first MoE layer) to `pop_scale_last` (last), so the
  skew of routing by layer is a known input (the planner's per-layer budgets follow it);
- a decode token's term is an AR(1) process over the output (`token_corr`): consecutive tokens
  route alike, which is what an expert cache exploits; prompt tokens draw theirs independently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tidesim import __version__
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.schema import Trace, TraceMeta
from tidesim.trace.synth import count_experts, route

GENERATOR_NAME = "tidesim.trace.synth_ar"
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class ArParams:
    """Routing parameters of the autoregressive generator."""

    pop_scale_first: float = 0.63
    pop_scale_last: float = 0.63
    pop_shared: float = 0.5
    token_scale: float = 1.0
    token_corr: float = 0.6

    def problems(self) -> list[str]:
        out = [f"generator parameter {k} must be finite and >= 0" for k, v in asdict(self).items()
               if not np.isfinite(v) or v < 0]
        for name in ("pop_shared", "token_corr"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"generator parameter {name} must lie in [0, 1]")
        return out


@dataclass(frozen=True)
class ArConfig:
    """What to decode: prompts of `prompt_length` tokens, `gen_length` output tokens each."""

    model: ModelSpec
    prompts: int = 4
    prompt_length: int = 128
    gen_length: int = 128
    seed: int = 0
    token_level: bool = False
    params: ArParams = field(default_factory=ArParams)

    def check(self) -> None:
        for name in ("prompts", "prompt_length", "gen_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        problems = self.params.problems()
        if problems:
            raise InputError(problems[0])


def _layer_scale(p: ArParams, layers: int) -> np.ndarray:
    return np.linspace(p.pop_scale_first, p.pop_scale_last, layers, dtype=np.float32)


def _decode_terms(rng: np.random.Generator, n: int, shape: tuple[int, int], corr: float) -> np.ndarray:
    """[n, layers, experts] AR(1) token terms with unit variance and lag-1 correlation `corr`."""
    out = rng.standard_normal((n, *shape), dtype=np.float32)
    keep, fresh = np.float32(corr), np.float32(np.sqrt(1 - corr * corr))
    for j in range(1, n):
        out[j] = keep * out[j - 1] + fresh * out[j]
    return out


def synthesize_ar(cfg: ArConfig) -> Trace:
    """The trace; same config (seed included) -> same trace."""
    cfg.check()
    m, p = cfg.model, cfg.params
    shape = (m.num_moe_layers, m.num_experts)
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.prompts + 1)
    shared = np.random.default_rng(seeds[0]).standard_normal(shape, dtype=np.float32)
    scale = _layer_scale(p, m.num_moe_layers)[:, None]
    P, G = cfg.prompt_length, cfg.gen_length
    rows: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for prompt in range(cfg.prompts):
        rng = np.random.default_rng(seeds[prompt + 1])
        own = rng.standard_normal(shape, dtype=np.float32)
        pop = scale * (np.sqrt(p.pop_shared) * shared + np.sqrt(1 - p.pop_shared) * own)
        runs = [rng.standard_normal((P, *shape), dtype=np.float32)]
        runs.extend(_decode_terms(rng, G - 1, shape, p.token_corr)[:, None] if G > 1 else [])
        for j, term in enumerate(runs):
            tid, tw = route(pop[None] + np.float32(p.token_scale) * term, m)
            counts.append(count_experts(tid, m.num_experts))
            if cfg.token_level:
                ids.extend(tid.transpose(1, 0, 2))
                weights.extend(tw.transpose(1, 0, 2))
            first = j == 0
            rows.append({"prompt": prompt, "block": -1 if first else j - 1, "step": 0 if first else j - 1,
                         "phase": "prefill" if first else "step", "tokens": P if first else 1,
                         "context": P if first else P + j, "committed": 1})
    forwards = pd.DataFrame(rows)
    for col in ("prompt", "block", "step", "tokens", "context", "committed"):
        forwards[col] = forwards[col].astype(np.int64)
    meta = TraceMeta(
        model=m, block_length=1, threshold=1.0, kv_cache="prefix", gen_length=G, source="synthetic",
        seed=cfg.seed, decode="autoregressive", generator=generator_metadata(cfg),
        prompts=[{"id": i, "prompt_length": P, "generated": G, "denoising_steps": G - 1} for i in range(cfg.prompts)],
        notes="synthetic autoregressive trace (tidesim.trace.synth_ar); not captured from a real model",
    )
    return Trace(meta=meta, forwards=forwards, expert_tokens=np.stack(counts).astype(np.int32),
                 topk_ids=[np.ascontiguousarray(a) for a in ids] if cfg.token_level else None,
                 topk_weights=[np.ascontiguousarray(a) for a in weights] if cfg.token_level else None)


def generator_metadata(cfg: ArConfig) -> dict[str, Any]:
    return {"name": GENERATOR_NAME, "version": GENERATOR_VERSION, "tidesim_version": __version__,
            "prompts": cfg.prompts, "prompt_length": cfg.prompt_length, "gen_length": cfg.gen_length,
            "seed": cfg.seed, "token_level": cfg.token_level, "params": asdict(cfg.params)}
