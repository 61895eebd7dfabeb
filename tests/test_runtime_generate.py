"""Block-diffusion decoding by the official LLaDA2.0 rules: hand-computed cases on scripted logits,
and, on tiny random models, tokens / steps per block / per-forward routing equal to the literal
transcription of the official generate in tests/official_rules.py, in every case the issue lists,
with zero and non-zero expert bias, in both KV-cache modes (float32)."""

import copy

import pytest

torch = pytest.importorskip("torch")

from official_rules import RoutingHooks, official_generate, quota_schedule  # noqa: E402
from tidesim_runtime.reference.capture import CaptureSettings, capture_trace  # noqa: E402
from tidesim_runtime.reference.generate import DecodeConfig, generate, sample_tokens  # noqa: E402
from tidesim_runtime.reference.model import build_model  # noqa: E402

from tidesim.decode import transfer_schedule  # noqa: E402
from tidesim.errors import InputError  # noqa: E402
from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]
MASK, EOS, VOCAB = 9, 8, 10


class ScriptedModel:
    """Returns, for each call, logits in which block position p predicts token `tok[p]` with
    probability `conf[p]` (the rest spread evenly); records what it was run on."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def __call__(self, input_ids, positions, mask, past=None, logits_last=None):
        self.calls.append((input_ids[0].tolist(), positions.tolist(), past is not None))
        n = logits_last or input_ids.shape[1]
        if logits_last == 1:  # a prefill or commit forward: logits unused
            return torch.zeros(1, 1, VOCAB), []
        tok, conf = self.script.pop(0)
        probs = torch.zeros(n, VOCAB)
        for p in range(n):
            probs[p] = (1 - conf[p]) / (VOCAB - 1)
            probs[p, tok[p]] = conf[p]
        return probs.log()[None], []


def test_quota_schedule_hand_computed():
    assert transfer_schedule(32, 5).tolist() == [7, 7, 6, 6, 6]
    assert transfer_schedule(32, 32).tolist() == [1] * 32
    assert transfer_schedule(8, 3).tolist() == [3, 3, 2]
    assert transfer_schedule(4, 6).tolist() == [1, 1, 1, 1, 0, 0]
    assert quota_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert DecodeConfig(gen_length=10, steps=32, minimal_topk=4).max_steps == 2  # 10 // 4


def test_threshold_commit_and_quota_fallback():
    # prompt of one whole block (4), G = 4, L = 4, 4 steps -> quota 1 per step.
    script = [([1, 2, 3, 4], [0.5, 0.95, 0.3, 0.91]),  # 1 and 3 above 0.9 (2 >= quota 1): both
              ([5, 6, 7, 4], [0.3, 0.99, 0.6, 0.99]),  # none masked above 0.9: the quota, most confident (2)
              ([0, 6, 7, 4], [0.4, 0.1, 0.1, 0.1])]
    model = ScriptedModel(script)
    cfg = DecodeConfig(gen_length=4, block_length=4, steps=4, threshold=0.9)
    out = generate(model, [3, 3, 3, 3], cfg, MASK, EOS)
    assert out.sequence == [0, 2, 7, 4] and out.steps_per_block == [3]
    assert [f.committed for f in out.forwards] == [2, 1, 1]
    assert model.calls[1][0] == [3, 3, 3, 3, MASK, 2, MASK, 4] and model.calls[1][1] == list(range(8))


def test_steps_below_block_length_commit_the_quota():
    # L = 4, 2 steps: quota [2, 2]; nothing passes the threshold, so the two most confident each step.
    script = [([1, 2, 3, 4], [0.5, 0.8, 0.3, 0.7]), ([5, 6, 7, 8], [0.6, 0.1, 0.4, 0.1])]
    out = generate(ScriptedModel(script), [3, 3, 3, 3], DecodeConfig(gen_length=4, block_length=4, steps=2), MASK, None)
    assert out.sequence == [5, 2, 7, 4] and [f.committed for f in out.forwards] == [2, 2]


def test_prompt_mid_block_layout_and_padding_block():
    # P = 3, L = 2, G = 4: N = ceil(7 / 2) x 2 = 8; decoding starts at block 1 (position 2 is prompt),
    # the last block (6, 7) holds one padding position that is decoded too; output cut at G.
    script = [([0, 1], [0.99, 0.99]), ([2, 3], [0.99, 0.99]), ([4, 5], [0.99, 0.99])]
    model = ScriptedModel(script)
    out = generate(model, [7, 7, 7], DecodeConfig(gen_length=4, block_length=2, threshold=0.9), MASK, None)
    assert [c[1] for c in model.calls] == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5], list(range(8))]
    assert model.calls[0][0] == [7, 7, 7, MASK]
    assert out.sequence == [1, 2, 3, 4] and out.output == [1, 2, 3, 4] and out.steps_per_block == [1, 1, 1]
    assert [(f.block, f.tokens, f.context, f.committed) for f in out.forwards] == [(0, 4, 4, 1), (1, 6, 6, 2),
                                                                                   (2, 8, 8, 2)]


def test_prefix_mode_prefill_of_whole_prompt_blocks_then_block_steps_and_commit():
    script = [([0, 1], [0.99, 0.99]), ([2, 3], [0.99, 0.99]), ([4, 5], [0.99, 0.99])]
    model = ScriptedModel(script)
    cfg = DecodeConfig(gen_length=4, block_length=2, threshold=0.9, kv_cache="prefix")
    out = generate(model, [7, 7, 7], cfg, MASK, None)
    assert out.sequence == [1, 2, 3, 4]
    assert [(f.block, f.step, f.phase, f.tokens, f.context) for f in out.forwards] == [
        (-1, 0, "prefill", 2, 2), (0, 0, "step", 2, 4), (0, 1, "commit", 2, 4), (1, 0, "step", 2, 6),
        (1, 1, "commit", 2, 6), (2, 0, "step", 2, 8), (2, 1, "commit", 2, 8)]
    assert model.calls[0] == ([7, 7], [0, 1], False)
    assert model.calls[1] == ([7, MASK], [2, 3], True)
    assert model.calls[2] == ([7, 1], [2, 3], True)


def test_committed_mask_id_stays_masked_and_costs_steps():
    # quota [2, 2]: step 0 commits the mask id at position 0 (it stays masked) and position 1;
    # step 1 commits 2 of the 3 still masked; the steps are used up with position 3 masked.
    script = [([MASK, 2, 3, 4], [0.99, 0.98, 0.3, 0.2]), ([5, 6, 7, 4], [0.6, 0.1, 0.5, 0.4])]
    out = generate(ScriptedModel(script), [3, 3, 3, 3], DecodeConfig(gen_length=4, block_length=4, steps=2),
                   MASK, None)
    assert out.sequence == [5, 2, 7, MASK] and [f.committed for f in out.forwards] == [1, 2]
    assert out.output == [5, 2, 7, MASK] and out.steps_per_block == [2]


def test_eos_without_early_stop_ends_after_its_block_and_cuts_after_it():
    script = [([1, EOS], [0.99, 0.99]), ([3, 3], [0.99, 0.99])]
    model = ScriptedModel(script)
    out = generate(model, [0, 0], DecodeConfig(gen_length=6, block_length=2, threshold=0.5), MASK, EOS)
    assert out.stopped_at_eos and out.sequence == [1, EOS, MASK, MASK, MASK, MASK]
    assert out.generated == [1, EOS] and len(model.calls) == 1


def test_eos_early_stop_needs_the_step_to_commit_an_eos_with_nothing_masked_before_it():
    # step 0 commits EOS at position 1 while position 0 is masked: no stop; step 1 commits position 0
    # (not an EOS): no stop either; the block ends, and decoding stops after it (EOS in the block).
    script = [([1, EOS, 2, 2], [0.3, 0.99, 0.2, 0.2]), ([1, 4, 5, 6], [0.99, 0.1, 0.2, 0.3]),
              ([1, 4, 5, 6], [0.2, 0.1, 0.99, 0.99])]
    cfg = DecodeConfig(gen_length=8, block_length=4, threshold=0.9, eos_early_stop=True)
    out = generate(ScriptedModel(script), [0, 0, 0, 0], cfg, MASK, EOS)
    assert out.steps_per_block == [3] and out.output == [1, EOS] and out.stopped_at_eos
    # an EOS committed with everything before it unmasked stops right after that step
    script = [([1, 3, 2, 2], [0.99, 0.3, 0.2, 0.2]), ([1, EOS, 5, 6], [0.1, 0.99, 0.2, 0.3])]
    out = generate(ScriptedModel(script), [0, 0, 0, 0], cfg, MASK, EOS)
    assert out.steps_per_block == [2] and out.output == [1, EOS] and len(out.forwards) == 2


def test_sampling_filters_hand_computed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cfg = DecodeConfig(gen_length=4, top_k=2)
    tok, p = sample_tokens(logits, cfg, None)
    assert tok.tolist() == [0] and p.item() == pytest.approx(0.5 / 0.8)
    tok, p = sample_tokens(logits, DecodeConfig(gen_length=4, top_p=0.7), None)  # keeps 0.5, 0.3 (0.5 <= 0.7)
    assert p.item() == pytest.approx(0.5 / 0.8)
    tok, p = sample_tokens(logits, DecodeConfig(gen_length=4, top_p=0.4), None)  # keeps the best only
    assert p.item() == pytest.approx(1.0)
    tok, p = sample_tokens(logits, DecodeConfig(gen_length=4, temperature=0.5), None)  # p^2 renormalised
    assert p.item() == pytest.approx(0.25 / (0.25 + 0.09 + 0.0225 + 0.0025))


# ---- the official rules, transcribed independently, on tiny random models ----

@pytest.fixture(scope="module", params=["bias0", "bias"])
def model(request):
    m = build_model(SPEC, torch.float32, seed=3)
    if request.param == "bias0":
        for _, block in m.moe_blocks():
            block.gate.expert_bias.zero_()
    return m


def boosted(model, token, scale):
    """A copy whose lm_head row for `token` points along the mean final hidden state of a masked
    block, times `scale`: the token then wins at many positions (how often grows with scale)."""
    m = copy.deepcopy(model)
    seen = []
    handle = m.model.norm.register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
    ids = torch.tensor([PROMPT[:8] + [SPEC.mask_token_id] * 8])
    blocks = torch.arange(16) // 8
    with torch.no_grad():
        m(ids, torch.arange(16), blocks[None, :] <= blocks[:, None])
        handle.remove()
        mean = seen[0].mean(0)
        m.lm_head.weight[token] = mean / mean.norm() * scale
    return m


def check_against_official(model, prompt, kv_modes=("none", "prefix"), **kw):
    seed = kw.pop("seed", 0)
    hooks = RoutingHooks(model, SPEC.num_experts)

    def forward(ids, pos, mask):
        logits = model(ids, pos, mask)[0]
        hooks.end_forward()
        return logits

    ref = official_generate(forward, prompt, eos_id=SPEC.eos_token_id, mask_id=SPEC.mask_token_id,
                            generator=torch.Generator().manual_seed(seed), **kw)
    hooks.remove()
    for kv in kv_modes:
        cfg = DecodeConfig(kv_cache=kv, seed=seed, **kw)
        trace, outputs = capture_trace(model, SPEC, [prompt], cfg, CaptureSettings("test", "float32"), seed=None)
        assert outputs[0] == ref.output, kv
        assert trace.meta.prompts[0]["steps_per_block"] == ref.steps_per_block, kv
        assert trace.meta.prompts[0]["generated"] == len(ref.output)
        if kv == "none":
            steps = trace.forwards["phase"] == "step"
            assert trace.forwards.loc[steps, "tokens"].tolist() == ref.window_lengths
            assert torch.equal(torch.from_numpy(trace.expert_tokens).long(), torch.stack(hooks.forwards))
    return ref


PROMPT = [17, 301, 44, 5, 99, 230, 7, 68, 150, 12, 400, 3, 88, 91, 250, 61, 19, 73, 402, 11]


@pytest.mark.parametrize("case", [
    dict(prompt=PROMPT, gen_length=24, block_length=16, threshold=0.9),  # prompt spans two blocks (20 > 16)
    dict(prompt=PROMPT[:5], gen_length=16, block_length=8, threshold=0.9),  # P not a multiple of L
    dict(prompt=PROMPT[:8], gen_length=12, block_length=8, threshold=0.9),  # G not a multiple of L
    dict(prompt=PROMPT[:3], gen_length=16, block_length=16, steps=5, threshold=0.95),  # quota [4, 3, 3, 3, 3]
    dict(prompt=PROMPT[:6], gen_length=16, block_length=8, threshold=0.7, temperature=1.5, top_k=2,
         do_sample=True, seed=11),  # top-k, drawn from a seeded generator
    dict(prompt=PROMPT[:6], gen_length=16, block_length=8, threshold=0.6, top_p=0.5, do_sample=True,
         seed=5),  # top-p, drawn from a seeded generator
    dict(prompt=PROMPT[:6], gen_length=16, block_length=8, threshold=0.9, temperature=0.5, top_k=50,
         top_p=0.8),  # tempered, filtered argmax
    dict(prompt=PROMPT[:6], gen_length=16, block_length=8, steps=3, minimal_topk=8),  # steps cap 16 // 8 = 2
], ids=["two-prompt-blocks", "prompt-mid-block", "gen-not-multiple", "steps-quota", "topk-sample", "topp-sample",
        "filtered-argmax",
        "minimal-topk"])
def test_matches_official_rules(model, case):
    case = dict(case)
    prompt = case.pop("prompt")
    check_against_official(model, prompt, **case)


def test_committed_mask_id_matches_official(model):
    m = boosted(model, SPEC.mask_token_id, 5.5)
    ref = check_against_official(m, PROMPT[:4], gen_length=16, block_length=8, steps=4, threshold=0.9)
    assert ref.mask_commits > 0  # the case is exercised: a mask id was committed


@pytest.mark.parametrize("early", [False, True])
def test_eos_matches_official(model, early):
    m = boosted(model, SPEC.eos_token_id, 6.0)
    ref = check_against_official(m, PROMPT[:4], gen_length=32, block_length=8, threshold=0.9, eos_early_stop=early)
    assert SPEC.eos_token_id in ref.output and len(ref.output) < 32


def test_bad_decode_settings():
    for kwargs, word in [(dict(gen_length=0), "gen_length"), (dict(gen_length=4, block_length=-1), "block_length"),
                         (dict(gen_length=4, threshold=1.5), "threshold"), (dict(gen_length=4, kv_cache="dual"),
                                                                              "kv_cache"),
                         (dict(gen_length=4, temperature=float("nan")), "temperature"),
                         (dict(gen_length=4, minimal_topk=5), "minimal_topk"), (dict(gen_length=4, steps=0), "steps"),
                         (dict(gen_length=4, top_p=1.5), "top_p")]:
        with pytest.raises(InputError, match=word):
            DecodeConfig(**kwargs)
