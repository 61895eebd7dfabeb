"""A plain, literal transcription of the official LLaDA2.0 `generate` rules (github.com/ims-kdks/TIDE,
model/modeling_llada2_moe.py: generate, _sample_with_temperature_topk_topp, _get_num_transfer_tokens),
written for the tests independently of tidesim_runtime.reference.generate: simple loops over the whole
padded sequence, no KV cache, the attention mask built from a block-level lower-triangular matrix.

Also: an official-format config.json for a tiny spec (every field the released config has) and a
forward-hook recorder of per-forward routing counts, so the tests compare the runtime's capture
with what these rules give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass
class OfficialRun:
    output: list[int]
    steps_per_block: list[int] = field(default_factory=list)
    window_lengths: list[int] = field(default_factory=list)
    mask_commits: int = 0
    early_stopped: bool = False


def quota_schedule(block_length: int, steps: int) -> list[int]:
    """num_transfer per step, counted out one token at a time (independent of divmod)."""
    quota = [0] * steps
    for i in range(block_length):
        quota[i % steps] += 1
    return quota


def filtered_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Row-wise, in plain loops: temper, top-k (ties kept), top-p (best token always kept), softmax."""
    rows = []
    for row in logits.float():
        values = row.tolist()
        if temperature > 0 and temperature != 1.0:
            values = [v / temperature for v in values]
        if top_k is not None and top_k > 0:
            kth = sorted(values, reverse=True)[min(top_k, len(values)) - 1]
            values = [v if v >= kth else float("-inf") for v in values]
        if top_p is not None and top_p < 1.0:
            order = sorted(range(len(values)), key=lambda i: -values[i])
            probs = torch.softmax(torch.tensor([values[i] for i in order]), dim=0).tolist()
            running, keep = 0.0, set()
            for rank, i in enumerate(order):
                if rank == 0 or running <= top_p:
                    keep.add(i)
                running += probs[rank]
            values = [v if i in keep else float("-inf") for i, v in enumerate(values)]
        rows.append(torch.softmax(torch.tensor(values, dtype=torch.float32), dim=0))
    return torch.stack(rows)


def official_generate(forward, prompt: list[int], *, gen_length: int, block_length: int = 32, steps: int = 32,
                      threshold: float = 0.95, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, do_sample: bool = False, minimal_topk: int = 1,
                      eos_early_stop: bool = False, eos_id: int | None, mask_id: int,
                      generator: torch.Generator | None = None) -> OfficialRun:
    """`forward(ids [1, n], positions [n], mask [n, n] bool)` -> logits [1, n, vocab]."""
    steps = min(steps, gen_length // minimal_topk)
    P, L = len(prompt), block_length
    num_blocks = (P + gen_length + L - 1) // L
    total = num_blocks * L
    tril = [[1 if j <= i else 0 for j in range(num_blocks)] for i in range(num_blocks)]
    full_mask = torch.tensor([[bool(tril[i // L][j // L]) for j in range(total)] for i in range(total)])
    x = [mask_id] * total
    x[:P] = prompt
    quota = quota_schedule(L, steps)
    run = OfficialRun(output=[])
    for b in range(P // L, num_blocks):
        end = (b + 1) * L
        done = 0
        for s in range(steps):
            masked = [x[p] == mask_id for p in range(end - L, end)]
            if not any(masked):
                break
            logits = forward(torch.tensor([x[:end]]), torch.arange(end), full_mask[:end, :end])[0, -L:]
            run.window_lengths.append(end)
            done += 1
            probs = filtered_probs(logits, temperature, top_k, top_p)
            if do_sample:
                tokens = torch.multinomial(probs, 1, generator=generator)[:, 0].tolist()
            else:
                tokens = [max(range(probs.shape[1]), key=lambda v, r=r: (probs[r, v].item(), -v))
                          for r in range(L)]
            conf = [probs[r, tokens[r]].item() if masked[r] else float("-inf") for r in range(L)]
            high = [r for r in range(L) if conf[r] > threshold]
            if len(high) >= quota[s]:
                pick = high
            else:
                ranked = sorted((r for r in range(L) if masked[r]), key=lambda r: -conf[r])
                pick = ranked[: quota[s]]
            for r in pick:
                x[end - L + r] = tokens[r]
                run.mask_commits += tokens[r] == mask_id
            if eos_early_stop and eos_id is not None and any(tokens[r] == eos_id for r in pick):
                first = x[:end].index(eos_id)
                if all(t != mask_id for t in x[P:first]):
                    run.steps_per_block.append(done)
                    run.output = x[P:first + 1]
                    run.early_stopped = True
                    return run
        run.steps_per_block.append(done)
        if eos_id is not None and eos_id in x[P:end]:
            break
    region = x[P:P + gen_length]
    run.output = region[: region.index(eos_id) + 1] if eos_id is not None and eos_id in region else region
    return run


def official_config(spec, **overrides) -> dict:
    """Every field of the released LLaDA2.0 config.json, with the tiny spec's shapes."""
    cfg = {
        "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0, "dtype": "bfloat16",
        "embedding_dropout": 0.0, "first_k_dense_replace": spec.first_dense_layers, "head_dim": spec.head_dim,
        "hidden_act": "silu", "hidden_size": spec.hidden_size, "initializer_range": 0.02,
        "intermediate_size": spec.dense_intermediate_size, "max_position_embeddings": 32768,
        "max_window_layers": 28, "model_type": "llada2_moe", "moe_intermediate_size": spec.moe_intermediate_size,
        "moe_router_enable_expert_bias": True, "n_group": spec.n_group, "norm_head": False, "norm_softmax": False,
        "norm_topk_prob": True, "num_attention_heads": spec.num_heads, "num_experts": spec.num_experts,
        "num_experts_per_tok": spec.top_k, "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads, "num_shared_experts": spec.num_shared_experts,
        "output_dropout": 0.0, "output_router_logits": False, "pad_token_id": spec.eos_token_id,
        "partial_rotary_factor": spec.partial_rotary_factor, "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None, "rope_theta": spec.rope_theta,
        "rotary_dim": int(spec.head_dim * spec.partial_rotary_factor),
        "routed_scaling_factor": spec.routed_scaling_factor, "router_dtype": "fp32", "score_function": "sigmoid",
        "sliding_window": 4096, "tie_word_embeddings": False, "topk_group": spec.topk_group,
        "transformers_version": "4.57.1", "use_bias": False, "use_cache": False, "use_qkv_bias": False,
        "use_rmsnorm": True, "use_sliding_window": False, "using_split_qkv_in_self_attention": False,
        "vocab_size": spec.vocab_size, "mask_token_id": spec.mask_token_id, "eos_token_id": spec.eos_token_id,
    }
    cfg.update(overrides)
    return cfg


def write_official_checkpoint(folder: Path, spec, state_dict: dict, **overrides) -> Path:
    """config.json + model.safetensors written with json and safetensors directly."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(official_config(spec, **overrides), indent=1))
    save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    return folder


class RoutingHooks:
    """Per-forward expert counts [MoE layers, experts] from forward hooks on every gate module."""

    def __init__(self, model, num_experts: int) -> None:
        self.num_experts, self.current, self.forwards = num_experts, [], []
        gates = [m for name, m in model.named_modules() if name.endswith("mlp.gate")]
        self.handles = [g.register_forward_hook(self._hook) for g in gates]

    def _hook(self, module, inputs, output) -> None:
        self.current.append(torch.bincount(output[0].reshape(-1), minlength=self.num_experts))

    def end_forward(self) -> None:
        self.forwards.append(torch.stack(self.current))
        self.current = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def official_forward(sd: dict, cfg: dict, ids: list[int], positions: torch.Tensor, mask: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Logits [n, vocab] float32 by the official modeling code's arithmetic, written out from the
    state dict and the config: RMSNorm = weight * (x normalised in float32, cast back); rotary
    cos/sin from float32 frequencies, applied in `dtype`; eager attention with an additive mask
    and a float32 softmax; router in float32 (sigmoid, bias for selection, best 4-of-8-style
    groups by the sum of their top-2, weights normalised when top_k > 1, times the scaling factor);
    expert outputs weighted and summed in float32, then cast back; plus the shared expert."""
    w = {k: v.to(dtype) for k, v in sd.items()}
    eps, heads, kvh = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["head_dim"]
    dim = int(hd * cfg["partial_rotary_factor"])

    def rms(x, weight):
        xf = x.float()
        return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def swiglu(x, prefix):
        g = x @ w[prefix + "gate_proj.weight"].T
        return (torch.nn.functional.silu(g) * (x @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T

    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type")) == "linear":
        inv = inv / scaling["factor"]
    freqs = positions.float()[:, None] * inv[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype)

    def rotate(t):  # t [heads, n, hd]
        r, rest = t[..., :dim], t[..., dim:]
        half = torch.cat([-r[..., dim // 2:], r[..., :dim // 2]], -1)
        return torch.cat([r * cos + half * sin, rest], -1)

    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    x = w["model.word_embeddings.weight"][torch.tensor(ids)]
    n = len(ids)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, w[p + "input_layernorm.weight"])
        qkv = h @ w[p + "attention.query_key_value.weight"].T
        if cfg["use_qkv_bias"]:
            qkv = qkv + w[p + "attention.query_key_value.bias"]
        qkv = qkv.view(n, heads + 2 * kvh, hd)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + kvh], qkv[:, heads + kvh:]
        if cfg.get("use_qk_norm", True):  # absent from the released config; the class default is true
            q, k = rms(q, w[p + "attention.query_layernorm.weight"]), rms(k, w[p + "attention.key_layernorm.weight"])
        q, k, v = rotate(q.transpose(0, 1)), rotate(k.transpose(0, 1)), v.transpose(0, 1)
        k, v = k.repeat_interleave(heads // kvh, 0), v.repeat_interleave(heads // kvh, 0)
        scores = (q @ k.transpose(1, 2)) * hd ** -0.5 + additive
        out = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype) @ v
        attn = out.transpose(0, 1).reshape(n, heads * hd) @ w[p + "attention.dense.weight"].T
        if cfg["use_bias"]:
            attn = attn + w[p + "attention.dense.bias"]
        x = x + attn
        h = rms(x, w[p + "post_attention_layernorm.weight"])
        if i < cfg["first_k_dense_replace"]:
            x = x + swiglu(h, p + "mlp.")
            continue
        logits = h.float() @ w[p + "mlp.gate.weight"].float().T
        scores = torch.sigmoid(logits)
        biased = scores + w[p + "mlp.gate.expert_bias"]
        groups = biased.view(n, cfg["n_group"], -1)
        group_score = groups.topk(2, dim=-1).values.sum(-1)
        moe = torch.zeros(n, x.shape[1])
        for t in range(n):
            keep = set(group_score[t].topk(cfg["topk_group"]).indices.tolist())
            size = cfg["num_experts"] // cfg["n_group"]
            allowed = [e for e in range(cfg["num_experts"]) if e // size in keep]
            chosen = sorted(allowed, key=lambda e, t=t: -float(biased[t, e]))[: cfg["num_experts_per_tok"]]
            raw = [float(scores[t, e]) for e in chosen]
            total = sum(raw) + 1e-20 if len(chosen) > 1 else 1.0
            for e, s in zip(chosen, raw, strict=True):
                y = swiglu(h[t:t + 1], f"{p}mlp.experts.{e}.")
                moe[t] += y[0].float() * (s / total * cfg["routed_scaling_factor"])
        y = moe.to(dtype)
        if cfg["num_shared_experts"]:
            y = y + swiglu(h, p + "mlp.shared_experts.")
        x = x + y
    return (rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T).float()
