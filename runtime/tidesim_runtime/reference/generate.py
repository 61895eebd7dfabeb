"""Block-diffusion decoding by the rules of the official LLaDA2.0 `generate` (docs/capture.md).

Layout (absolute blocks): with prompt length P, generation length G and block length L the
sequence has N = ceil((P + G) / L) x L positions, the prompt then the mask id; block b is
positions [bL, (b+1)L), and a position attends to keys of its own block and of earlier blocks
(the prompt's blocks too). Position ids are absolute. Decoding starts at block P // L, whose
first P mod L positions are prompt tokens that stay fixed; the last block is decoded in full
(its padding too) and the output is cut at G.

Steps: each block runs at most S = min(steps, G // minimal_topk) denoising steps, with the quota
num_transfer[s] (tidesim.decode.transfer_schedule). At a step, over the block's L
positions, logits are tempered and filtered (top-k, top-p), turned into probabilities over the
whole vocabulary (mask id included: committing it leaves the position masked), and a token is
taken (argmax, or drawn when do_sample); the still-masked positions whose token probability
exceeds the threshold are committed if there are at least num_transfer[s] of them, else the
num_transfer[s] most confident masked ones. A block ends when nothing is masked or its steps are
used up; decoding stops after a block holding an EOS past the prompt (or, with eos_early_stop,
right after a step that commits an EOS with nothing masked between the prompt and it).

KV-cache modes share the layout and the commit rule:
- none (the official code): every step of block b runs positions [0, (b+1)L).
- prefix (dInfer / Fast-dLLM style): one prefill forward of the prompt's whole blocks [0, (P//L)L)
  (none when P < L); each step runs the block's L positions against cached keys/values; after a
  block one `commit` forward runs it once more to append its keys/values (after the last block
  too, as the trace format counts it). Block-causal attention makes the prefix independent of
  later blocks, so both modes compute the same function up to floating point.

Trace bookkeeping (docs/trace-format.md): every forward gets (block, step, phase, tokens,
context, committed), block counted from the first decoded block (0) and -1 for the prefill;
`committed` counts positions that stopped being masked at that step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from tidesim.decode import KV_MODES, check_decode, effective_steps, layout, transfer_schedule
from tidesim.errors import InputError

__all__ = ["KV_MODES", "DecodeConfig", "DecodeResult", "ForwardRecord", "generate", "sample_tokens"]


class ForwardFn(Protocol):
    """What decoding needs from a model (LLaDA2Model satisfies it)."""

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None, logits_last: int | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]: ...


@dataclass(frozen=True)
class DecodeConfig:
    """Decode settings, with the official `generate` defaults; invalid values raise InputError.

    temperature divides the logits unless it is 0 or 1; tokens are the argmax unless do_sample
    (then drawn from a torch.Generator seeded by `seed`). eos_stop (default True, as the official
    code) stops after the block in which an EOS appears; False decodes every block.
    """

    gen_length: int
    block_length: int = 32
    threshold: float = 0.95
    kv_cache: str = "none"
    temperature: float = 0.0
    eos_stop: bool = True
    seed: int = 0
    steps: int = 32
    top_k: int | None = None
    top_p: float | None = None
    do_sample: bool = False
    minimal_topk: int = 1
    eos_early_stop: bool = False

    def __post_init__(self) -> None:
        check_decode(self.gen_length, self.block_length, self.steps, self.threshold, self.minimal_topk,
                     self.eos_early_stop, self.kv_cache, self.temperature, self.top_k, self.top_p,
                     self.do_sample, self.seed)

    @property
    def num_blocks(self) -> int:
        """Blocks decoded when the prompt length is a multiple of the block length."""
        return -(-self.gen_length // self.block_length)

    def decoded_blocks(self, prompt_len: int) -> int:
        """Blocks decoded at most for a prompt of `prompt_len` tokens."""
        first, total = layout(prompt_len, self.gen_length, self.block_length)
        return total - first

    @property
    def max_steps(self) -> int:
        """Denoising steps per block at most (the official cap)."""
        return effective_steps(self.steps, self.gen_length, self.minimal_topk)

    def to_dict(self) -> dict[str, object]:
        return {"gen_length": self.gen_length, "block_length": self.block_length, "threshold": self.threshold,
                "kv_cache": self.kv_cache, "temperature": self.temperature, "eos_stop": self.eos_stop,
                "seed": self.seed, "steps": self.steps, "top_k": self.top_k, "top_p": self.top_p,
                "do_sample": self.do_sample, "minimal_topk": self.minimal_topk,
                "eos_early_stop": self.eos_early_stop}


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
    """Tokens and forwards of one prompt's decode.

    `sequence`: the G positions after the prompt as decoding left them (mask id where never
    committed); `output`: what the official generate returns (cut after the first EOS, which
    it includes, else at G; with eos_early_stop, up to the EOS that stopped it).
    """

    prompt: list[int]
    sequence: list[int]
    forwards: list[ForwardRecord] = field(default_factory=list)
    stopped_at_eos: bool = False
    eos_token_id: int | None = None
    output: list[int] = field(default_factory=list)
    steps_per_block: list[int] = field(default_factory=list)

    @property
    def generated(self) -> list[int]:
        """The generated tokens, counted as the official generate counts them (EOS included)."""
        return list(self.output)

    @property
    def denoising_steps(self) -> int:
        return sum(1 for f in self.forwards if f.phase == "step")


def block_ids(total_length: int, block_length: int) -> torch.Tensor:
    """Absolute block id of every position: position // block_length."""
    return torch.arange(total_length) // block_length


def block_causal_mask(query_blocks: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """[queries, keys] bool: a query sees keys of its own block and of every earlier block."""
    return key_blocks[None, :] <= query_blocks[:, None]


def sample_tokens(logits: torch.Tensor, cfg: DecodeConfig, gen: torch.Generator | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, its probability) per row of logits [positions, vocab], by the official sampling
    rule: temper (T not 0 or 1), keep the top_k best logits (ties kept), keep the smallest
    best-first prefix whose probability mass exceeds top_p (the best token always), softmax
    over the whole vocabulary, then argmax or a draw."""
    lg = logits.float()
    if cfg.temperature > 0 and cfg.temperature != 1.0:
        lg = lg / cfg.temperature
    if cfg.top_k is not None and cfg.top_k > 0:
        kth = torch.topk(lg, min(cfg.top_k, lg.shape[-1]), dim=-1).values[:, -1:]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        ordered, order = torch.sort(lg, dim=-1, descending=True)
        mass_before = torch.cumsum(torch.softmax(ordered, dim=-1), dim=-1)
        drop = torch.zeros_like(mass_before, dtype=torch.bool)
        drop[:, 1:] = mass_before[:, :-1] > cfg.top_p
        lg = lg.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    probs = torch.softmax(lg, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=gen)[:, 0] if cfg.do_sample else torch.argmax(probs, dim=-1)
    return tokens, probs.gather(1, tokens[:, None])[:, 0]


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
    """State of one decode: the padded sequence, the prefix cache, the records."""

    def __init__(self, model: ForwardFn, prompt: list[int], cfg: DecodeConfig, mask_id: int,
                 eos_id: int | None, on_forward: Callable[[ForwardRecord], None] | None) -> None:
        self.model, self.cfg, self.mask_id, self.eos_id = model, cfg, mask_id, eos_id
        self.on_forward = on_forward
        self.P, self.L = len(prompt), cfg.block_length
        self.first, self.nblocks = layout(self.P, cfg.gen_length, self.L)
        total = self.nblocks * self.L
        self.x = torch.full((total,), mask_id, dtype=torch.long)
        self.x[: self.P] = torch.tensor(prompt, dtype=torch.long)
        self.blk = block_ids(total, self.L)
        self.pos = torch.arange(total)
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.quota = transfer_schedule(self.L, cfg.max_steps).tolist()
        self.result = DecodeResult(prompt=prompt, sequence=[], eos_token_id=eos_id)
        self.early = False

    def record(self, rec: ForwardRecord) -> None:
        self.result.forwards.append(rec)
        if self.on_forward is not None:
            self.on_forward(rec)

    def run(self, blocks: Callable[[Iterable[int]], Iterator[int]] | None) -> DecodeResult:
        prefix = self.cfg.kv_cache == "prefix"
        if prefix and self.first > 0:
            end = self.first * self.L
            _, self.cache = self._forward(0, end, logits_last=1)
            self.record(ForwardRecord(-1, 0, "prefill", end, end, 0))
        order = range(self.first, self.nblocks)
        for b in (blocks(order) if blocks is not None else order):
            start, end = b * self.L, (b + 1) * self.L
            step = 0
            for quota in self.quota:
                masked = self.x[start:end] == self.mask_id
                if not bool(masked.any()):
                    break
                logits, _ = self._forward(start if prefix else 0, end, logits_last=self.L)
                tokens, probs = sample_tokens(logits[0], self.cfg, self.gen)
                chosen = self._choose(masked, probs, quota)
                self.x[start:end][chosen] = tokens[chosen]
                unmasked = int((chosen & (tokens != self.mask_id)).sum())
                self.record(ForwardRecord(b - self.first, step, "step", end - start if prefix else end, end,
                                          unmasked))
                step += 1
                if self._early_stop(tokens[chosen], end):
                    self.result.steps_per_block.append(step)
                    return self._finish()
            self.result.steps_per_block.append(step)
            if prefix:
                _, self.cache = self._forward(start, end, logits_last=1)
                self.record(ForwardRecord(b - self.first, step, "commit", end - start, end, 0))
            if self.cfg.eos_stop and self._has_eos(self.P, end):
                self.result.stopped_at_eos = True
                break
        return self._finish()

    def _choose(self, masked: torch.Tensor, probs: torch.Tensor, quota: int) -> torch.Tensor:
        """The official commit rule: every masked position above the threshold if there are at
        least `quota` of them, else the `quota` most confident masked ones."""
        conf = torch.where(masked, probs, torch.full_like(probs, float("-inf")))
        high = conf > self.cfg.threshold
        if int(high.sum()) >= quota:
            return high
        chosen = torch.zeros_like(masked)
        chosen[torch.topk(conf, k=min(quota, int(masked.sum()))).indices] = True
        return chosen

    def _has_eos(self, start: int, end: int) -> bool:
        return self.eos_id is not None and bool((self.x[start:end] == self.eos_id).any())

    def _early_stop(self, committed: torch.Tensor, end: int) -> bool:
        """eos_early_stop: the step committed an EOS, and the first EOS of the window [0, end)
        has no masked position between the prompt's end and it (the official test; an EOS
        inside the prompt counts as the first one, giving an empty output)."""
        if not self.cfg.eos_early_stop or self.eos_id is None or not bool((committed == self.eos_id).any()):
            return False
        where = torch.nonzero(self.x[:end] == self.eos_id)
        first = int(where[0, 0])
        if bool((self.x[self.P:first] == self.mask_id).any()):
            return False
        self.result.stopped_at_eos = self.early = True
        self.result.output = self.x[self.P:first + 1].tolist()
        return True

    def _finish(self) -> DecodeResult:
        res = self.result
        res.sequence = self.x[self.P:self.P + self.cfg.gen_length].tolist()
        if not self.early:
            res.output = _cut_after_eos(res.sequence, self.eos_id)
        return res

    def _forward(self, start: int, end: int, logits_last: int
                 ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run positions [start, end) against the cached keys of [0, start) (start 0: no cache)."""
        mask = block_causal_mask(self.blk[start:end], self.blk[:end])
        past = self.cache if start else None
        return self.model(self.x[None, start:end], self.pos[start:end], mask, past, logits_last)


def _cut_after_eos(tokens: list[int], eos_id: int | None) -> list[int]:
    """Tokens up to and including the first EOS (all of them when there is none)."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return list(tokens)
