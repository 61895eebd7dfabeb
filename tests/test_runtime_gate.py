"""The LLaDA2.0 router: group-limited top-k against a brute-force reference; bias vs weights."""

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from tidesim_runtime.reference.gate import SigmoidGroupGate, check_routing_shape, group_limited_topk, route  # noqa: E402

from tidesim.errors import InputError  # noqa: E402


def brute_force_choice(biased: np.ndarray, top_k: int, n_group: int, topk_group: int) -> set[int]:
    """Try every set of topk_group groups, keep the one with the largest total group score
    (group score = sum of its two best values), then the top_k best experts inside it."""
    group_size = biased.size // n_group
    groups = [biased[g * group_size:(g + 1) * group_size] for g in range(n_group)]
    group_score = [float(np.sort(g)[::-1][:2].sum()) for g in groups]
    best = max(itertools.combinations(range(n_group), topk_group), key=lambda c: sum(group_score[g] for g in c))
    eligible = [e for g in best for e in range(g * group_size, (g + 1) * group_size)]
    eligible.sort(key=lambda e: -biased[e])
    return set(eligible[:top_k])


@st.composite
def routing_case(draw):
    n_group = draw(st.sampled_from([1, 2, 4, 8]))
    group_size = draw(st.integers(1, 6))
    topk_group = draw(st.integers(1, n_group))
    top_k = draw(st.integers(1, topk_group * group_size))
    tokens = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    return n_group, group_size, topk_group, top_k, tokens, seed


@given(routing_case())
def test_group_limited_topk_matches_brute_force(case):
    n_group, group_size, topk_group, top_k, tokens, seed = case
    rng = np.random.default_rng(seed)
    biased = rng.normal(size=(tokens, n_group * group_size)).astype(np.float32)
    idx = group_limited_topk(torch.from_numpy(biased), top_k, n_group, topk_group).numpy()
    assert idx.shape == (tokens, top_k)
    for t in range(tokens):
        assert set(idx[t].tolist()) == brute_force_choice(biased[t], top_k, n_group, topk_group)


def test_hand_computed_example():
    # 8 experts, 4 groups of 2; group scores (sum of both): g0 .9+.1=1.0, g1 .8+.7=1.5, g2 .95+0=.95,
    # g3 .6+.5=1.1 -> best 2 groups g1, g3; top-3 of {2:.8, 3:.7, 6:.6, 7:.5} = {2, 3, 6}, although
    # expert 4 (.95) and expert 0 (.9) have the highest single scores.
    biased = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.95, 0.0, 0.6, 0.5]])
    idx = group_limited_topk(biased, top_k=3, n_group=4, topk_group=2)
    assert idx[0].tolist() == [2, 3, 6]


def test_weights_are_normalised_unbiased_scores_times_scale():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0, -2.0, 0.0, 3.0, -0.5]])
    idx, w = route(logits, None, top_k=2, n_group=2, topk_group=1, routed_scaling_factor=2.5)
    # group {0..3}: sigmoid(2) + sigmoid(1) = 0.881 + 0.731 = 1.612; group {4..7}: sigmoid(3) +
    # sigmoid(0) = 0.953 + 0.5 = 1.453 -> group 0 wins, so experts 0 and 3 are chosen, not 6
    # (the single best score).
    assert sorted(idx[0].tolist()) == [0, 3]
    s = 1 / (1 + np.exp(-np.array([2.0, 1.0])))
    expected = s / s.sum() * 2.5
    got = dict(zip(idx[0].tolist(), w[0].tolist(), strict=True))
    assert got[0] == pytest.approx(expected[0], rel=1e-6) and got[3] == pytest.approx(expected[1], rel=1e-6)


def test_bias_changes_selection_but_not_weights():
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(16, 16)).astype(np.float32))
    args = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    idx0, w0 = route(logits, None, **args)
    # A constant bias moves nothing: same choice, same weights.
    idx_c, w_c = route(logits, torch.full((16,), 0.3), **args)
    assert torch.equal(idx0, idx_c) and torch.allclose(w0, w_c)
    # A large bias on experts 12..15 forces them to be chosen ...
    bias = torch.zeros(16)
    bias[12:] = 5.0
    idx1, w1 = route(logits, bias, **args)
    assert all(set(r.tolist()) == {12, 13, 14, 15} for r in idx1)
    assert not torch.equal(idx0.sort(dim=1).values, idx1.sort(dim=1).values)
    # ... but the weights stay the unbiased sigmoid scores of the chosen experts, normalised.
    scores = torch.sigmoid(logits).gather(1, idx1)
    assert torch.allclose(w1, scores / scores.sum(1, keepdim=True) * 2.5, atol=1e-6)


def test_gate_module_output_signature_and_fp32_routing():
    gate = SigmoidGroupGate(32, 16, 4, 4, 2, 2.5, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    idx, w, logits = gate(x)
    assert idx.shape == (10, 4) and w.shape == (10, 4) and logits.shape == (10, 16)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.allclose(w.sum(1), torch.full((10,), 2.5), atol=1e-5)
    assert set(gate.state_dict()) == {"weight", "expert_bias"}
    assert gate.expert_bias.dtype == torch.bfloat16  # held in the model dtype, added in float32


def test_top1_weight_is_the_raw_score_times_the_scaling_factor():
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.1]])
    idx, w = route(logits, None, top_k=1, n_group=1, topk_group=1, routed_scaling_factor=2.5)
    assert idx.tolist() == [[2]]
    assert w.item() == pytest.approx(2.5 / (1 + np.exp(-2.0)), rel=1e-6)  # not normalised to 2.5
    _, w2 = route(logits, None, top_k=2, n_group=1, topk_group=1, routed_scaling_factor=2.5)
    assert w2.sum().item() == pytest.approx(2.5, rel=1e-6)


def test_bf16_bias_is_rounded_then_added_in_float32():
    gate = SigmoidGroupGate(4, 4, 1, 1, 1, 1.0, dtype=torch.bfloat16)
    gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0 / 3.0]))
    assert gate.expert_bias[3].item() == float(torch.tensor(1.0 / 3.0).to(torch.bfloat16))


def test_impossible_routing_shapes_are_rejected():
    with pytest.raises(InputError, match="top_k 9 exceeds the 8 experts"):
        check_routing_shape(16, 9, 4, 2)
    with pytest.raises(InputError, match="not divisible"):
        check_routing_shape(10, 2, 4, 2)
