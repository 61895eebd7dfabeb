"""The official decoding layout as pure functions, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from tidesim.decode import effective_steps, transfer_schedule
from tidesim.models import PRESETS
from tidesim.trace.layout import (
    BlockLayout,
    ForwardShape,
    early_stop_index,
    forward_structure,
    layout_problems,
    max_block_steps,
    output_length,
    select_transfer,
)
from tidesim.trace.synth import SynthConfig, synthesize


def test_block_layout_prompt_spanning_blocks() -> None:
    lay = BlockLayout(prompt_length=40, gen_length=64, block_length=32)
    # 104 positions padded to 128: 4 absolute blocks; decoding starts at block 1 with 8 prompt tokens
    assert (lay.total_length, lay.num_blocks, lay.first_block, lay.generated_blocks) == (128, 4, 1, 3)
    assert lay.prompt_in_first_block == 8
    assert [lay.span(b) for b in range(3)] == [(32, 64), (64, 96), (96, 128)]
    assert [lay.masked_positions(b) for b in range(3)] == [24, 32, 32]


def test_block_layout_prompt_a_multiple_of_the_block_and_a_short_prompt() -> None:
    lay = BlockLayout(64, 40, 32)
    assert (lay.total_length, lay.first_block, lay.generated_blocks, lay.prompt_in_first_block) == (128, 2, 2, 0)
    short = BlockLayout(5, 20, 16)
    assert (short.total_length, short.first_block, short.generated_blocks) == (32, 0, 2)
    assert short.masked_positions(0) == 11


def test_steps_and_transfer_schedule() -> None:
    assert effective_steps(32, 1024) == 32
    assert effective_steps(32, 64, minimal_topk=4) == 16
    assert transfer_schedule(32, 32).tolist() == [1] * 32
    assert transfer_schedule(32, 5).tolist() == [7, 7, 6, 6, 6]          # 32 // 5 = 6, first 32 % 5 = 2 get +1
    assert transfer_schedule(32, 8).tolist() == [4] * 8
    assert transfer_schedule(8, 16).tolist() == [1] * 8 + [0] * 8
    assert max_block_steps(24, transfer_schedule(32, 32)) == 24
    assert max_block_steps(32, transfer_schedule(32, 5)) == 5
    assert max_block_steps(13, transfer_schedule(32, 5)) == 2            # 7 + 7 >= 13
    assert max_block_steps(0, transfer_schedule(32, 5)) == 0


def test_commit_rule() -> None:
    conf = np.array([0.99, 0.5, 0.97, 0.2, 0.96])
    masked = np.array([True, True, True, True, False])
    # three above 0.95 among the masked? 0.99 and 0.97 (position 4 is not masked): 2 >= quota 1
    assert select_transfer(conf, masked, 0.95, 1).tolist() == [True, False, True, False, False]
    # quota 3 > 2 above the threshold: the 3 most confident masked positions
    assert select_transfer(conf, masked, 0.95, 3).tolist() == [True, True, True, False, False]
    # quota above the masked count: all masked positions, never an unmasked one
    assert select_transfer(conf, masked, 0.95, 7).tolist() == [True, True, True, True, False]
    # none above the threshold, quota 1: the single most confident
    assert select_transfer(conf, masked, 0.999, 1).tolist() == [True, False, False, False, False]
    # quota 0: only those above the threshold, possibly none
    assert not select_transfer(conf, masked, 0.999, 0).any()


def test_eos_rules() -> None:
    eos = np.array([False, False, False, True, True])
    # EOS at 3 and 4 committed, position 1 still masked: no early stop
    assert early_stop_index(eos, np.array([True, False, True, True, True]), True) is None
    # everything before the first EOS unmasked, this step committed an EOS: return, first EOS 3
    assert early_stop_index(eos, np.array([True, True, True, True, False]), True) == 3
    # the same state but this step committed no EOS: the official code checks only after EOS commits
    assert early_stop_index(eos, np.array([True, True, True, True, False]), False) is None
    # a later EOS committed while the first is masked: the first committed one (4) has a mask before it
    assert early_stop_index(eos, np.array([True, True, True, False, True]), True) is None
    assert output_length(3, 64) == 4 and output_length(None, 64) == 64 and output_length(70, 64) == 64


def test_forward_structure_both_modes() -> None:
    lay = BlockLayout(40, 64, 32)
    none = forward_structure(lay, "none", [3, 2])
    assert none == [ForwardShape(0, s, "step", 64, 64) for s in range(3)] + \
        [ForwardShape(1, s, "step", 96, 96) for s in range(2)]
    prefix = forward_structure(lay, "prefix", [3, 2])
    assert prefix[0] == ForwardShape(-1, 0, "prefill", 32, 32)
    assert prefix[4] == ForwardShape(0, 3, "commit", 32, 64)
    assert prefix[-1] == ForwardShape(1, 2, "commit", 32, 96)
    assert forward_structure(lay, "prefix", [3, 2], stopped_early=True)[-1] == ForwardShape(1, 1, "step", 32, 96)
    # a prompt shorter than a block has no prefill forward
    assert forward_structure(BlockLayout(5, 20, 16), "prefix", [1])[0].phase == "step"


@pytest.mark.parametrize("kv", ["none", "prefix"])
def test_layout_problems_accepts_synthesis_and_names_a_break(kv: str) -> None:
    t = synthesize(SynthConfig(model=PRESETS["tiny"], prompts=2, gen_length=64, kv_cache=kv, prompt_length=40,
                               answer_length=45, eos="block", seed=3))
    assert layout_problems(t) == []
    assert layout_problems(t, steps=2) and "more than the 2 allowed" in layout_problems(t, steps=2)[0]
    broken = t.forwards.copy()
    broken.loc[broken.index[-1], "context"] += 1
    t.forwards = broken
    assert "the layout gives" in layout_problems(t)[-1]
