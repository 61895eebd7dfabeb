"""Block-diffusion decoding: the commit rule on hand-made logits, EOS stop, and identical tokens
from the two KV-cache modes on tiny random models (float32, so rounding cannot flip a decision)."""

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.generate import DecodeConfig, generate  # noqa: E402
from tidesim_runtime.model import build_model  # noqa: E402

from tidesim.errors import InputError  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]
MASK, EOS, VOCAB = 9, 8, 10


class ScriptedModel:
    """Returns, for each call, logits in which position p predicts token `tok[p]` with
    probability `conf[p]` (the rest spread evenly); records what it was run on."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def __call__(self, input_ids, positions, mask, past=None, logits_last=None):
        self.calls.append((input_ids[0].tolist(), positions.tolist(), past is not None))
        tok, conf = self.script.pop(0)
        n = logits_last or input_ids.shape[1]
        probs = torch.full((n, VOCAB), 0.0)
        for p in range(n):
            probs[p] = (1 - conf[p]) / (VOCAB - 2)
            probs[p, tok[p]] = conf[p]
            probs[p, MASK] = 1e-9  # the mask token is never chosen anyway
        return probs.log()[None], []


def test_threshold_commit_and_single_most_confident_fallback():
    # one block of 4: step 1 commits positions 1 and 3 (> 0.9); step 2 has none above 0.9, so only
    # the most confident masked one (position 2, 0.6) is committed; step 3 commits position 0.
    script = [
        ([1, 2, 3, 4], [0.5, 0.95, 0.2, 0.91]),
        ([5, 6, 7, 4], [0.3, 0.99, 0.6, 0.99]),  # 1 and 3 already committed: ignored
        ([0, 6, 7, 4], [0.4, 0.1, 0.1, 0.1]),
    ]
    model = ScriptedModel(script)
    out = generate(model, [3, 3], DecodeConfig(gen_length=4, block_length=4, threshold=0.9), MASK, EOS)
    assert out.sequence == [0, 2, 7, 4]
    assert [f.committed for f in out.forwards] == [2, 1, 1]
    assert [f.step for f in out.forwards] == [0, 1, 2]
    # no cache: every step runs prompt + block
    assert model.calls[1][0] == [3, 3, MASK, 2, MASK, 4]


def test_prefix_mode_runs_prefill_block_steps_and_commit():
    script = [([0], [1.0]), ([1, 2], [0.99, 0.99]), ([0], [1.0]), ([4, 5], [0.99, 0.99]), ([0], [1.0])]
    model = ScriptedModel(script)
    cfg = DecodeConfig(gen_length=4, block_length=2, threshold=0.9, kv_cache="prefix")
    out = generate(model, [7, 7, 7], cfg, MASK, EOS)
    assert out.sequence == [1, 2, 4, 5]
    phases = [(f.block, f.step, f.phase, f.tokens, f.context, f.committed) for f in out.forwards]
    assert phases == [(-1, 0, "prefill", 3, 3, 0), (0, 0, "step", 2, 5, 2), (0, 1, "commit", 2, 5, 0),
                      (1, 0, "step", 2, 7, 2), (1, 1, "commit", 2, 7, 0)]
    assert model.calls[1] == ([MASK, MASK], [3, 4], True)
    assert model.calls[2] == ([1, 2], [3, 4], True)


def test_eos_stops_after_its_block_and_is_cut_from_the_output():
    script = [([1, EOS], [0.99, 0.99]), ([3, 3], [0.99, 0.99])]
    model = ScriptedModel(script)
    out = generate(model, [0], DecodeConfig(gen_length=6, block_length=2, threshold=0.5), MASK, EOS)
    assert out.stopped_at_eos and out.sequence == [1, EOS] and out.generated == [1]
    assert len(model.calls) == 1


def test_short_last_block():
    model = ScriptedModel([([1, 1], [0.99, 0.99]), ([2], [0.99])])
    out = generate(model, [0], DecodeConfig(gen_length=3, block_length=2, threshold=0.5), MASK, None)
    assert out.sequence == [1, 1, 2] and [f.tokens for f in out.forwards] == [3, 4]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_both_kv_modes_give_identical_tokens(seed):
    model = build_model(SPEC, torch.float32, seed=seed)
    prompt = torch.randint(0, 500, (5 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
    out = {}
    for mode in ("none", "prefix"):
        cfg = DecodeConfig(gen_length=48, block_length=16, threshold=0.9, kv_cache=mode)
        out[mode] = generate(model, prompt, cfg, SPEC.mask_token_id, SPEC.eos_token_id)
    assert out["none"].sequence == out["prefix"].sequence
    steps = {m: [f.committed for f in r.forwards if f.phase == "step"] for m, r in out.items()}
    assert steps["none"] == steps["prefix"]
    assert SPEC.mask_token_id not in out["none"].sequence
    none_steps = [f for f in out["none"].forwards]
    assert all(f.tokens == f.context == len(prompt) + 16 * (f.block + 1) for f in none_steps)


def test_commit_counts_vary_with_random_weights():
    """The random init gives a mix of confident and unconfident positions (not all 1-token steps)."""
    counts = []
    for seed in range(3):
        model = build_model(SPEC, torch.float32, seed=seed)
        cfg = DecodeConfig(gen_length=32, block_length=16, threshold=0.9, kv_cache="prefix")
        counts += [f.committed for f in generate(model, [1, 2, 3, 4], cfg, SPEC.mask_token_id, None).forwards
                   if f.phase == "step"]
    assert 1 in counts and max(counts) > 1
    assert sum(counts) == 3 * 32


def test_threshold_one_commits_one_token_per_step():
    model = build_model(SPEC, torch.float32, seed=0)
    out = generate(model, [4, 5], DecodeConfig(gen_length=16, block_length=8, threshold=1.0), SPEC.mask_token_id, None)
    assert [f.committed for f in out.forwards] == [1] * 16


def test_sampling_is_seeded_and_mode_independent():
    model = build_model(SPEC, torch.float32, seed=5)
    runs = [generate(model, [10, 11], DecodeConfig(gen_length=16, block_length=8, temperature=1.0, seed=9,
                                                   kv_cache=mode), SPEC.mask_token_id, None).sequence
            for mode in ("none", "prefix", "none")]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("kwargs, word", [
    (dict(gen_length=0), "gen_length"), (dict(gen_length=4, block_length=-1), "block_length"),
    (dict(gen_length=4, threshold=1.5), "threshold"), (dict(gen_length=4, kv_cache="dual"), "kv_cache"),
])
def test_bad_decode_settings(kwargs, word):
    with pytest.raises(InputError, match=word):
        DecodeConfig(**kwargs)
