"""Write the example routing records of docs/capture.md and docs/quickstart.md, one per engine layout.

Usage: .venv/bin/python docs/examples/routing/make_examples.py
The routing is synthetic (tidesim.trace.synth_ar's router, seed 0), written in each engine's
documented layout by the writers the tests use (tests/convert_cases.py); no engine ran. Files:
sglang_per_token.pt, sglang_stat.pt, sglang_responses.json, vllm_routing.npz, moe-trace.csv for the
`tiny` preset (2 prompts of 12 tokens, 16 output tokens each); qwen3_vllm_routing.npz for the
qwen3-30b-a3b preset (4 prompts of 32 tokens, 48 output tokens each), the quickstart's trace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2] / "tests"))

import convert_cases as cc  # noqa: E402

from tidesim.models import PRESETS  # noqa: E402
from tidesim.trace.synth_ar import ArConfig, ArParams, synthesize_ar  # noqa: E402


def recording(model: str, prompts: int, prompt_length: int, gen_length: int) -> cc.Recording:
    """Token-level routing of a synthetic autoregressive decode, split per request."""
    spec = PRESETS[model]
    t = synthesize_ar(ArConfig(model=spec, prompts=prompts, prompt_length=prompt_length, gen_length=gen_length,
                               token_level=True, params=ArParams(pop_scale_first=0.3, pop_scale_last=1.2)))
    assert t.topk_ids is not None
    layers = spec.num_moe_layers
    per_forward = [np.stack(t.topk_ids[f * layers:(f + 1) * layers], axis=1).astype(np.int64)
                   for f in range(t.num_forwards)]
    per_prompt = gen_length     # a prefill, then gen_length - 1 decode forwards
    firsts = [per_forward[p * per_prompt] for p in range(prompts)]
    decodes = [np.concatenate(per_forward[p * per_prompt + 1:(p + 1) * per_prompt]) for p in range(prompts)]
    return cc.Recording(firsts, decodes, model=spec)


def main() -> None:
    tiny = recording("tiny", 2, 12, 16)
    cc.write_sglang(HERE / "sglang_per_token.pt", cc.sglang_records(tiny))
    cc.write_sglang_stat(HERE / "sglang_stat.pt", tiny)
    cc.write_sglang_requests(HERE / "sglang_responses.json", tiny)
    cc.write_vllm_npz(HERE / "vllm_routing.npz", tiny)
    cc.write_llamacpp(HERE / "moe-trace.csv", tiny)
    cc.write_vllm_npz(HERE / "qwen3_vllm_routing.npz", recording("qwen3-30b-a3b", 4, 32, 48))


if __name__ == "__main__":
    main()
