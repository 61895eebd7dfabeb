"""Synthetic expert-activation traces with the structure of block-diffusion decoding.

Real LLaDA2.0 traces cannot be captured here (no weights), so this generator models the
mechanisms that shape them, each with a parameter in SynthParams (docs/traces.md explains the
calibration against the published statistics in docs/sources.md):

- Layout: the official decoding layout (tidesim.trace.layout): absolute blocks, the prompt's tail
  in the first generated block, the block-causal prompt, at most `steps` steps per block with the
  official transfer schedule, and the EOS rule with or without early stop.
- Lengths: each prompt's length and its answer's length (tokens before the EOS) are drawn from
  the seed (MBPP-like distributions, docs/traces.md says how they were chosen), unless fixed.
- Decoding: every masked position has a confidence (a logit) that grows with the step and with
  the share of the block already committed; EOS positions (the answer's end and the padding after
  it) are more confident. The official commit rule picks the positions each step commits.
- Routing: router logits per token, layer and expert = prompt popularity (skewed per prompt,
  partly shared by all prompts of the data set) + a token term. A token's term mixes a block
  context shared by its neighbours with its own part; EOS tokens share one term. Routing is the
  model's rule: sigmoid scores, best `topk_group` of `n_group` expert groups, top-k.
- Masked positions share the mask embedding, so they route alike: their token term is the
  block's mask vector, drifting toward the eventual token's term as confidence grows.
- Committed tokens (and the prompt's tail in the first generated block) drift a little from
  step to step (AR(1) noise): they attend to the block's still-changing masked positions.
- Earlier blocks (the prompt's complete blocks included) are frozen (block-causal attention): a
  block's final routing is what later forwards see for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from tidesim import __version__
from tidesim.decode import effective_steps, transfer_schedule
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.layout import BlockLayout, early_stop_index, forward_structure, output_length, select_transfer
from tidesim.trace.schema import KV_CACHE_MODES, Trace, TraceMeta

GENERATOR_NAME = "tidesim.trace.synth"
GENERATOR_VERSION = 2
# Token-level routing of no-cache traces grows with prefix x steps; refuse beyond this many ids.
MAX_TOKEN_LEVEL_IDS = 400_000_000
# early-stop: the official eos_early_stop; block: stop after the block holding the EOS (the
# official default); none: answers never end, every block up to gen_length is decoded.
EOS_MODES = ("early-stop", "block", "none")


@dataclass(frozen=True)
class SynthParams:
    """Generator parameters (calibrated defaults; docs/traces.md gives the targets)."""

    # Decoding: confidence logit of a masked position = conf_mean + block offset + own offset
    # + conf_rate x step + conf_context x (share of block committed) + jitter (+ eos_conf at EOS).
    conf_mean: float = 0.0
    conf_sd: float = 1.1
    conf_block_sd: float = 0.4
    conf_rate: float = 0.42
    conf_context: float = 0.6
    conf_jitter: float = 0.3
    eos_conf: float = 3.0            # extra confidence of EOS positions (the answer's end, padding)
    # Lengths (tokens), log-normal, clipped: prompts with the chat template, answers before the EOS.
    prompt_median: float = 120.0
    prompt_sigma: float = 0.25
    prompt_min: float = 40.0
    prompt_max: float = 512.0
    answer_median: float = 132.0
    answer_sigma: float = 0.45
    answer_min: float = 8.0
    # Routing logits = pop_scale x prompt popularity + token_scale x token term.
    pop_scale: float = 0.63
    pop_shared: float = 0.5          # share of popularity variance common to all prompts
    pop_prompt_sd: float = 0.0       # prompt-to-prompt spread of pop_scale (log-normal sd)
    token_scale: float = 1.0
    block_context: float = 0.5       # share of a generated token term's variance shared by its block
    prompt_context: float = 0.0      # the same for prompt tokens (template, problem text and tests mix)
    mask_block: float = 0.3          # share of the mask vector's variance specific to the block
    mask_position: float = 0.1       # sd of a masked (or EOS) position's own deviation from its shared term
    readiness_mid: float = -1.5      # confidence logit at which a masked position is half-way
    readiness_slope: float = 2.0     # to its eventual token's routing (mean over layers)
    readiness_depth: float = 6.0     # readiness_mid falls by this much from the first MoE layer to
                                     # the last: early layers route masked positions like the mask
    drift_sd: float = 0.25           # sd of a committed token's step-to-step drift
    drift_corr: float = 0.8          # AR(1) correlation of that drift between steps

    def problems(self) -> list[str]:
        out = []
        for name, value in asdict(self).items():
            if not np.isfinite(value):
                out.append(f"generator parameter {name} must be finite")
        for name in ("pop_shared", "block_context", "prompt_context", "mask_block", "drift_corr"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"generator parameter {name} must lie in [0, 1]")
        for name in ("conf_sd", "conf_block_sd", "conf_jitter", "pop_scale", "pop_prompt_sd", "token_scale",
                     "mask_position", "drift_sd", "readiness_slope", "prompt_sigma", "answer_sigma", "eos_conf"):
            if getattr(self, name) < 0:
                out.append(f"generator parameter {name} must be >= 0")
        for name in ("prompt_median", "prompt_min", "answer_median"):
            if getattr(self, name) < 1:
                out.append(f"generator parameter {name} must be >= 1")
        if self.prompt_max < self.prompt_min:
            out.append("generator parameter prompt_max must be >= prompt_min")
        if self.answer_min < 0:
            out.append("generator parameter answer_min must be >= 0")
        if self.conf_rate <= 0:
            out.append("generator parameter conf_rate must be > 0 (blocks must finish)")
        return out


@dataclass(frozen=True)
class SynthConfig:
    """What to decode: model, prompts and decoding settings (the official generate's names).

    prompt_length / answer_length: fixed for every prompt, or None to draw each prompt's from
    the MBPP-like distributions in SynthParams. answer_length counts the tokens before the EOS.
    """

    model: ModelSpec
    prompts: int = 4
    gen_length: int = 256
    block_length: int = 32
    threshold: float = 0.95
    kv_cache: str = "prefix"
    prompt_length: int | None = None
    seed: int = 0
    token_level: bool = False
    params: SynthParams = field(default_factory=SynthParams)
    steps: int = 32
    minimal_topk: int = 1
    eos: str = "early-stop"
    answer_length: int | None = None

    def check(self) -> None:
        """Raise InputError on the first bad setting."""
        def integer(name: str, low: int) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                what = "a positive integer" if low == 1 else f"an integer >= {low}"
                raise InputError(f"{name.replace('_', '-')} must be {what}, got {value!r}")
        for name in ("prompts", "gen_length", "block_length", "steps", "minimal_topk"):
            integer(name, 1)
        if self.prompt_length is not None:
            integer("prompt_length", 1)
        if self.answer_length is not None:
            integer("answer_length", 0)
        if effective_steps(self.steps, self.gen_length, self.minimal_topk) < 1:
            raise InputError(f"minimal-topk {self.minimal_topk} leaves no step: gen-length {self.gen_length} "
                             "// minimal-topk must be at least 1")
        if not isinstance(self.threshold, int | float) or not 0 < self.threshold < 1:
            raise InputError(f"threshold must lie strictly between 0 and 1, got {self.threshold}")
        if self.kv_cache not in KV_CACHE_MODES:
            raise InputError(f"kv-cache must be one of {', '.join(KV_CACHE_MODES)}, got {self.kv_cache!r}")
        if self.eos not in EOS_MODES:
            raise InputError(f"eos must be one of {', '.join(EOS_MODES)}, got {self.eos!r}")
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

    @classmethod
    def from_generator(cls, model: ModelSpec, g: dict[str, Any]) -> SynthConfig:
        """The config a trace was made with, from its metadata (TraceMeta.generator)."""
        names = {f.name for f in fields(cls)} - {"model", "params"}
        return cls(model=model, params=SynthParams(**g["params"]), **{k: g[k] for k in names if k in g})


def _estimated_none_ids(cfg: SynthConfig) -> float:
    """Upper estimate of token-level ids (every block decoded, 13 steps per block)."""
    prompt = cfg.prompt_length or cfg.params.prompt_max
    blocks = math.ceil((prompt + cfg.gen_length) / cfg.block_length) - prompt // cfg.block_length
    mean_tokens = prompt + cfg.block_length * (blocks + 1) / 2
    return float(cfg.prompts * blocks * 13 * mean_tokens * cfg.model.num_moe_layers * cfg.model.top_k)


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
class _Routed:
    """Routing of a run of tokens: counts plus, when kept, the token-level ids and weights."""

    counts: np.ndarray                       # int64 [layers, experts]
    ids: np.ndarray | None                   # int16 [tokens, layers, k]
    weights: np.ndarray | None               # float32 [tokens, layers, k]


@dataclass
class _PromptDecode:
    """One prompt's decode: the routing of every forward (in forward_structure order) and facts."""

    prompt_length: int
    answer_length: int | None
    runs: list[_Routed]
    committed: list[int]
    steps_per_block: list[int]
    stopped_early: bool
    first_eos: int | None


def _lognormal_length(rng: np.random.Generator, median: float, sigma: float, low: float, high: float) -> int:
    return int(np.clip(np.rint(median * np.exp(sigma * rng.standard_normal())), low, high))


def draw_lengths(cfg: SynthConfig, rng: np.random.Generator) -> tuple[int, int | None]:
    """(prompt length, answer length or None) of one prompt; both are always drawn, so a fixed
    value does not shift the other's stream."""
    p = cfg.params
    prompt = _lognormal_length(rng, p.prompt_median, p.prompt_sigma, p.prompt_min, p.prompt_max)
    answer = _lognormal_length(rng, p.answer_median, p.answer_sigma, p.answer_min, np.inf)
    if cfg.prompt_length is not None:
        prompt = cfg.prompt_length
    if cfg.answer_length is not None:
        answer = cfg.answer_length
    return prompt, None if cfg.eos == "none" else answer


class _PromptDecoder:
    """Decodes one prompt: the confidence process and the per-token router logits."""

    def __init__(self, cfg: SynthConfig, shared_pop: np.ndarray, rng: np.random.Generator,
                 prompt_length: int, answer_length: int | None) -> None:
        self.cfg, self.p, self.rng = cfg, cfg.params, rng
        m = cfg.model
        self.shape = (m.num_moe_layers, m.num_experts)
        own = rng.standard_normal(self.shape, dtype=np.float32)
        pop = np.sqrt(self.p.pop_shared) * shared_pop + np.sqrt(1 - self.p.pop_shared) * own
        scale = self.p.pop_scale * float(np.exp(self.p.pop_prompt_sd * rng.standard_normal()))
        self.popularity = scale * pop
        self.mask_vector = rng.standard_normal(self.shape, dtype=np.float32)
        self.eos_vector = rng.standard_normal(self.shape, dtype=np.float32)
        depth = np.linspace(0.5, -0.5, m.num_moe_layers) if m.num_moe_layers > 1 else np.zeros(1)
        self.readiness_mid = self.p.readiness_mid + self.p.readiness_depth * depth
        self.layout = BlockLayout(prompt_length, cfg.gen_length, cfg.block_length)
        self.answer_length = answer_length
        self.cap = effective_steps(cfg.steps, cfg.gen_length, cfg.minimal_topk)
        self.schedule = transfer_schedule(cfg.block_length, self.cap)
        self.limit = float(np.log(cfg.threshold / (1 - cfg.threshold)))
        gen = self.layout.total_length - prompt_length
        self.eos_gen = np.zeros(gen, dtype=bool)          # over generated positions (padding included)
        if answer_length is not None:
            self.eos_gen[answer_length:] = True
        self.unmasked_gen = np.zeros(gen, dtype=bool)

    def _route(self, latent: np.ndarray) -> _Routed:
        logits = self.popularity[None] + self.p.token_scale * latent
        ids, weights = route(logits, self.cfg.model)
        counts = count_experts(ids, self.cfg.model.num_experts)
        if self.cfg.token_level:
            return _Routed(counts, ids, weights)
        return _Routed(counts, None, None)

    def _targets(self, start: int, n: int) -> np.ndarray:
        """Token terms of n positions from `start`, in absolute blocks sharing a context; EOS
        positions share the EOS term."""
        bl = self.cfg.block_length
        first, last = start // bl, (start + n - 1) // bl
        ctx = self.rng.standard_normal((last - first + 1, *self.shape), dtype=np.float32)
        context = ctx[(start + np.arange(n)) // bl - first]
        own = self.rng.standard_normal((n, *self.shape), dtype=np.float32)
        gen = start + np.arange(n) - self.layout.prompt_length
        w = np.where(gen < 0, self.p.prompt_context, self.p.block_context).astype(np.float32)[:, None, None]
        terms = np.sqrt(w) * context + np.sqrt(1 - w) * own
        eos = np.flatnonzero((gen >= 0) & self.eos_gen[np.clip(gen, 0, None)])
        if eos.size:
            terms[eos] = self.eos_vector + self.p.mask_position * own[eos]
        return terms

    def prompt_blocks(self) -> _Routed | None:
        """Routing of the prompt's complete blocks (frozen from the start), None when P < L."""
        n = self.layout.first_block * self.cfg.block_length
        return self._route(self._targets(0, n)) if n else None

    def block(self, b: int) -> tuple[list[tuple[_Routed, int]], _Routed, bool, bool]:
        """Generated block b: its steps (routing, positions committed), its final routing,
        whether decoding returned early after its last step and whether it stops after it."""
        p, bl, rng, lay = self.p, self.cfg.block_length, self.rng, self.layout
        start, end = lay.span(b)
        target = self._targets(start, bl)
        gen = start + np.arange(bl) - lay.prompt_length     # generated index of each position
        masked = gen >= 0
        n_masked = int(masked.sum())
        is_eos = np.zeros(bl, dtype=bool)
        is_eos[masked] = self.eos_gen[gen[masked]]
        wb = p.mask_block
        mask = np.sqrt(1 - wb) * self.mask_vector + np.sqrt(wb) * rng.standard_normal(self.shape, dtype=np.float32)
        position = p.mask_position * rng.standard_normal((bl, *self.shape), dtype=np.float32)
        drift = np.zeros((bl, *self.shape), dtype=np.float32)
        drift[~masked] = rng.standard_normal((bl - n_masked, *self.shape), dtype=np.float32)  # prompt tail
        latent = np.empty((bl, *self.shape), dtype=np.float32)
        base = p.conf_mean + p.conf_block_sd * rng.standard_normal() + p.conf_sd * rng.standard_normal(bl)
        base = base + p.eos_conf * is_eos
        innovation = np.float32(np.sqrt(1 - p.drift_corr**2))
        steps: list[tuple[_Routed, int]] = []
        early = False
        for step in range(self.cap):
            if not masked.any():
                break
            done = 1 - masked.sum() / n_masked
            conf = base + p.conf_rate * step + p.conf_context * done + p.conf_jitter * rng.standard_normal(bl)
            m, c = np.flatnonzero(masked), np.flatnonzero(~masked)
            a = _sigmoid(p.readiness_slope * (conf[m, None] - self.readiness_mid[None, :]))
            a = a.astype(np.float32)[:, :, None]
            latent[m] = ((1 - a) * mask[None] + a * target[m]) / np.sqrt((1 - a) ** 2 + a**2) + position[m]
            latent[c] = target[c] + p.drift_sd * drift[c]
            routed = self._route(latent)
            commit = select_transfer(conf, masked, self.limit, int(self.schedule[step]))
            masked &= ~commit
            steps.append((routed, int(commit.sum())))
            self.unmasked_gen[gen[commit]] = True
            # AR(1) drift of committed tokens; a newly committed one starts from the stationary law
            drift[c] = p.drift_corr * drift[c] + innovation * rng.standard_normal((c.size, *self.shape),
                                                                                  dtype=np.float32)
            new = np.flatnonzero(commit)
            drift[new] = rng.standard_normal((new.size, *self.shape), dtype=np.float32)
            if self.cfg.eos == "early-stop" and early_stop_index(self.eos_gen, self.unmasked_gen,
                                                                 bool((commit & is_eos).any())) is not None:
                early = True
                break
        done_mask = ~masked
        final_latent = np.where(done_mask[:, None, None], target + p.drift_sd * drift, latent)
        final = self._route(final_latent)
        stop = early or bool((self.eos_gen & self.unmasked_gen)[: end - lay.prompt_length].any())
        return steps, final, early, stop

    def first_eos(self) -> int | None:
        hits = np.flatnonzero(self.eos_gen & self.unmasked_gen)
        return int(hits[0]) if hits.size else None


def _decode_prompt(cfg: SynthConfig, shared_pop: np.ndarray, seq: np.random.SeedSequence) -> _PromptDecode:
    length_seq, decode_seq = seq.spawn(2)
    prompt_length, answer_length = draw_lengths(cfg, np.random.default_rng(length_seq))
    dec = _PromptDecoder(cfg, shared_pop, np.random.default_rng(decode_seq), prompt_length, answer_length)
    prompt = dec.prompt_blocks()
    prefix: list[_Routed] = [prompt] if prompt is not None else []
    prefix_counts = prompt.counts.copy() if prompt is not None else np.zeros(dec.shape, dtype=np.int64)
    runs: list[_Routed] = []
    committed: list[int] = []
    if cfg.kv_cache == "prefix" and prompt is not None:
        runs.append(prompt)
        committed.append(0)
    steps_per_block: list[int] = []
    early = False
    for b in range(dec.layout.generated_blocks):
        steps, final, early, stop = dec.block(b)
        steps_per_block.append(len(steps))
        for routed, n in steps:
            committed.append(n)
            if cfg.kv_cache == "prefix":
                runs.append(routed)
            else:
                ids, weights = _joined([*prefix, routed]) if cfg.token_level else (None, None)
                runs.append(_Routed(prefix_counts + routed.counts, ids, weights))
        if cfg.kv_cache == "prefix" and not early:
            runs.append(final)
            committed.append(0)
        prefix.append(final)
        prefix_counts = prefix_counts + final.counts
        if stop:
            break
    return _PromptDecode(prompt_length, answer_length, runs, committed, steps_per_block, early, dec.first_eos())


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
    prompts_meta: list[dict[str, Any]] = []
    for p in prompts:
        d = _decode_prompt(cfg, shared_pop, seeds[p + 1])
        layout = BlockLayout(d.prompt_length, cfg.gen_length, cfg.block_length)
        shapes = forward_structure(layout, cfg.kv_cache, d.steps_per_block, d.stopped_early)
        for shape_, run, n in zip(shapes, d.runs, d.committed, strict=True):
            rows.append({"prompt": p, "block": shape_.block, "step": shape_.step, "phase": shape_.phase,
                         "tokens": shape_.tokens, "context": shape_.context, "committed": n})
            counts.append(run.counts)
            if run.ids is not None and run.weights is not None:
                ids.extend(run.ids.transpose(1, 0, 2))
                weights.extend(run.weights.transpose(1, 0, 2))
        prompts_meta.append({
            "id": p, "prompt_length": d.prompt_length, "answer_length": d.answer_length,
            "gen_length": cfg.gen_length, "generated": output_length(d.first_eos, cfg.gen_length),
            "denoising_steps": int(sum(d.steps_per_block)), "blocks": len(d.steps_per_block),
            "stopped_at_eos": d.first_eos is not None, "early_stop": d.stopped_early,
        })
    forwards = pd.DataFrame(rows)
    for col in ("prompt", "block", "step", "tokens", "context", "committed"):
        forwards[col] = forwards[col].astype(np.int64)
    meta = TraceMeta(
        model=cfg.model, block_length=cfg.block_length, threshold=float(cfg.threshold), kv_cache=cfg.kv_cache,
        gen_length=cfg.gen_length, source="synthetic", seed=cfg.seed,
        generator=generator_metadata(cfg), prompts=prompts_meta,
        notes="synthetic trace: structure of block-diffusion routing, calibrated to published statistics; "
              "not captured from a real model",
    )
    return Trace(
        meta=meta, forwards=forwards, expert_tokens=np.stack(counts).astype(np.int32),
        topk_ids=[np.ascontiguousarray(a) for a in ids] if cfg.token_level else None,
        topk_weights=[np.ascontiguousarray(a) for a in weights] if cfg.token_level else None,
    )


def generator_metadata(cfg: SynthConfig) -> dict[str, Any]:
    """Everything needed to regenerate the trace (SynthConfig.from_generator), in TraceMeta.generator."""
    return {
        "name": GENERATOR_NAME, "version": GENERATOR_VERSION, "tidesim_version": __version__,
        "prompts": cfg.prompts, "prompt_length": cfg.prompt_length, "gen_length": cfg.gen_length,
        "block_length": cfg.block_length, "threshold": float(cfg.threshold), "kv_cache": cfg.kv_cache,
        "steps": cfg.steps, "minimal_topk": cfg.minimal_topk, "eos": cfg.eos, "answer_length": cfg.answer_length,
        "seed": cfg.seed, "token_level": cfg.token_level, "params": asdict(cfg.params),
    }
