"""A LLaDA2.0-architecture model in plain torch, built from a tidesim ModelSpec and ModelFlags.

Module names follow the official Hugging Face implementation (model_type `llada2_moe`), so the
state_dict keys *are* the checkpoint's parameter names (model.word_embeddings.weight,
model.layers.i.attention.query_key_value.weight, model.layers.i.mlp.experts.e.up_proj.weight, ...)
and loading a checkpoint is a rename-free mapping (see checkpoint.py).

Numerics follow the official modeling code (github.com/ims-kdks/TIDE, model/modeling_llada2_moe.py;
docs/capture.md lists each rule):
- fused QKV rows are [queries | keys | values]; with use_qk_norm, queries and keys are
  RMS-normalised over head_dim before the rotary embedding;
- the rotary embedding acts on the first head_dim x partial_rotary_factor channels of each head
  (rotate-half layout); its cos/sin are computed in float32 once per forward and then applied in
  the model dtype; rope_scaling `linear` and `dynamic` are implemented;
- RMSNorm normalises in float32, casts back to the input dtype, then multiplies by its weight;
- the router runs in float32; the selection bias is held in the model dtype;
- biases exist where use_bias (attention output) and use_qkv_bias (fused QKV) say.
Attention takes a boolean mask [queries, keys] (True = may attend), built by generate.py from
block ids; the model itself knows nothing about blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tidesim.errors import InputError
from tidesim.models import ModelSpec
from tidesim_runtime.reference.gate import SigmoidGroupGate
from tidesim_runtime.reference.host_memory import advise_module

KVCache = list[tuple[torch.Tensor, torch.Tensor]]
Rope = tuple[torch.Tensor, torch.Tensor]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROPE_SCALINGS = ("linear", "dynamic")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ModelSpec/CLI dtype name."""
    if name not in DTYPES:
        raise InputError(f"dtype {name!r} is not supported by the reference model; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelFlags:
    """The official config's switches that change the module tree or the numerics, beyond the
    shapes in ModelSpec. Defaults are those of the released LLaDA2.0 checkpoints."""

    use_bias: bool = False
    use_qkv_bias: bool = False
    use_qk_norm: bool = True
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.rope_scaling is not None and self.rope_scaling not in ROPE_SCALINGS:
            raise InputError(f"rope_scaling type {self.rope_scaling!r} is not supported; the reference model "
                             f"implements {', '.join(ROPE_SCALINGS)}")
        if not (math.isfinite(self.rope_factor) and self.rope_factor >= 1.0 if self.rope_scaling else True):
            raise InputError(f"rope_scaling factor must be a finite number >= 1, got {self.rope_factor!r}")
        if self.max_position_embeddings <= 0:
            raise InputError(f"max_position_embeddings must be positive, got {self.max_position_embeddings}")

    def to_hf_dict(self) -> dict[str, object]:
        """These flags as config.json fields."""
        return {"use_bias": self.use_bias, "use_qkv_bias": self.use_qkv_bias, "use_qk_norm": self.use_qk_norm,
                "rope_scaling": None if self.rope_scaling is None else
                {"type": self.rope_scaling, "factor": self.rope_factor},
                "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings}


class RMSNorm(nn.Module):
    """x / rms(x) computed in float32, cast back to x's dtype, times weight (the official order)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def inverse_frequencies(rotary_dim: int, theta: float) -> torch.Tensor:
    """1 / theta^(2i / rotary_dim) for i < rotary_dim / 2, in float32."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))


def rotary_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float,
                   inv_freq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, rotary_dim] in float32, half-split layout (frequencies twice)."""
    freq = inverse_frequencies(rotary_dim, theta) if inv_freq is None else inv_freq
    angles = positions.float()[:, None] * freq.to(positions.device)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [batch, heads, seq, head_dim] in x's dtype
    (cos/sin cast to it first, as the official code does); keep the rest."""
    rd = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Rotary:
    """Rotary tables of one model, with rope_scaling. `dynamic` rescales theta once the longest
    position run exceeds max_position_embeddings and keeps the longest length seen (reset when a
    run fits again), as transformers' dynamic NTK update does for the official model."""

    def __init__(self, spec: ModelSpec, flags: ModelFlags) -> None:
        self.dim = int(spec.head_dim * spec.partial_rotary_factor) // 2 * 2
        self.theta, self.flags = spec.rope_theta, flags
        self.base_inv = inverse_frequencies(self.dim, self.theta) if self.dim else torch.zeros(0, device="cpu")
        if flags.rope_scaling == "linear":
            self.base_inv = self.base_inv / flags.rope_factor
        self.inv = self.base_inv
        self.cached_len = flags.max_position_embeddings

    def __call__(self, positions: torch.Tensor) -> Rope:
        if self.flags.rope_scaling == "dynamic":
            self._dynamic_update(int(positions.max()) + 1)
        return rotary_cos_sin(positions, self.dim, self.theta, self.inv)

    def _dynamic_update(self, seq_len: int) -> None:
        original, factor = self.flags.max_position_embeddings, self.flags.rope_factor
        if seq_len > self.cached_len:
            theta = self.theta * ((factor * seq_len / original) - (factor - 1)) ** (self.dim / (self.dim - 2))
            self.inv = inverse_frequencies(self.dim, theta)
            self.cached_len = seq_len
        elif seq_len < original and self.cached_len > original:
            self.inv, self.cached_len = self.base_inv, original


class Attention(nn.Module):
    """Grouped-query attention with fused QKV, qk RMSNorm and partial rotary embedding."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, flags: ModelFlags) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(spec.hidden_size, rows, bias=flags.use_qkv_bias, dtype=dtype)
        self.dense = nn.Linear(self.heads * self.head_dim, spec.hidden_size, bias=flags.use_bias, dtype=dtype)
        self.query_layernorm: RMSNorm | None = None
        self.key_layernorm: RMSNorm | None = None
        if flags.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, spec.rms_norm_eps, dtype)
            self.key_layernorm = RMSNorm(self.head_dim, spec.rms_norm_eps, dtype)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x [batch, seq, hidden]; rope (cos, sin) [seq, rotary_dim] float32; mask [seq, past + seq] bool.

        Returns the output and this call's keys and values (post-rotary) with the past ones
        prepended, so a caller can keep them as a prefix cache.
        """
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        if self.query_layernorm is not None and self.key_layernorm is not None:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope[0].shape[-1]:
            q, k = apply_partial_rotary(q, *rope), apply_partial_rotary(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), attn_mask=mask,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        out = out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        return self.dense(out), (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)); dense layers, experts, shared expert."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


ExpertRunner = Callable[["SparseMoeBlock", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pairs_by_expert(idx: torch.Tensor, w: torch.Tensor, experts: int) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The routed pairs of idx / w [tokens, top_k] in expert order (stable: one expert's tokens in
    token order): (pairs per expert, each pair's token, each pair's routing weight). The one order
    every local runner of the routed experts computes and sums in, so their bits can agree."""
    flat_idx = idx.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)
    counts = torch.bincount(flat_idx, minlength=experts).tolist()
    return counts, order // idx.shape[1], w.reshape(-1)[order]


def run_experts_locally(block: SparseMoeBlock, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                        expert: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Weighted sum of routed expert outputs for tokens x [tokens, hidden]; one call per used expert:
    the block's own expert module, or `expert(e, rows)` (the same experts through another kernel)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    counts, token_of, weight_of = pairs_by_expert(idx, w, len(block.experts))
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        y = block.experts[e](x[rows]) if expert is None else expert(e, x[rows])
        y = y.float() * weight_of[start:start + n, None]
        out.index_add_(0, rows, y)
        start += n
    return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    """gate + routed experts + shared expert (official names: mlp.gate, mlp.experts.e, mlp.shared_experts).

    `expert_runner` computes the routed part; the default runs every expert here. An offload
    executor replaces it to place experts elsewhere without touching routing.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate = SigmoidGroupGate(spec.hidden_size, spec.num_experts, spec.top_k, spec.n_group,
                                     spec.topk_group, spec.routed_scaling_factor, dtype)
        self.experts = nn.ModuleList(
            MLP(spec.hidden_size, spec.moe_intermediate_size, dtype) for _ in range(spec.num_experts)
        )
        self.shared_experts = (
            MLP(spec.hidden_size, spec.moe_intermediate_size * spec.num_shared_experts, dtype)
            if spec.num_shared_experts else None
        )
        self.expert_runner: ExpertRunner = run_experts_locally

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights, _ = self.gate(flat)
        out = self.expert_runner(self, flat, idx, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); mlp dense or MoE."""

    def __init__(self, spec: ModelSpec, layer: int, dtype: torch.dtype, flags: ModelFlags) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.attention = Attention(spec, dtype, flags)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MLP(spec.hidden_size, spec.dense_intermediate_size, dtype) if layer < spec.first_dense_layers
            else SparseMoeBlock(spec, dtype)
        )

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn, kv = self.attention(self.input_layernorm(x), rope, mask, past)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class Backbone(nn.Module):
    """`model.*` of the checkpoint: word_embeddings, layers, norm."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, flags: ModelFlags) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, dtype, flags) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype)


class LLaDA2Model(nn.Module):
    """The whole model: `model` (Backbone) and `lm_head` (its weight shared with the word
    embeddings when flags.tie_word_embeddings)."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float32, flags: ModelFlags | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.dtype = dtype
        self.flags = flags if flags is not None else ModelFlags()
        self.model = Backbone(spec, dtype, self.flags)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype)
        if self.flags.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self.rotary = Rotary(spec, self.flags)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        past: KVCache | None = None,
        logits_last: int | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits [batch, n, vocab] of the last `logits_last` positions (all if None) and the
        per-layer keys/values of past + these positions.

        input_ids [batch, seq]; positions [seq] absolute; mask [seq, past_len + seq] bool.
        """
        x = self.model.word_embeddings(input_ids)
        rope = self.rotary(positions)
        present: KVCache = []
        for i, layer in enumerate(self.model.layers):
            x, kv = layer(x, rope, mask, past[i] if past is not None else None)
            present.append(kv)
        if logits_last is not None:
            x = x[:, -logits_last:]
        return self.lm_head(self.model.norm(x)).float(), present

    def moe_blocks(self) -> list[tuple[int, SparseMoeBlock]]:
        """(layer index, MoE block) for every MoE layer."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]


EXPERT_BANK = 8


def init_random(model: LLaDA2Model, seed: int) -> LLaDA2Model:
    """Fill every weight from `seed` (deterministic) with scales chosen so a *random* model still
    decodes like a diffusion LM in the ways the traces care about:

    - gate logits have unit spread and the selection bias a small random spread, so routing is
      spread over many experts but not uniform;
    - residual branches are scaled so that context (not just the shared mask embedding) shapes
      each position's hidden state, which makes masked positions route and predict differently;
    - lm_head rows are scaled so the top logits are a few nats apart, giving a mix of confident
      and unconfident positions: threshold commits vary from one to many tokens per step.

    Routed experts are drawn as random row permutations with random column signs of a bank of
    EXPERT_BANK Gaussian matrices per layer and projection: every expert is a different random
    function, and mini-shaped layers (256 experts, 0.8 G parameters each) initialise in seconds
    rather than minutes. The weights are random: the tokens the model produces mean nothing.
    """
    spec = model.spec
    gen = torch.Generator().manual_seed(seed)
    hidden = spec.hidden_size
    logit_std = 2.5 * math.sqrt(2.0 * math.log(spec.vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            std = 1.0 / math.sqrt(p.shape[1] if p.ndim == 2 else hidden)
            if name == "model.word_embeddings.weight":
                std = 1.0
            elif name == "lm_head.weight":
                std = logit_std / math.sqrt(hidden)
            elif name.endswith("dense.weight") or name.endswith("down_proj.weight"):
                std *= 1.5
            p.normal_(0.0, std, generator=gen)
        for _, block in model.moe_blocks():
            block.gate.expert_bias.copy_(torch.randn(spec.num_experts, generator=gen) * 0.05)
            _init_experts(block, gen)
    return model


def _init_experts(block: SparseMoeBlock, gen: torch.Generator) -> None:
    """Expert e's projection = bank[e % EXPERT_BANK] with rows permuted and columns sign-flipped."""
    for proj in ("gate_proj", "up_proj", "down_proj"):
        weights = [getattr(e, proj).weight for e in block.experts]
        out_dim, in_dim = weights[0].shape
        std = (1.5 if proj == "down_proj" else 1.0) / math.sqrt(in_dim)
        bank = torch.empty(min(EXPERT_BANK, len(weights)), out_dim, in_dim, dtype=weights[0].dtype)
        bank.normal_(0.0, std, generator=gen)
        for e, w in enumerate(weights):
            perm = torch.randperm(out_dim, generator=gen)
            signs = (torch.randint(0, 2, (in_dim,), generator=gen) * 2 - 1).to(w.dtype)
            torch.index_select(bank[e % len(bank)], 0, perm, out=w.data)
            w.data.mul_(signs)


def build_model(spec: ModelSpec, dtype: torch.dtype = torch.float32, seed: int | None = 0,
                flags: ModelFlags | None = None) -> LLaDA2Model:
    """A model for `spec`; random weights from `seed`, or uninitialised (seed None, for loading)."""
    with torch.device("meta"):
        model = LLaDA2Model(spec, dtype, flags)
    model = model.to_empty(device="cpu")
    advise_module(model)          # before the weights are first written: huge pages, far fewer faults
    if model.flags.tie_word_embeddings:
        model.lm_head.weight = model.model.word_embeddings.weight
    return (model if seed is None else init_random(model, seed)).eval()
