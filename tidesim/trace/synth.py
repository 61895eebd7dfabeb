"""Synthetic expert-activation traces with the structure of block-diffusion decoding.

Real LLaDA2.0 traces cannot be captured here (no weights), so this generator models the
mechanisms that shape them, each with a parameter in SynthParams (docs/traces.md explains the
calibration against the published statistics in docs/sources.md):

- Decoding: a block of `block_length` masked positions is committed over a varying number of
  steps. Each masked position has a confidence (a logit) that grows with the step and with the
  share of the block already committed; every position above the threshold commits, and when
  none does the single most confident one commits (the LLaDA2.0 rule).
- Routing: router logits per token, layer and expert = prompt popularity (skewed per prompt,
  partly shared by all prompts of the data set; balanced over the whole training distribution
  by design, not within one prompt) + a token term. A token's term mixes a block context
  shared by its neighbours with its own part. Routing is the model's rule: sigmoid scores,
  best `topk_group` of `n_group` expert groups (group score = sum of its top-2 scores), top-k.
- Masked positions share the mask embedding, so they route alike: their token term is the
  block's mask vector, drifting toward the eventual token's term as confidence grows.
- Committed tokens drift a little from step to step (AR(1) noise): they attend to the block's
  still-changing masked positions.
- Prefix tokens (prompt and earlier blocks) are frozen within a block (block-causal attention):
  a block's final routing, with every token committed, is what later forwards see for it.

Forwards emitted: kv_cache "prefix": one prefill forward for the prompt (phase prefill, block -1),
each block's denoising steps over the block only, then one commit forward of the block;
kv_cache "none": each step re-runs prompt + earlier blocks + current block.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from tidesim import __version__
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.schema import KV_CACHE_MODES, Trace, TraceMeta

GENERATOR_NAME = "tidesim.trace.synth"
GENERATOR_VERSION = 1
# Token-level routing of no-cache traces grows with prefix x steps; refuse beyond this many ids.
MAX_TOKEN_LEVEL_IDS = 400_000_000


@dataclass(frozen=True)
class SynthParams:
    """Generator parameters (calibrated defaults; docs/traces.md gives the targets)."""

    # Decoding: confidence logit of a masked position = conf_mean + block offset + own offset
    # + conf_rate x step + conf_context x (share of block committed) + jitter.
    conf_mean: float = -0.1
    conf_sd: float = 1.1
    conf_block_sd: float = 0.4
    conf_rate: float = 0.42
    conf_context: float = 0.6
    conf_jitter: float = 0.3
    # Routing logits = pop_scale x prompt popularity + token_scale x token term.
    pop_scale: float = 0.7
    pop_shared: float = 0.5          # share of popularity variance common to all prompts
    pop_prompt_sd: float = 0.08      # prompt-to-prompt spread of pop_scale (log-normal sd)
    token_scale: float = 1.0
    block_context: float = 0.4       # share of a token term's variance shared by its block
    mask_block: float = 0.3          # share of the mask vector's variance specific to the block
    mask_position: float = 0.1       # sd of a masked position's own deviation from the mask vector
    readiness_mid: float = -1.5      # confidence logit at which a masked position is half-way
    readiness_slope: float = 2.0     # to its eventual token's routing (mean over layers)
    readiness_depth: float = 6.0     # readiness_mid falls by this much from the first MoE layer to
                                     # the last: early layers route masked positions like the mask
    drift_sd: float = 0.2            # sd of a committed token's step-to-step drift
    drift_corr: float = 0.8          # AR(1) correlation of that drift between steps

    def problems(self) -> list[str]:
        out = []
        for name, value in asdict(self).items():
            if not np.isfinite(value):
                out.append(f"generator parameter {name} must be finite")
        for name in ("pop_shared", "block_context", "mask_block", "drift_corr"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"generator parameter {name} must lie in [0, 1]")
        for name in ("conf_sd", "conf_block_sd", "conf_jitter", "pop_scale", "pop_prompt_sd", "token_scale",
                     "mask_position", "drift_sd", "readiness_slope"):
            if getattr(self, name) < 0:
                out.append(f"generator parameter {name} must be >= 0")
        if self.conf_rate <= 0:
            out.append("generator parameter conf_rate must be > 0 (blocks must finish)")
        return out


@dataclass(frozen=True)
class SynthConfig:
    """What to decode: model, prompts and decoding settings."""

    model: ModelSpec
    prompts: int = 4
    gen_length: int = 256
    block_length: int = 32
    threshold: float = 0.95
    kv_cache: str = "prefix"
    prompt_length: int = 300
    seed: int = 0
    token_level: bool = False
    params: SynthParams = field(default_factory=SynthParams)

    def check(self) -> None:
        """Raise InputError on the first bad setting."""
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("prompts", "gen_length", "block_length", "prompt_length"):
            positive(name)
        if self.gen_length % self.block_length:
            raise InputError(f"gen-length {self.gen_length} must be a multiple of block-length "
                             f"{self.block_length}")
        if not 0 < self.threshold < 1:
            raise InputError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.kv_cache not in KV_CACHE_MODES:
            raise InputError(f"kv-cache must be one of {', '.join(KV_CACHE_MODES)}, got {self.kv_cache!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        problems = self.params.problems()
        if problems:
            raise InputError(problems[0])
        if self.token_level and self.kv_cache == "none":
            ids = _estimated_none_ids(self)
            if ids > MAX_TOKEN_LEVEL_IDS:
                raise InputError(
                    f"token-level routing in no-cache mode would hold about {ids / 1e6:.0f}M expert ids; "
                    "use --kv-cache prefix, fewer prompts or a shorter --gen-length"
                )


def _estimated_none_ids(cfg: SynthConfig) -> float:
    blocks = cfg.gen_length // cfg.block_length
    steps = 13  # about 32 / 2.5 steps per block at threshold 0.95
    mean_tokens = cfg.prompt_length + cfg.block_length * (blocks + 1) / 2
    return float(cfg.prompts * blocks * steps * mean_tokens * cfg.model.num_moe_layers * cfg.model.top_k)


# ----- routing -------------------------------------------------------------------------------
def route(logits: np.ndarray, model: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing of LLaDA2.0's gate on [tokens, layers, experts] selection logits.

    Scores are sigmoid(logits); only the best `topk_group` of `n_group` groups (group score =
    sum of its two best scores) are eligible; the top-k eligible experts are chosen, ordered by
    score. Weights: the chosen scores normalised to 1, times routed_scaling_factor.
    Returns ids int16 and weights float32, both [tokens, layers, top_k].
    """
    n, layers, experts = logits.shape
    k, groups, keep = model.top_k, model.n_group, model.topk_group
    size = experts // groups
    if keep < groups:
        per_group = logits.reshape(n, layers, groups, size)
        two = min(2, size)
        best_two = np.partition(per_group, size - two, axis=-1)[..., size - two:]
        group_score = _sigmoid(best_two).sum(-1)
        kept = np.sort(np.argpartition(-group_score, keep - 1, axis=-1)[..., :keep], axis=-1)
        cand = np.take_along_axis(per_group, kept[..., None], axis=2).reshape(n, layers, keep * size)
        cand_ids = (kept[..., None] * size + np.arange(size)).reshape(n, layers, keep * size)
    else:
        cand = logits
        cand_ids = np.broadcast_to(np.arange(experts), logits.shape)
    top = np.argpartition(-cand, k - 1, axis=-1)[..., :k]
    top_logits = np.take_along_axis(cand, top, axis=-1)
    order = np.argsort(-top_logits, axis=-1, kind="stable")
    ids = np.take_along_axis(np.take_along_axis(cand_ids, top, axis=-1), order, axis=-1)
    chosen = _sigmoid(np.take_along_axis(top_logits, order, axis=-1).astype(np.float64))
    weights = chosen / chosen.sum(-1, keepdims=True) * model.routed_scaling_factor
    return ids.astype(np.int16), weights.astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def count_experts(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens per expert per layer, int64 [layers, experts], from ids [tokens, layers, k]."""
    _, layers, _ = ids.shape
    flat = (np.arange(layers)[None, :, None] * num_experts + ids.astype(np.int64)).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


# ----- one prompt ----------------------------------------------------------------------------
@dataclass
class _Forward:
    block: int
    step: int
    phase: str
    tokens: int
    context: int
    committed: int
    counts: np.ndarray                       # int64 [layers, experts]
    ids: np.ndarray | None = None            # int16 [tokens, layers, k]
    weights: np.ndarray | None = None        # float32 [tokens, layers, k]


@dataclass
class _Routed:
    """Routing of a run of tokens: counts plus, when kept, the token-level ids and weights."""

    counts: np.ndarray
    ids: np.ndarray | None
    weights: np.ndarray | None


class _PromptDecoder:
    """Decodes one prompt: the confidence process and the per-token router logits."""

    def __init__(self, cfg: SynthConfig, shared_pop: np.ndarray, rng: np.random.Generator) -> None:
        self.cfg, self.p, self.rng = cfg, cfg.params, rng
        m = cfg.model
        self.shape = (m.num_moe_layers, m.num_experts)
        own = rng.standard_normal(self.shape, dtype=np.float32)
        pop = np.sqrt(self.p.pop_shared) * shared_pop + np.sqrt(1 - self.p.pop_shared) * own
        scale = self.p.pop_scale * float(np.exp(self.p.pop_prompt_sd * rng.standard_normal()))
        self.popularity = scale * pop
        self.mask_vector = rng.standard_normal(self.shape, dtype=np.float32)
        depth = np.linspace(0.5, -0.5, m.num_moe_layers) if m.num_moe_layers > 1 else np.zeros(1)
        self.readiness_mid = self.p.readiness_mid + self.p.readiness_depth * depth

    def _route(self, latent: np.ndarray) -> _Routed:
        logits = self.popularity[None] + self.p.token_scale * latent
        ids, weights = route(logits, self.cfg.model)
        counts = count_experts(ids, self.cfg.model.num_experts)
        if self.cfg.token_level:
            return _Routed(counts, ids, weights)
        return _Routed(counts, None, None)

    def _token_terms(self, n: int) -> np.ndarray:
        """Token terms of n consecutive tokens, in blocks of block_length sharing a context."""
        bl = self.cfg.block_length
        chunks = -(-n // bl)
        context = np.repeat(self.rng.standard_normal((chunks, *self.shape), dtype=np.float32), bl, axis=0)[:n]
        own = self.rng.standard_normal((n, *self.shape), dtype=np.float32)
        w = self.p.block_context
        return np.sqrt(w) * context + np.sqrt(1 - w) * own

    def prompt(self) -> _Routed:
        return self._route(self._token_terms(self.cfg.prompt_length))

    def block(self) -> tuple[list[tuple[_Routed, int]], _Routed]:
        """The block's denoising steps (routing, tokens committed) and its final routing."""
        p, bl, rng = self.p, self.cfg.block_length, self.rng
        target = self._token_terms(bl)
        wb = p.mask_block
        mask = np.sqrt(1 - wb) * self.mask_vector + np.sqrt(wb) * rng.standard_normal(self.shape, dtype=np.float32)
        position = p.mask_position * rng.standard_normal((bl, *self.shape), dtype=np.float32)
        drift = np.zeros((bl, *self.shape), dtype=np.float32)    # drawn when a position commits
        latent = np.empty((bl, *self.shape), dtype=np.float32)
        base = p.conf_mean + p.conf_block_sd * rng.standard_normal() + p.conf_sd * rng.standard_normal(bl)
        limit = float(np.log(self.cfg.threshold / (1 - self.cfg.threshold)))
        masked = np.ones(bl, dtype=bool)
        steps: list[tuple[_Routed, int]] = []
        step = 0
        innovation = np.float32(np.sqrt(1 - p.drift_corr**2))
        while masked.any():
            done = 1 - masked.mean()
            conf = base + p.conf_rate * step + p.conf_context * done + p.conf_jitter * rng.standard_normal(bl)
            m, c = np.flatnonzero(masked), np.flatnonzero(~masked)
            a = _sigmoid(p.readiness_slope * (conf[m, None] - self.readiness_mid[None, :]))
            a = a.astype(np.float32)[:, :, None]
            latent[m] = ((1 - a) * mask[None] + a * target[m]) / np.sqrt((1 - a) ** 2 + a**2) + position[m]
            latent[c] = target[c] + p.drift_sd * drift[c]
            routed = self._route(latent)
            commit = masked & (conf > limit)
            if not commit.any():
                commit[m[np.argmax(conf[m])]] = True
            masked &= ~commit
            steps.append((routed, int(commit.sum())))
            # AR(1) drift of committed tokens; a newly committed one starts from the stationary law
            drift[c] = p.drift_corr * drift[c] + innovation * rng.standard_normal((c.size, *self.shape),
                                                                                  dtype=np.float32)
            new = np.flatnonzero(commit)
            drift[new] = rng.standard_normal((new.size, *self.shape), dtype=np.float32)
            step += 1
        final = self._route(target + p.drift_sd * drift)
        return steps, final


def _decode_prompt(cfg: SynthConfig, shared_pop: np.ndarray, rng: np.random.Generator) -> list[_Forward]:
    dec = _PromptDecoder(cfg, shared_pop, rng)
    bl, plen = cfg.block_length, cfg.prompt_length
    prompt = dec.prompt()
    out: list[_Forward] = []
    prefix = [prompt]
    prefix_counts = prompt.counts.copy()
    if cfg.kv_cache == "prefix":
        out.append(_Forward(-1, 0, "prefill", plen, plen, 0, prompt.counts, prompt.ids, prompt.weights))
    for b in range(cfg.gen_length // bl):
        steps, final = dec.block()
        context = plen + (b + 1) * bl
        for s, (routed, committed) in enumerate(steps):
            if cfg.kv_cache == "prefix":
                out.append(_Forward(b, s, "step", bl, context, committed, routed.counts, routed.ids,
                                    routed.weights))
            else:
                ids, weights = _joined([*prefix, routed]) if cfg.token_level else (None, None)
                out.append(_Forward(b, s, "step", context, context, committed, prefix_counts + routed.counts,
                                    ids, weights))
        if cfg.kv_cache == "prefix":
            out.append(_Forward(b, len(steps), "commit", bl, context, 0, final.counts, final.ids, final.weights))
        prefix.append(final)
        prefix_counts = prefix_counts + final.counts
    return out


def _joined(runs: list[_Routed]) -> tuple[np.ndarray, np.ndarray]:
    """Token-level routing of consecutive runs of tokens (prefix, then the current block)."""
    ids = [r.ids for r in runs if r.ids is not None]
    weights = [r.weights for r in runs if r.weights is not None]
    return np.concatenate(ids), np.concatenate(weights)


def synthesize(cfg: SynthConfig, progress: Any = None) -> Trace:
    """Generate a trace; same config (seed included) -> same trace.

    progress: optional wrapper over the prompt range (e.g. tidesim.cli.output.progress).
    """
    cfg.check()
    seeds = np.random.SeedSequence(cfg.seed).spawn(cfg.prompts + 1)
    shape = (cfg.model.num_moe_layers, cfg.model.num_experts)
    shared_pop = np.random.default_rng(seeds[0]).standard_normal(shape, dtype=np.float32)
    prompts: Any = range(cfg.prompts)
    if progress is not None:
        prompts = progress(prompts)
    rows: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    for p in prompts:
        for fw in _decode_prompt(cfg, shared_pop, np.random.default_rng(seeds[p + 1])):
            rows.append({"prompt": p, "block": fw.block, "step": fw.step, "phase": fw.phase,
                         "tokens": fw.tokens, "context": fw.context, "committed": fw.committed})
            counts.append(fw.counts)
            if fw.ids is not None and fw.weights is not None:
                ids.extend(fw.ids.transpose(1, 0, 2))
                weights.extend(fw.weights.transpose(1, 0, 2))
    forwards = pd.DataFrame(rows)
    for col in ("prompt", "block", "step", "tokens", "context", "committed"):
        forwards[col] = forwards[col].astype(np.int64)
    meta = TraceMeta(
        model=cfg.model, block_length=cfg.block_length, threshold=float(cfg.threshold), kv_cache=cfg.kv_cache,
        gen_length=cfg.gen_length, source="synthetic", seed=cfg.seed,
        generator=generator_metadata(cfg),
        prompts=[{"id": p, "prompt_length": cfg.prompt_length, "gen_length": cfg.gen_length}
                 for p in range(cfg.prompts)],
        notes="synthetic trace: structure of block-diffusion routing, calibrated to published statistics; "
              "not captured from a real model",
    )
    return Trace(
        meta=meta, forwards=forwards, expert_tokens=np.stack(counts).astype(np.int32),
        topk_ids=[np.ascontiguousarray(a) for a in ids] if cfg.token_level else None,
        topk_weights=[np.ascontiguousarray(a) for a in weights] if cfg.token_level else None,
    )


def generator_metadata(cfg: SynthConfig) -> dict[str, Any]:
    """Everything needed to regenerate the trace, stored in TraceMeta.generator."""
    return {
        "name": GENERATOR_NAME, "version": GENERATOR_VERSION, "tidesim_version": __version__,
        "prompts": cfg.prompts, "prompt_length": cfg.prompt_length, "gen_length": cfg.gen_length,
        "block_length": cfg.block_length, "threshold": float(cfg.threshold), "kv_cache": cfg.kv_cache,
        "seed": cfg.seed, "token_level": cfg.token_level, "params": asdict(cfg.params),
    }
