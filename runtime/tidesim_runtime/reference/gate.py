"""The LLaDA2.0 router: sigmoid scores, per-expert selection bias, group-limited top-k.

Selection and weighting are deliberately separated: the bias (trained for load balance) only
decides *which* experts a token goes to; the weights are the unbiased sigmoid scores of the
chosen experts, normalised to sum 1 when top_k > 1 (a single expert keeps its raw score), and
multiplied by routed_scaling_factor. Routing runs in float32 whatever the model dtype, as in the
official model; the bias is held in the model dtype (bf16 rounds it) and added in float32.
"""

from __future__ import annotations

import torch
from torch import nn

from tidesim.errors import InputError


def group_limited_topk(
    biased: torch.Tensor, top_k: int, n_group: int, topk_group: int
) -> torch.Tensor:
    """Indices [tokens, top_k] of the chosen experts for biased scores [tokens, experts].

    Experts are split into n_group contiguous groups; a group's score is the sum of its two best
    biased scores (its best one if a group holds a single expert); only the topk_group best groups
    stay eligible, and the top_k best eligible experts are chosen (sorted by biased score).
    """
    tokens, experts = biased.shape
    group_size = experts // n_group
    grouped = biased.view(tokens, n_group, group_size)
    best = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    keep = best.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros(tokens, n_group, dtype=torch.bool, device=biased.device)
    group_mask.scatter_(1, keep, True)
    expert_mask = group_mask.unsqueeze(-1).expand(tokens, n_group, group_size).reshape(tokens, experts)
    masked = biased.masked_fill(~expert_mask, float("-inf"))
    return masked.topk(top_k, dim=-1).indices


def route(
    logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx, topk_weight) from router logits [tokens, experts] (float32)."""
    scores = torch.sigmoid(logits.float())
    biased = scores if expert_bias is None else scores + expert_bias.float()
    idx = group_limited_topk(biased, top_k, n_group, topk_group)
    chosen = scores.gather(1, idx)
    if top_k > 1:
        chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, chosen * routed_scaling_factor


class SigmoidGroupGate(nn.Module):
    """Router of one MoE layer; state_dict keys `weight` (experts x hidden) and `expert_bias`
    (both in the model dtype, as the official model loaded in that dtype holds them).

    forward(hidden [..., hidden]) -> (topk_idx [tokens, top_k], topk_weight [tokens, top_k],
    logits [tokens, experts]), tokens flattened over batch and sequence: the output signature
    of the official LLaDA2MoeGate, so capture hooks treat both alike.
    """

    expert_bias: torch.Tensor     # a registered buffer (selection bias), typed for mypy

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_routing_shape(num_experts, top_k, n_group, topk_group)
        self.num_experts = num_experts
        self.top_k = top_k
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype))
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        logits = flat @ self.weight.float().t()
        idx, weights = route(logits, self.expert_bias, self.top_k, self.n_group, self.topk_group,
                             self.routed_scaling_factor)
        return idx, weights, logits


def check_routing_shape(num_experts: int, top_k: int, n_group: int, topk_group: int) -> None:
    """Reject routing settings that cannot choose top_k experts (InputError, one line)."""
    if num_experts % n_group:
        raise InputError(f"num_experts {num_experts} is not divisible by n_group {n_group}")
    if not 0 < topk_group <= n_group:
        raise InputError(f"topk_group {topk_group} must lie in [1, n_group={n_group}]")
    if top_k > topk_group * (num_experts // n_group):
        raise InputError(
            f"top_k {top_k} exceeds the {topk_group * (num_experts // n_group)} experts in the "
            f"{topk_group} chosen groups"
        )
