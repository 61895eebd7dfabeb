"""Synthesis, capture and the official rules agree on the block layout.

A tiny checkpoint (random weights, the reference model) is decoded by the runtime's capture, and a
trace is synthesized with the same prompt length P, generation length G, block length L and steps;
both must follow tidesim.trace.layout (the official rules of issue #11: absolute blocks, the
prompt's tail in the first generated block, at most `steps` steps per block, the forward
structure of each KV-cache mode), and they must agree forward shape by forward shape on every
block both decoded (the number of steps in a block depends on the tokens, so it may differ).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.reference.capture import CaptureSettings, capture_trace  # noqa: E402
from tidesim_runtime.reference.generate import DecodeConfig  # noqa: E402
from tidesim_runtime.reference.model import build_model  # noqa: E402

from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace.layout import BlockLayout, effective_steps, forward_structure, layout_problems  # noqa: E402
from tidesim.trace.synth import SynthConfig, synthesize  # noqa: E402

SPEC = PRESETS["tiny"]

# (P, G, L, steps): a prompt shorter than a block; a prompt spanning two blocks with G not a
# multiple of L; a prompt exactly one block long with steps < L (quota 4, 3, 3, 3, 3)
CASES = [(5, 20, 16, 16), (21, 40, 16, 16), (16, 32, 16, 5)]


@pytest.fixture(scope="module")
def model():
    before = torch.get_num_threads()
    torch.set_num_threads(1)            # tiny matmuls: one thread is fastest, also on a busy machine
    yield build_model(SPEC, torch.float32, seed=13)
    torch.set_num_threads(before)


def decode_config(gen_length: int, block_length: int, steps: int, kv: str) -> DecodeConfig:
    """The runtime's config for these settings, EOS early stop off (the layout alone is compared)."""
    return DecodeConfig(gen_length=gen_length, block_length=block_length, threshold=0.9, kv_cache=kv, steps=steps,
                        eos_early_stop=False)


def shapes_by_block(trace, prompt: int) -> dict[int, list[tuple[str, int, int]]]:
    """(phase, tokens, context) of each forward, grouped by block, steps collapsed to one entry."""
    f = trace.forwards[trace.forwards["prompt"] == prompt]
    out: dict[int, list[tuple[str, int, int]]] = {}
    for block, phase, tokens, context in zip(f["block"], f["phase"], f["tokens"], f["context"], strict=True):
        entry = (str(phase), int(tokens), int(context))
        if entry not in out.setdefault(int(block), []):
            out[int(block)].append(entry)
    return out


@pytest.mark.parametrize("kv", ["none", "prefix"])
@pytest.mark.parametrize("P, G, L, steps", CASES)
def test_synthesis_capture_and_official_rules_agree(model, P, G, L, steps, kv) -> None:
    prompt = [(7 * i + 3) % (SPEC.vocab_size - 2) for i in range(P)]     # never the mask or EOS id
    captured, _ = capture_trace(model, SPEC, [prompt], decode_config(G, L, steps, kv),
                                CaptureSettings("random (seed 13)", "float32"), seed=13)
    synth = synthesize(SynthConfig(model=SPEC, prompts=1, gen_length=G, block_length=L, threshold=0.9,
                                   kv_cache=kv, prompt_length=P, steps=steps, eos="none", seed=1))
    assert layout_problems(captured, steps=steps) == []
    assert layout_problems(synth, steps=steps) == []
    lay = BlockLayout(P, G, L)
    cap_blocks, syn_blocks = shapes_by_block(captured, 0), shapes_by_block(synth, 0)
    # synthesis without an EOS decodes every block of the layout; the capture stops at most earlier
    assert max(syn_blocks) == lay.generated_blocks - 1 and max(cap_blocks) <= max(syn_blocks)
    for block, shapes in cap_blocks.items():
        assert shapes == syn_blocks[block], f"block {block}"
    # and both are what the rules give for one step per block (steps collapsed)
    want = shapes_by_block_of(forward_structure(lay, kv, [1] * lay.generated_blocks))
    assert syn_blocks == want
    for trace in (captured, synth):
        per_block = trace.forwards[trace.forwards["phase"] == "step"].groupby("block").size()
        assert per_block.max() <= effective_steps(steps, G)


def shapes_by_block_of(shapes) -> dict[int, list[tuple[str, int, int]]]:
    out: dict[int, list[tuple[str, int, int]]] = {}
    for s in shapes:
        entry = (s.phase, s.tokens, s.context)
        if entry not in out.setdefault(s.block, []):
            out[s.block].append(entry)
    return out
