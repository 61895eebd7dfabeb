"""Engine forward passes -> a tidesim trace: the one place every converter's output is assembled.

Each engine reader (one module per engine) turns its files into EnginePass records: the logical
expert ids each token was routed to in each MoE layer, what the engine says the pass was (a
prefill or a decode), the tokens' positions where recorded, and how many sequences it served.
`assemble` decides the decode shape and writes the forward columns (docs/trace-format.md,
"Converted traces"):

- Repeated passes over the same positions (a diffusion LLM served by the engine: every denoising
  step of a block runs the block's positions again) become the steps of one block.
- Otherwise the trace is autoregressive: a prefill starts a prompt (block -1), then every decode
  pass is one forward with block = step = its index in the prompt (block length 1), committing
  one token per sequence.

What a reader had to infer is listed in the Provenance, which goes into the trace's metadata.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim.trace.schema import Trace, TraceMeta

PASS_KINDS = ("prefill", "decode", "unknown")


@dataclass
class EnginePass:
    """One forward pass of the engine.

    ids: int [tokens, MoE layers, top_k] logical expert ids (checked by check_ids), or None when
    the engine recorded counts only: then `counts` [MoE layers, experts] and `count_tokens`.
    kind: "prefill" (starts a prompt), "decode" (one token per sequence) or "unknown".
    positions: int [tokens] where the engine recorded them, else None.
    sequences: sequences served by the pass (tokens a decode pass commits).
    context: keys the longest query attends to, where known (else from positions, else tokens).
    commits: tokens the pass commits, where the reader knows better than `sequences`.
    """

    ids: np.ndarray | None
    kind: str
    positions: np.ndarray | None = None
    sequences: int = 1
    context: int | None = None
    commits: int | None = None
    counts: np.ndarray | None = None
    count_tokens: int = 0

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0]) if self.ids is not None else self.count_tokens

    def expert_counts(self, num_experts: int) -> np.ndarray:
        if self.ids is not None:
            return counts_of(self.ids, num_experts)
        assert self.counts is not None
        return self.counts.astype(np.int32)


@dataclass
class Provenance:
    """Where a converted trace came from: engine, input files (sha256), what was inferred and
    what the input cannot tell."""

    engine: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    inferred: list[str] = field(default_factory=list)
    cannot_derive: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add_input(self, path: Path) -> None:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        self.inputs.append({"path": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()})

    def infer(self, note: str) -> None:
        if note not in self.inferred:
            self.inferred.append(note)


def check_ids(ids: np.ndarray, model: ModelSpec, where: str) -> np.ndarray:
    """ids as int64 [tokens, MoE layers, top_k], every entry a valid expert id, distinct per token
    and layer; else one line naming `where`."""
    layers, k, n_exp = model.num_moe_layers, model.top_k, model.num_experts
    if ids.ndim != 3 or ids.shape[1:] != (layers, k):
        raise InputError(f"{where}: routing has shape {tuple(ids.shape)}, expected (tokens, {layers} MoE layers, "
                         f"top_k {k}) for model {model.name}; is it a dump of another model?")
    if ids.size == 0:
        return ids.astype(np.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        raise InputError(f"{where}: expert id {low} in a routed slot (padding -1 where the model routes "
                         f"{k} experts per token); the dump does not match model {model.name}")
    if high >= n_exp:
        raise InputError(f"{where}: expert id {high} out of range for the {n_exp} experts of model {model.name}; "
                         "is it a dump of another model, or physical ids without their map?")
    ids = ids.astype(np.int64, copy=False)
    if k > 1:
        srt = np.sort(ids, axis=2)
        if (srt[:, :, 1:] == srt[:, :, :-1]).any():
            t, layer = np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2))[0]
            raise InputError(f"{where}: token {t} is routed twice to the same expert in MoE layer "
                             f"{model.moe_layer_ids[layer]}; the token order of the input is not the one expected")
    return ids


def counts_of(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """int32 [MoE layers, experts]: tokens routed to each expert in each layer, from ids [T, L, k]."""
    layers = ids.shape[1]
    flat = (ids + (np.arange(layers, dtype=np.int64) * num_experts)[None, :, None]).ravel()
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts).astype(np.int32)


def _repeats(passes: list[EnginePass]) -> np.ndarray:
    """bool [n]: pass i runs exactly the positions of pass i-1 (a further denoising step)."""
    out = np.zeros(len(passes), dtype=bool)
    for i in range(1, len(passes)):
        a, b = passes[i - 1].positions, passes[i].positions
        out[i] = a is not None and b is not None and a.shape == b.shape and bool(np.array_equal(a, b))
    return out


def _context(p: EnginePass) -> int:
    if p.context is not None:
        return max(int(p.context), p.tokens)
    if p.positions is not None and p.positions.size:
        return max(int(p.positions.max()) + 1, p.tokens)
    return p.tokens


def _autoregressive_rows(passes: list[EnginePass], prov: Provenance) -> tuple[list[dict[str, Any]], list[int]]:
    """A prefill pass starts a prompt; an "unknown" pass of several tokens starts one after decode
    passes and continues the prefill (a chunk: block -1, the next step) before any."""
    rows: list[dict[str, Any]] = []
    generated: list[int] = []
    prompt, decoded, chunks, seen = -1, 0, 0, 0
    for p in passes:
        unknown_many = p.kind == "unknown" and p.tokens > 1
        chunk = unknown_many and chunks > 0 and decoded == 0
        if not chunk and (p.kind == "prefill" or prompt < 0 or (unknown_many and decoded > 0)):
            prompt, decoded, chunks, seen = prompt + 1, 0, 0, 0
            generated.append(0)
        is_prefill = chunk or (decoded == 0 and chunks == 0 and p.kind != "decode"
                               and (p.kind == "prefill" or p.tokens > 1))
        if chunk:                       # the prefill's output token comes from its last chunk
            generated[-1] -= rows[-1]["committed"]
            rows[-1]["committed"] = 0
        seen += p.tokens
        known = p.context is not None or p.positions is not None
        commits = min(p.commits if p.commits is not None else p.sequences, p.tokens)
        rows.append({"prompt": prompt, "block": -1 if is_prefill else decoded,
                     "step": chunks if is_prefill else decoded, "phase": "prefill" if is_prefill else "step",
                     "tokens": p.tokens, "context": _context(p) if known else seen, "committed": commits})
        generated[-1] += commits
        if is_prefill:
            chunks += 1
        else:
            decoded += 1
    if passes and passes[0].kind == "decode":
        prov.infer("the first pass is a decode: the recording started after its prompt's prefill")
    if any(r["phase"] == "prefill" and r["step"] > 0 for r in rows):
        prov.infer("consecutive passes of several tokens before any decode pass are chunks of one prefill")
    return rows, generated


def _diffusion_rows(passes: list[EnginePass], repeats: np.ndarray,
                    prov: Provenance) -> tuple[list[dict[str, Any]], list[int], int]:
    """Blocks of repeated passes; a single pass whose positions start at 0 is a prompt's prefill."""
    starts = [i for i in range(len(passes)) if not repeats[i]]
    lengths = {passes[s].tokens for s in starts if s + 1 < len(passes) and repeats[s + 1]}
    if len(lengths) != 1:
        raise InputError(f"repeated passes run blocks of {sorted(lengths)} positions; tidesim traces have one "
                         "block length: convert a recording of one block length")
    block_length = lengths.pop()
    rows: list[dict[str, Any]] = []
    generated: list[int] = []
    prompt, block = -1, 0
    for n, s in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(passes)
        first = passes[s]
        pos = first.positions
        at_zero = pos is not None and pos.size > 0 and int(pos.min()) == 0
        if at_zero or prompt < 0:
            prompt, block = prompt + 1, 0
            generated.append(0)
            if end - s == 1 and at_zero and first.tokens != block_length:
                rows.append({"prompt": prompt, "block": -1, "step": 0, "phase": "prefill", "tokens": first.tokens,
                             "context": _context(first), "committed": 0})
                continue
        if pos is not None and pos.size and int(pos.max()) - int(pos.min()) + 1 != first.tokens:
            raise InputError(f"pass {s}: repeated positions are not one contiguous block; tidesim cannot map "
                             "them to a block of a diffusion decode")
        for step in range(end - s):
            last = step == end - s - 1
            rows.append({"prompt": prompt, "block": block, "step": step, "phase": "step",
                         "tokens": passes[s + step].tokens, "context": _context(passes[s + step]),
                         "committed": passes[s + step].tokens if last else 0})
        generated[-1] += first.tokens
        block += 1
    prov.infer("diffusion: consecutive passes over the same positions are the denoising steps of one block; "
               "which positions each step committed is not recorded, so a block's positions count as committed "
               "at its last step")
    prov.infer("diffusion: a single pass whose positions start at 0 is a prompt's prefill (prefix KV cache)")
    return rows, generated, block_length


def assemble(passes: list[EnginePass], model: ModelSpec, prov: Provenance, token_level: bool = True) -> Trace:
    """The trace of the passes, in order; provenance goes into the metadata's `generator`."""
    passes = [p for p in passes if p.tokens > 0]
    if not passes:
        raise InputError(f"{prov.engine}: the input holds no forward pass with tokens; record some requests first")
    repeats = _repeats(passes)
    if repeats.any():
        rows, generated, block_length = _diffusion_rows(passes, repeats, prov)
        decode, gen_length = "diffusion", max(max(generated), block_length)
    else:
        rows, generated = _autoregressive_rows(passes, prov)
        decode, block_length, gen_length = "autoregressive", 1, max(max(generated), 1)
    forwards = pd.DataFrame(rows)
    for col in ("prompt", "block", "step", "tokens", "context", "committed"):
        forwards[col] = forwards[col].astype(np.int64)
    counts = np.stack([p.expert_counts(model.num_experts) for p in passes])
    prompts = []
    for pid in range(len(generated)):
        f = forwards[forwards["prompt"] == pid]
        pre = f[f["phase"] == "prefill"]
        entry: dict[str, Any] = {"id": pid, "generated": int(generated[pid]),
                                 "denoising_steps": int((f["phase"] == "step").sum())}
        if len(pre):
            entry["prompt_length"] = int(pre["tokens"].iloc[0])
        prompts.append(entry)
    meta = TraceMeta(model=model, block_length=block_length, threshold=1.0, kv_cache="prefix",
                     gen_length=int(gen_length), source="converted", seed=None, decode=decode,
                     generator={"name": "tidesim.trace.convert", **asdict(prov)}, prompts=prompts,
                     notes=f"converted from a {prov.engine} routing record; see generator.inferred")
    topk = None
    if token_level and all(p.ids is not None for p in passes):
        topk = [np.ascontiguousarray(p.ids[:, layer, :]).astype(np.int16) for p in passes  # type: ignore[index]
                for layer in range(model.num_moe_layers)]
    return Trace(meta=meta, forwards=forwards, expert_tokens=counts, topk_ids=topk)
