"""Block-diffusion decoding (LLaDA2.0 style) with two KV-cache modes that give the same tokens.

Layout of one sequence: the prompt (P tokens) then gen_length generated positions, all starting
as the mask token. Block ids: every prompt position has block id 0 (the whole prompt is ONE block,
attending to itself bidirectionally); generated position j (0-based) has block id 1 + j // L for
block_length L, so generated block b (0-based, as written in traces) has block id b + 1. A token
may attend to a key iff the key's block id is <= its own (block-causal): it sees its own block and
all earlier ones. A last block shorter than L is allowed when gen_length is not a multiple of L.

Each denoising step runs the model, and every masked position of the current block whose top-1
probability exceeds the threshold is committed; if none does, the single most confident one is.
The mask token is never a valid prediction (its logit is excluded). Temperature 0 (argmax) is
the default; with temperature > 0 tokens are sampled from a torch.Generator seeded by `seed`.
After a block is complete, decoding stops if it holds the end-of-sequence token.

KV-cache modes:
- none: every step runs prompt + earlier blocks + current block (the public TIDE code).
- prefix: one prefill forward of the prompt; each step runs only the current block against the
  cached keys/values; once a block is complete one extra `commit` forward runs it to append its
  keys/values to the cache (after every block, the last one too, as docs/trace-format.md and the
  synthetic generator count it; an engine may skip the last one).
With the block-causal mask, the prefix never attends to the current block, so both modes compute
the same function: tokens agree up to floating point (tests use float32, where rounding
differences do not flip an argmax or a threshold decision).

Trace bookkeeping (docs/trace-format.md): every forward gets (block, step, phase, tokens, context,
committed). The prefill is block -1, step 0; a block's denoising steps are steps 0, 1, ...; its
commit forward takes the next step number. `tokens` = positions run, `context` = keys attended by
the last position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tidesim.errors import InputError

KV_MODES = ("none", "prefix")


class ForwardFn(Protocol):
    """What decoding needs from a model (LLaDA2Model satisfies it)."""

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, logits_last: int | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]: ...


@dataclass(frozen=True)
class DecodeConfig:
    """Decode settings; invalid values raise InputError."""

    gen_length: int
    block_length: int = 32
    threshold: float = 0.95
    kv_cache: str = "none"
    temperature: float = 0.0
    eos_stop: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.gen_length, int) or self.gen_length <= 0:
            raise InputError(f"gen_length must be a positive integer, got {self.gen_length!r}")
        if not isinstance(self.block_length, int) or self.block_length <= 0:
            raise InputError(f"block_length must be a positive integer, got {self.block_length!r}")
        if not 0 < self.threshold <= 1:
            raise InputError(f"threshold must lie in (0, 1], got {self.threshold!r}")
        if self.kv_cache not in KV_MODES:
            raise InputError(f"kv_cache must be one of {', '.join(KV_MODES)}, got {self.kv_cache!r}")
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0, got {self.temperature!r}")

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.gen_length / self.block_length)

    def to_dict(self) -> dict[str, object]:
        return {"gen_length": self.gen_length, "block_length": self.block_length, "threshold": self.threshold,
                "kv_cache": self.kv_cache, "temperature": self.temperature, "eos_stop": self.eos_stop,
                "seed": self.seed}


@dataclass(frozen=True)
class ForwardRecord:
    """One forward pass, in the trace's terms."""

    block: int
    step: int
    phase: str
    tokens: int
    context: int
    committed: int


@dataclass
class DecodeResult:
    """Tokens and forwards of one prompt's decode."""

    prompt: list[int]
    sequence: list[int]
    forwards: list[ForwardRecord] = field(default_factory=list)
    stopped_at_eos: bool = False
    eos_token_id: int | None = None

    @property
    def generated(self) -> list[int]:
        """Generated tokens up to (not including) the first end-of-sequence token."""
        if self.eos_token_id is not None and self.eos_token_id in self.sequence:
            return self.sequence[: self.sequence.index(self.eos_token_id)]
        return list(self.sequence)

    @property
    def denoising_steps(self) -> int:
        return sum(1 for f in self.forwards if f.phase == "step")


def block_ids(prompt_len: int, gen_length: int, block_length: int) -> torch.Tensor:
    """Block id of every position: 0 for the prompt, 1 + j // block_length for generated j."""
    gen = 1 + torch.arange(gen_length) // block_length
    return torch.cat([torch.zeros(prompt_len, dtype=torch.long), gen])


def block_causal_mask(query_blocks: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """[queries, keys] bool: a query sees keys of its own block and of every earlier block."""
    return key_blocks[None, :] <= query_blocks[:, None]


def generate(
    model: ForwardFn,
    prompt: Sequence[int],
    cfg: DecodeConfig,
    mask_token_id: int,
    eos_token_id: int | None = None,
    on_forward: Callable[[ForwardRecord], None] | None = None,
    blocks: Callable[[Iterable[int]], Iterator[int]] | None = None,
) -> DecodeResult:
    """Decode one prompt; `on_forward` is called after every forward (capture), `blocks` may wrap
    the block loop (a progress bar)."""
    if len(prompt) == 0:
        raise InputError("a prompt must hold at least one token")
    with torch.inference_mode():
        return _Decoder(model, list(prompt), cfg, mask_token_id, eos_token_id, on_forward).run(blocks)


class _Decoder:
    """State of one decode: the sequence, the block ids, the prefix cache, the records."""

    def __init__(self, model: ForwardFn, prompt: list[int], cfg: DecodeConfig, mask_id: int,
                 eos_id: int | None, on_forward: Callable[[ForwardRecord], None] | None) -> None:
        self.model, self.cfg, self.mask_id, self.eos_id = model, cfg, mask_id, eos_id
        self.on_forward = on_forward
        self.P = len(prompt)
        self.x = torch.tensor(prompt + [mask_id] * cfg.gen_length, dtype=torch.long)
        self.blk = block_ids(self.P, cfg.gen_length, cfg.block_length)
        self.pos = torch.arange(len(self.x))
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.result = DecodeResult(prompt=prompt, sequence=[], eos_token_id=eos_id)

    def record(self, rec: ForwardRecord) -> None:
        self.result.forwards.append(rec)
        if self.on_forward is not None:
            self.on_forward(rec)

    def run(self, blocks: Callable[[Iterable[int]], Iterator[int]] | None) -> DecodeResult:
        prefix = self.cfg.kv_cache == "prefix"
        step = 0
        if prefix:
            _, self.cache = self._forward(0, self.P, past_len=0, logits_last=1)
            self.record(ForwardRecord(-1, 0, "prefill", self.P, self.P, 0))
        order = range(self.cfg.num_blocks)
        for b in (blocks(order) if blocks is not None else order):
            start = self.P + b * self.cfg.block_length
            end = min(start + self.cfg.block_length, len(self.x))
            while bool((self.x[start:end] == self.mask_id).any()):
                if prefix:
                    logits, _ = self._forward(start, end, past_len=start)
                    tokens = end - start
                else:
                    logits, _ = self._forward(0, end, past_len=0, logits_last=end - start)
                    tokens = end
                n = self._commit(start, end, logits[0])
                self.record(ForwardRecord(b, step, "step", tokens, end, n))
                step += 1
            if prefix:
                _, self.cache = self._forward(start, end, past_len=start, logits_last=1)
                self.record(ForwardRecord(b, step, "commit", end - start, end, 0))
            step = 0
            done = self.x[start:end].tolist()
            self.result.sequence.extend(done)
            if self.cfg.eos_stop and self.eos_id is not None and self.eos_id in done:
                self.result.stopped_at_eos = True
                break
        return self.result

    def _forward(self, start: int, end: int, past_len: int, logits_last: int | None = None
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run positions [start, end) against cached keys [0, past_len) (past_len == start)."""
        mask = block_causal_mask(self.blk[start:end], self.blk[:end])
        past = self.cache if past_len else None
        last = logits_last if logits_last is not None else end - start
        return self.model(self.x[None, start:end], self.pos[start:end], mask, past, last)

    def _commit(self, start: int, end: int, logits: torch.Tensor) -> int:
        """Commit masked positions of the block from logits [block positions, vocab]."""
        lg = logits.float().clone()
        lg[:, self.mask_id] = float("-inf")
        if self.cfg.temperature > 0:
            probs = torch.softmax(lg / self.cfg.temperature, dim=-1)
            pred = torch.multinomial(probs, 1, generator=self.gen)[:, 0]
            conf = probs.gather(1, pred[:, None])[:, 0]
        else:
            conf, pred = torch.softmax(lg, dim=-1).max(dim=-1)
        block = self.x[start:end]
        masked = block == self.mask_id
        conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
        chosen = masked & (conf > self.cfg.threshold)
        if not bool(chosen.any()):
            chosen[int(torch.argmax(conf))] = True
        block[chosen] = pred[chosen]
        return int(chosen.sum())
