"""The official LLaDA2.0 decoding layout as pure functions (no model, no randomness).

Facts read from the official `generate` (LLaDA2.0 modeling code, model/modeling_llada2_moe.py as
copied in github.com/ims-kdks/TIDE; docs/traces.md, "Decoding layout", restates them):

- Absolute blocks: prompt length P, generation length G, block length L; the sequence is padded
  to N = ceil((P+G)/L) x L positions and block k holds positions [kL, (k+1)L). Decoding starts at
  block floor(P/L), whose first P mod L positions are prompt tokens that stay fixed.
- Steps: at most `steps` denoising steps per block, `steps` capped at G // minimal_topk; the
  per-step quota is L // steps, plus one for the first L mod steps steps.
- Commit rule: every masked position above the threshold if there are at least quota of them,
  else the quota most confident masked positions (no more than are masked).
- EOS: with early stop, decoding returns right after a step that commits an EOS when every
  generated position before the first EOS is unmasked; otherwise (and also with early stop when
  that never happens) it stops after a block holding an EOS. The output is cut after the first
  EOS (included), else at G.

The trace's forward structure for that layout (docs/trace-format.md): `block` is the generated
block index (0 = block floor(P/L), the first generated block), -1 for a prefill. With no KV
cache each step runs positions [0, (k+1)L); with a prefix cache a prefill runs the prompt's
complete blocks [0, floor(P/L) L) (none when P < L), each step runs block k only, and a commit
forward runs it once more after it is complete (not after an early stop, which returns at once).
Both synthesis (tidesim.trace.synth) and the checks of a captured trace use these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tidesim.decode import effective_steps
from tidesim.trace.schema import Trace


@dataclass(frozen=True)
class BlockLayout:
    """Absolute block layout of one prompt's decode."""

    prompt_length: int
    gen_length: int
    block_length: int

    @property
    def total_length(self) -> int:
        """N: positions after padding to whole blocks."""
        L = self.block_length
        return math.ceil((self.prompt_length + self.gen_length) / L) * L

    @property
    def num_blocks(self) -> int:
        """Absolute blocks in the padded sequence."""
        return self.total_length // self.block_length

    @property
    def first_block(self) -> int:
        """Absolute index of the first generated block: floor(P / L)."""
        return self.prompt_length // self.block_length

    @property
    def generated_blocks(self) -> int:
        """Blocks decoded when no EOS stops the decode early."""
        return self.num_blocks - self.first_block

    @property
    def prompt_in_first_block(self) -> int:
        """Prompt tokens (fixed, never masked) at the start of the first generated block."""
        return self.prompt_length % self.block_length

    def span(self, block: int) -> tuple[int, int]:
        """Positions [start, end) of generated block `block` (0 = the first generated block)."""
        k = self.first_block + block
        return k * self.block_length, (k + 1) * self.block_length

    def masked_positions(self, block: int) -> int:
        """Positions of generated block `block` that start masked."""
        start, end = self.span(block)
        return end - max(start, self.prompt_length)


def max_block_steps(masked: int, schedule: np.ndarray) -> int:
    """The most steps a block with `masked` masked positions can take: each step commits at least
    its quota (or all that are left), so it ends by the first step whose cumulative quota covers
    them, and never after the schedule's last step. (A committed mask id, which leaves its
    position masked, is the one way to exceed the first bound; synthesis never commits it.)"""
    if masked <= 0:
        return 0
    covered = np.flatnonzero(np.cumsum(schedule) >= masked)
    return int(covered[0]) + 1 if covered.size else int(schedule.size)


def select_transfer(confidence: np.ndarray, masked: np.ndarray, threshold: float, quota: int) -> np.ndarray:
    """bool mask of positions committed by one step (the official commit rule).

    confidence: per position of the block (any monotone scale; `threshold` on the same scale);
    masked: bool, the positions still masked. Ties among the most confident break to the lower
    position (a stable order).
    """
    conf = np.where(masked, confidence, -np.inf)
    high = masked & (conf > threshold)
    if int(high.sum()) >= quota:
        return high
    k = min(quota, int(masked.sum()))
    out = np.zeros(masked.shape, dtype=bool)
    out[np.argsort(-conf, kind="stable")[:k]] = True
    return out


def early_stop_index(is_eos: np.ndarray, unmasked: np.ndarray, committed_eos: bool) -> int | None:
    """With early stop: index (into the generated positions) of the first EOS if decoding returns
    after this step, else None. is_eos/unmasked: bool over generated positions, for tokens that are
    committed; committed_eos: whether this step committed an EOS."""
    if not committed_eos:
        return None
    eos = np.flatnonzero(is_eos & unmasked)
    if not eos.size:
        return None
    first = int(eos[0])
    return first if bool(unmasked[:first].all()) else None


def output_length(first_eos: int | None, gen_length: int) -> int:
    """Generated tokens in the output: through the first EOS (included), else gen_length."""
    return gen_length if first_eos is None or first_eos >= gen_length else first_eos + 1


# ----- the forward structure a trace records ---------------------------------------------------
@dataclass(frozen=True)
class ForwardShape:
    """The structural columns of one forward of a trace."""

    block: int
    step: int
    phase: str
    tokens: int
    context: int


def forward_structure(layout: BlockLayout, kv_cache: str, steps_per_block: Sequence[int],
                      stopped_early: bool = False) -> list[ForwardShape]:
    """Every forward of one prompt's decode, given how many steps each decoded block took.

    stopped_early: the decode returned right after the last block's last step (EOS early stop),
    so in prefix mode that block gets no commit forward.
    """
    L = layout.block_length
    out: list[ForwardShape] = []
    prefix = kv_cache == "prefix"
    if prefix and layout.first_block > 0:
        n = layout.first_block * L
        out.append(ForwardShape(-1, 0, "prefill", n, n))
    for b, steps in enumerate(steps_per_block):
        _, end = layout.span(b)
        for s in range(steps):
            out.append(ForwardShape(b, s, "step", L if prefix else end, end))
        last = b == len(steps_per_block) - 1
        if prefix and not (last and stopped_early):
            out.append(ForwardShape(b, steps, "commit", L, end))
    return out


def layout_problems(trace: Trace, steps: int = 32, minimal_topk: int = 1) -> list[str]:
    """Where a trace's forwards break the official layout (empty when they follow it).

    Needs each prompt's length in the metadata (`prompt_length` or `tokens`). Checks, per prompt:
    the forwards are exactly forward_structure() of the steps each block took (phases, blocks,
    step numbers, tokens, context; one optional missing commit after an early stop), blocks are
    consecutive from 0 and do not run past the padded sequence, and no block takes more than the
    effective number of steps.
    """
    meta, f = trace.meta, trace.forwards
    cap = effective_steps(steps, meta.gen_length, minimal_topk)
    lengths = {int(p["id"]): int(p.get("prompt_length", p.get("tokens", 0))) for p in meta.prompts}
    out: list[str] = []
    for pid in trace.prompt_ids:
        if not lengths.get(pid):
            out.append(f"prompt {pid}: no prompt length in the metadata")
            continue
        layout = BlockLayout(lengths[pid], meta.gen_length, meta.block_length)
        fp = f[f["prompt"] == pid]
        st = fp[fp["phase"] == "step"]
        blocks = sorted(int(b) for b in st["block"].unique())
        if blocks != list(range(len(blocks))):
            out.append(f"prompt {pid}: decoded blocks {blocks} are not consecutive from 0")
            continue
        if len(blocks) > layout.generated_blocks:
            out.append(f"prompt {pid}: {len(blocks)} blocks decoded, the layout has {layout.generated_blocks}")
            continue
        per_block = [int((st["block"] == b).sum()) for b in blocks]
        if per_block and max(per_block) > cap:
            out.append(f"prompt {pid}: a block took {max(per_block)} steps, more than the {cap} allowed")
        cols = [fp[c].tolist() for c in ("block", "step", "phase", "tokens", "context")]
        got = [ForwardShape(int(b), int(s), str(ph), int(n), int(c)) for b, s, ph, n, c in zip(*cols, strict=True)]
        options = [forward_structure(layout, meta.kv_cache, per_block, early)
                   for early in ((False, True) if meta.kv_cache == "prefix" else (False,))]
        if got not in options:
            want = options[0]
            i = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
            have = got[i] if i < len(got) else "nothing"
            out.append(f"prompt {pid}: forward {i} is {have}, the layout gives "
                       f"{want[i] if i < len(want) else 'nothing'}")
    return out
