"""The reference model: official parameter names and shapes, norms, rotary (and rope_scaling),
block-causal mask, MoE arithmetic against a hand-written loop, the config flags (biases, qk norm,
tied embeddings), logits against the official forward written out in tests/official_rules.py
(float32 and bf16), and non-degenerate random routing."""

import math

import pytest

torch = pytest.importorskip("torch")

from official_rules import official_config, official_forward  # noqa: E402
from tidesim_runtime.reference.generate import block_causal_mask, block_ids  # noqa: E402
from tidesim_runtime.reference.model import (  # noqa: E402
    ModelFlags,
    RMSNorm,
    Rotary,
    apply_partial_rotary,
    build_model,
    rotary_cos_sin,
)

from tidesim.models import PRESETS  # noqa: E402

SPEC = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    return build_model(SPEC, torch.float32, seed=3)


def test_state_dict_uses_official_names_and_shapes(model):
    sd = model.state_dict()
    h, e, hd = SPEC.hidden_size, SPEC.num_experts, SPEC.head_dim
    assert sd["model.word_embeddings.weight"].shape == (SPEC.vocab_size, h)
    assert sd["lm_head.weight"].shape == (SPEC.vocab_size, h)
    assert sd["model.norm.weight"].shape == (h,)
    assert sd["model.layers.0.attention.query_key_value.weight"].shape == ((4 + 2 * 2) * hd, h)
    assert sd["model.layers.0.attention.dense.weight"].shape == (h, 4 * hd)
    assert sd["model.layers.2.attention.query_layernorm.weight"].shape == (hd,)
    assert sd["model.layers.2.attention.key_layernorm.weight"].shape == (hd,)
    assert sd["model.layers.0.mlp.gate_proj.weight"].shape == (SPEC.dense_intermediate_size, h)
    assert sd["model.layers.1.mlp.gate.weight"].shape == (e, h)
    assert sd["model.layers.1.mlp.gate.expert_bias"].shape == (e,)
    assert sd["model.layers.3.mlp.experts.15.down_proj.weight"].shape == (h, SPEC.moe_intermediate_size)
    assert sd["model.layers.3.mlp.shared_experts.up_proj.weight"].shape == (SPEC.moe_intermediate_size, h)
    per_layer = 6  # 2 norms, qkv, dense, q norm, k norm
    expected = 3 + SPEC.num_layers * per_layer + 3 + 3 * (2 + 3 * e + 3)
    assert len(sd) == expected
    assert not any("inv_freq" in k or "rotary" in k for k in sd)
    # parameter count agrees with ModelSpec's arithmetic
    assert sum(v.numel() for v in sd.values()) == SPEC.total_params


def test_rmsnorm_in_bf16_casts_back_before_the_weight():
    norm = RMSNorm(2, eps=0.0, dtype=torch.bfloat16)
    norm.weight.data = torch.tensor([3.0, 3.0], dtype=torch.bfloat16)
    x = torch.tensor([[1.0, 1.01]], dtype=torch.bfloat16)  # bf16 holds 1.0078125 for 1.01
    xf = x.float()
    normed = (xf / xf.pow(2).mean().sqrt()).to(torch.bfloat16)
    assert torch.equal(norm(x), normed * norm.weight)  # the official order: weight * cast(normalised)


def test_rmsnorm_matches_hand_computation():
    norm = RMSNorm(4, eps=0.0, dtype=torch.float32)
    norm.weight.data = torch.tensor([1.0, 2.0, 1.0, 1.0])
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    rms = math.sqrt((1 + 4 + 9 + 16) / 4)
    assert torch.allclose(norm(x), torch.tensor([[1 / rms, 4 / rms, 3 / rms, 4 / rms]]))


def test_partial_rotary_rotates_only_the_first_channels():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = rotary_cos_sin(torch.arange(5), rotary_dim=4, theta=10000.0)
    y = apply_partial_rotary(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position 0: no rotation
    # pairs (c, c + 2) are rotated by angle pos * theta^(-2c/4): norms kept, angle as computed
    for c in range(2):
        pair_x = torch.stack([x[..., c], x[..., c + 2]], -1)
        pair_y = torch.stack([y[..., c], y[..., c + 2]], -1)
        assert torch.allclose(pair_x.norm(dim=-1), pair_y.norm(dim=-1), atol=1e-5)
        ang = 3 * 10000.0 ** (-2 * c / 4)
        xr = pair_x[0, 0, 3]
        c_, s_ = math.cos(ang), math.sin(ang)
        rot = torch.tensor([xr[0] * c_ - xr[1] * s_, xr[1] * c_ + xr[0] * s_])
        assert torch.allclose(pair_y[0, 0, 3], rot, atol=1e-5)


def test_rotary_is_applied_in_the_model_dtype():
    x = torch.randn(1, 1, 3, 8).to(torch.bfloat16)
    cos, sin = rotary_cos_sin(torch.arange(3) + 1000, rotary_dim=8, theta=600000.0)
    c, s_ = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    rot = torch.cat([-x[..., 4:], x[..., :4]], -1)
    assert torch.equal(apply_partial_rotary(x, cos, sin), x * c + rot * s_)


def test_rope_scaling_linear_and_dynamic_hand_computed():
    spec = SPEC  # head_dim 32, partial 0.5: rotary over 16 channels, theta 600000
    pos = torch.arange(10)
    base_cos, _ = Rotary(spec, ModelFlags())(pos)
    lin_cos, _ = Rotary(spec, ModelFlags(rope_scaling="linear", rope_factor=4.0))(pos)
    inv = 1.0 / (600000.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert torch.allclose(lin_cos[:, :8], torch.cos(pos.float()[:, None] * inv / 4.0))
    dyn = Rotary(spec, ModelFlags(rope_scaling="dynamic", rope_factor=2.0, max_position_embeddings=8))
    assert torch.equal(dyn(torch.arange(8))[0], base_cos[:8])  # within max_position_embeddings: unchanged
    theta = 600000.0 * ((2.0 * 10 / 8) - 1.0) ** (16 / 14)  # seq_len 10 > 8
    want = torch.cos(pos.float()[:, None] * (1.0 / (theta ** (torch.arange(0, 16, 2).float() / 16))))
    assert torch.allclose(dyn(pos)[0][:, :8], want)


def test_flags_add_biases_drop_qk_norm_and_tie_embeddings():
    flags = ModelFlags(use_bias=True, use_qkv_bias=True, use_qk_norm=False, tie_word_embeddings=True)
    sd = build_model(SPEC, seed=2, flags=flags).state_dict()
    assert sd["model.layers.1.attention.dense.bias"].shape == (SPEC.hidden_size,)
    assert sd["model.layers.1.attention.query_key_value.bias"].shape == ((4 + 2 * 2) * SPEC.head_dim,)
    assert not any("query_layernorm" in k or "key_layernorm" in k for k in sd)
    assert torch.equal(sd["lm_head.weight"], sd["model.word_embeddings.weight"])


@pytest.mark.parametrize("flags", [dict(), dict(use_bias=True, use_qkv_bias=True), dict(use_qk_norm=False),
                                   dict(rope_scaling={"type": "linear", "factor": 2.0})],
                         ids=["official", "biases", "no-qk-norm", "rope-linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_logits_match_the_official_forward_written_out(flags, dtype):
    rope = flags.pop("rope_scaling", None)
    mflags = ModelFlags(**flags, **({"rope_scaling": rope["type"], "rope_factor": rope["factor"]} if rope else {}))
    m = build_model(SPEC, dtype, seed=4, flags=mflags)
    cfg = official_config(SPEC, **flags, rope_scaling=rope)
    ids = [5, 9, 33, 7, 100, 2, 40, 41, 42, 43]
    blocks = torch.arange(10) // 4
    mask = block_causal_mask(blocks, blocks)
    got = m(torch.tensor([ids]), torch.arange(10) + 30, mask)[0][0]
    want = official_forward(m.state_dict(), cfg, ids, torch.arange(10) + 30, mask, dtype)
    if dtype == torch.float32:
        assert torch.allclose(got, want, atol=1e-4)
        return
    # bf16: attention (SDPA here, eager there) and expert sums round in another order, and a random
    # model amplifies it, so both are held against the same bf16 weights computed in float32: ours
    # must be close to it and no further from it than the official forward is (measured: ours
    # 1.1% mean with torch 2.13, 2.6% with 2.11; the official eager forward 3.7% and 16%)
    m32 = build_model(SPEC, torch.float32, seed=None, flags=mflags)
    m32.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    truth = m32(torch.tensor([ids]), torch.arange(10) + 30, mask)[0][0]
    ours = (got - truth).abs().mean() / truth.abs().mean()
    official = (want - truth).abs().mean() / truth.abs().mean()
    assert ours < 0.05
    assert ours <= official * 1.25
    assert (got.argmax(-1) == truth.argmax(-1)).float().mean() >= 0.8


def _logits(model, ids, positions=None, blocks=None):
    n = len(ids)
    positions = torch.arange(n) if positions is None else positions
    blocks = torch.zeros(n, dtype=torch.long) if blocks is None else blocks
    logits, _ = model(torch.tensor([ids]), positions, block_causal_mask(blocks, blocks))
    return logits[0]


def test_block_causal_mask_hides_later_blocks(model):
    blk = block_ids(12, 4)  # absolute blocks of 4: 0, 1, 2
    assert blk.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    mask = block_causal_mask(blk, blk)
    assert mask[0].tolist() == [True] * 4 + [False] * 8
    assert mask[5].tolist() == [True] * 8 + [False] * 4
    ids = list(range(10, 22))
    base = _logits(model, ids, blocks=blk)
    later = ids[:8] + [300, 301, 302, 303]  # change block 2 only
    changed = _logits(model, later, blocks=blk)
    assert torch.allclose(base[:8], changed[:8], atol=1e-5)  # earlier blocks do not see it
    assert not torch.allclose(base[8:], changed[8:], atol=1e-3)
    same_block = ids[:5] + [300] + ids[6:]  # change inside block 1: all of block 1 sees it
    changed = _logits(model, same_block, blocks=blk)
    assert torch.allclose(base[:4], changed[:4], atol=1e-5)
    assert not torch.allclose(base[4], changed[4], atol=1e-3)


def test_rotary_makes_attention_depend_on_relative_positions_only(model):
    ids = [5, 9, 33, 7, 100, 2]
    a = _logits(model, ids)
    b = _logits(model, ids, positions=torch.arange(6) + 17)
    assert torch.allclose(a, b, atol=1e-3)
    c = _logits(model, ids, positions=torch.tensor([0, 1, 2, 3, 4, 9]))
    assert not torch.allclose(a, c, atol=1e-3)


def test_moe_block_equals_hand_written_expert_loop(model):
    block = model.model.layers[1].mlp
    x = torch.randn(7, SPEC.hidden_size)
    idx, w, _ = block.gate(x)
    expected = torch.zeros_like(x)
    for t in range(7):
        for j in range(SPEC.top_k):
            ex = block.experts[int(idx[t, j])]
            h = torch.nn.functional.silu(x[t] @ ex.gate_proj.weight.T) * (x[t] @ ex.up_proj.weight.T)
            expected[t] += w[t, j] * (h @ ex.down_proj.weight.T)
        sh = block.shared_experts
        expected[t] += (torch.nn.functional.silu(x[t] @ sh.gate_proj.weight.T) * (x[t] @ sh.up_proj.weight.T)) \
            @ sh.down_proj.weight.T
    with torch.no_grad():
        assert torch.allclose(block(x), expected, atol=1e-4)


def test_random_init_is_seeded_and_routes_over_many_experts():
    a = build_model(SPEC, seed=11).state_dict()
    b = build_model(SPEC, seed=11).state_dict()
    c = build_model(SPEC, seed=12).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])
    m = build_model(SPEC, seed=11)
    seen = []
    for _, blk in m.moe_blocks():
        blk.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[0]))
    _logits(m, list(range(40, 104)))
    for idx in seen:
        counts = torch.bincount(idx.flatten(), minlength=SPEC.num_experts)
        assert (counts > 0).sum() >= SPEC.num_experts // 2  # many experts used ...
        assert counts.max() < 64  # ... and none takes every token


def test_bfloat16_model_runs_router_in_fp32_with_a_bf16_bias():
    m = build_model(SPEC, torch.bfloat16, seed=1)
    logits = _logits(m, [1, 2, 3])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    gate = m.model.layers[1].mlp.gate
    assert gate.expert_bias.dtype == torch.bfloat16  # the official gate loaded in bf16 holds it so
    _, _, router_logits = gate(torch.randn(2, SPEC.hidden_size, dtype=torch.bfloat16))
    assert router_logits.dtype == torch.float32
