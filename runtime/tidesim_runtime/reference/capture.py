"""Capture expert-activation traces: forward hooks on router (gate) modules -> tidesim Trace.

The hooks only read the gate's output, whose first element is topk_idx [tokens, top_k] (second:
topk_weight), which holds for this package's SigmoidGroupGate and for the official
LLaDA2MoeGate alike; so the same recorder captures the reference model and the official Hugging
Face implementation. Routing is never altered. Each MoE layer's gate must run exactly once per
forward; the decoder tells the recorder when a forward ends (generate's on_forward callback),
and its row (prompt, block, step, phase, tokens, context, committed) is paired with the counts.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from tidesim.decode import layout
from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.schema import Trace, TraceMeta
from tidesim.trace.validate import validate_trace
from tidesim_runtime.reference.generate import DecodeConfig, ForwardFn, ForwardRecord, generate

GATE_CLASS_NAMES = ("LLaDA2MoeGate", "SigmoidGroupGate")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_prompts(prompts: Sequence[Sequence[int]], spec: ModelSpec, cfg: DecodeConfig,
                  max_positions: int | None = None, where: str = "prompt") -> None:
    """Refuse, before any decoding, a prompt the decode cannot take: empty, a token outside the
    vocabulary, the mask token inside it, or a padded sequence ceil((P + G) / L) x L longer than
    `max_positions` (the config's max_position_embeddings; None: no limit)."""
    for i, q in enumerate(prompts):
        if len(q) == 0:
            raise InputError(f"{where} {i} is empty")
        for t in q:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < spec.vocab_size:
                raise InputError(f"{where} {i} has token {t!r} outside [0, {spec.vocab_size})")
            if t == spec.mask_token_id:
                raise InputError(f"{where} {i} holds the mask token {t}")
        _, total = layout(len(q), cfg.gen_length, cfg.block_length)
        if max_positions is not None and total * cfg.block_length > max_positions:
            raise InputError(f"{where} {i}: {len(q)} prompt tokens + gen length {cfg.gen_length}, padded to "
                             f"{total * cfg.block_length} positions in blocks of {cfg.block_length}, exceed the "
                             f"model's max_position_embeddings {max_positions}; shorten the prompt or the gen length")


def prompt_fingerprint(tokens: Sequence[int]) -> str:
    """sha256 of the token ids written as decimal numbers joined by single spaces (ASCII), so
    `printf '1 2 3' | sha256sum` reproduces it."""
    return hashlib.sha256(" ".join(str(int(t)) for t in tokens).encode("ascii")).hexdigest()


@dataclass
class ForwardRouting:
    """What the gates saw in one forward: tokens and per-layer counts (and token-level routing)."""

    tokens: int
    counts: np.ndarray
    topk_ids: list[np.ndarray] = field(default_factory=list)
    topk_weights: list[np.ndarray] = field(default_factory=list)


class GateRecorder:
    """Forward hooks on every module whose class name is in `class_names`, ordered by layer."""

    def __init__(self, model: nn.Module, num_experts: int, top_k: int, token_level: bool = False,
                 class_names: Sequence[str] = GATE_CLASS_NAMES) -> None:
        found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in class_names]
        if not found:
            raise InputError(f"no router modules of class {' or '.join(class_names)} found in the model")
        keyed = sorted((_layer_index(name, i), i, m) for i, (name, m) in enumerate(found))
        self.layers = [layer for layer, _, _ in keyed]
        modules = [m for _, _, m in keyed]
        self.num_experts, self.top_k, self.token_level = num_experts, top_k, token_level
        self._pending: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if self._pending[i] is not None:
                raise RuntimeError(f"gate of layer {self.layers[i]} ran twice in one forward")
            idx = output[0].detach()
            weights = output[1].detach() if self.token_level and len(output) > 1 else None
            self._pending[i] = (idx.reshape(-1, idx.shape[-1]), None if weights is None else
                                weights.reshape(-1, weights.shape[-1]))
        return hook

    def take(self) -> ForwardRouting:
        """The routing of the forward that just ended; resets for the next one."""
        missing = [self.layers[i] for i, p in enumerate(self._pending) if p is None]
        if missing:
            raise RuntimeError(f"gate of layer {missing[0]} did not run in this forward")
        pending = [p for p in self._pending if p is not None]
        tokens = {int(idx.shape[0]) for idx, _ in pending}
        if len(tokens) != 1:
            raise RuntimeError(f"gates saw different token counts in one forward: {sorted(tokens)}")
        counts = np.stack([
            torch.bincount(idx.reshape(-1).long(), minlength=self.num_experts).cpu().numpy() for idx, _ in pending
        ]).astype(np.int32)
        out = ForwardRouting(tokens=tokens.pop(), counts=counts)
        if self.token_level:
            out.topk_ids = [idx.cpu().numpy().astype(np.int16) for idx, _ in pending]
            out.topk_weights = [(w.float().cpu().numpy() if w is not None else np.zeros(idx.shape, np.float32))
                                for idx, w in pending]
        self._pending = [None] * len(pending)
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> GateRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _layer_index(name: str, fallback: int) -> int:
    m = _LAYER_RE.search("." + name + ".")
    return int(m.group(1)) if m else fallback


class HFForward:
    """Drive a Hugging Face LLaDA2.0 model (its own modeling code) with this package's decoder.

    Passes the block-causal mask as a 4D additive mask (0 = attend, dtype minimum = blocked), which
    both eager and SDPA attention in transformers accept, and absolute position ids. Only
    kv_cache `none` is supported: the official code keeps no cache between denoising steps.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.dtype = next(model.parameters()).dtype

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, logits_last: int | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        if past is not None:
            raise InputError("the Hugging Face model is driven with --kv-cache none only")
        additive = torch.zeros(mask.shape, dtype=self.dtype)
        additive = additive.masked_fill(~mask, torch.finfo(self.dtype).min)[None, None]
        out = self.model(input_ids=input_ids, attention_mask=additive, position_ids=positions[None])
        logits = out.logits if hasattr(out, "logits") else out[0]
        if logits_last is not None:
            logits = logits[:, -logits_last:]
        return logits.float(), []


@dataclass
class CaptureSettings:
    """How a capture was run; goes into TraceMeta.generator."""

    weights: str
    compute_dtype: str
    token_level: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def capture_trace(
    model: nn.Module,
    spec: ModelSpec,
    prompts: Sequence[Sequence[int]],
    cfg: DecodeConfig,
    settings: CaptureSettings,
    seed: int | None,
    forward: ForwardFn | None = None,
    blocks: Callable[[int], Callable[[Iterable[int]], Iterator[int]]] | None = None,
    prompt_text: Sequence[str | None] | None = None,
) -> tuple[Trace, list[list[int]]]:
    """Decode every prompt with gate hooks on `model`; return the validated trace and the
    generated tokens per prompt (counted as the official generate counts them: cut after the
    first EOS, which is included). `forward` drives the model (default: the model itself, a
    LLaDA2Model); `blocks(prompt_id)` may wrap each prompt's block loop (progress bars);
    `prompt_text` (the decoded text of each prompt) is kept in the trace's prompt metadata."""
    if cfg.kv_cache == "prefix" and isinstance(forward, HFForward):
        raise InputError("the Hugging Face model is driven with --kv-cache none only")
    if prompt_text is not None and len(prompt_text) != len(prompts):
        raise ValueError("prompt_text needs one entry per prompt")
    drive: ForwardFn = forward if forward is not None else model
    rows: list[dict[str, Any]] = []
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    prompts_meta: list[dict[str, Any]] = []
    outputs: list[list[int]] = []
    with GateRecorder(model, spec.num_experts, spec.top_k, settings.token_level) as rec:
        if len(rec.layers) != spec.num_moe_layers or rec.layers != spec.moe_layer_ids:
            raise InputError(f"the model's gates sit at layers {rec.layers}, but the spec has MoE layers "
                             f"{spec.moe_layer_ids}")
        for pid, prompt in enumerate(prompts):
            def on_forward(r: ForwardRecord, pid: int = pid) -> None:
                routing = rec.take()
                if routing.tokens != r.tokens:
                    raise RuntimeError(f"gates saw {routing.tokens} tokens, the decoder ran {r.tokens}")
                rows.append({"prompt": pid, "block": r.block, "step": r.step, "phase": r.phase,
                             "tokens": r.tokens, "context": r.context, "committed": r.committed})
                counts.append(routing.counts)
                ids.extend(routing.topk_ids)
                weights.extend(routing.topk_weights)
            result = generate(drive, prompt, cfg, spec.mask_token_id, spec.eos_token_id, on_forward,
                              blocks(pid) if blocks is not None else None)
            outputs.append(result.generated)
            entry: dict[str, Any] = {
                "id": pid, "tokens": len(prompt), "sha256": prompt_fingerprint(prompt),
                "generated": len(result.generated), "denoising_steps": result.denoising_steps,
                "steps_per_block": list(result.steps_per_block), "stopped_at_eos": result.stopped_at_eos,
            }
            if prompt_text is not None and prompt_text[pid] is not None:
                entry["text"] = prompt_text[pid]
            prompts_meta.append(entry)
    meta = TraceMeta(
        model=spec, block_length=cfg.block_length, threshold=float(cfg.threshold), kv_cache=cfg.kv_cache,
        gen_length=cfg.gen_length, source="captured", seed=seed, prompts=prompts_meta,
        generator={
            "tool": "tidesim_runtime.reference.capture", "weights": settings.weights,
            "compute_dtype": settings.compute_dtype,
            "token_level": settings.token_level, "decode": cfg.to_dict(),
            "torch_version": torch.__version__.split("+")[0],
            "hooks": "forward hooks on " + "/".join(GATE_CLASS_NAMES) + " modules", **settings.extra,
        },
        notes=("random weights: routing has the model's shapes but no trained behaviour"
               if settings.weights.startswith("random") else ""),
    )
    forwards = pd.DataFrame(rows, columns=["prompt", "block", "step", "phase", "tokens", "context", "committed"])
    trace = Trace(
        meta=meta, forwards=forwards,
        expert_tokens=np.stack(counts) if counts else np.zeros((0, spec.num_moe_layers, spec.num_experts), np.int32),
        topk_ids=ids if settings.token_level else None,
        topk_weights=weights if settings.token_level else None,
    )
    return validate_trace(trace, source="captured trace"), outputs
