"""Token dispatch: turn routing decisions into a list of (token, expert, weight) rows sorted by expert.

Unused top-p slots, null experts and padding tokens are removed here, so they cost no expert compute.
With a capacity, each expert keeps its first ``capacity`` assignments, first choices before second
choices, earlier tokens before later ones (GShard's priority); the rest are dropped and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    token_idx: torch.Tensor  # (N,) int64: source token of each row, rows grouped by expert
    expert_idx: torch.Tensor  # (N,) int64: expert of each row (non-decreasing)
    weight: torch.Tensor  # (N,) fp32 gate weight of each row
    counts: list[int]  # rows per expert (len = num_experts), the split sizes for the experts
    tokens_per_expert: torch.Tensor  # (num_experts,) int64, same numbers as a tensor
    dropped: int  # assignments dropped by the capacity limit

    def combine_matrix(self, num_tokens: int, num_experts: int) -> torch.Tensor:
        """(T, E) gate weights of the kept assignments: the dense oracle's view of the same plan."""
        m = torch.zeros(num_tokens, num_experts, dtype=self.weight.dtype, device=self.weight.device)
        m.index_put_((self.token_idx, self.expert_idx), self.weight, accumulate=True)
        return m


def expert_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def plan_dispatch(
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    topk_mask: torch.Tensor,
    num_experts: int,
    valid: torch.Tensor | None = None,
    capacity: int | None = None,
) -> DispatchPlan:
    """Sort the used (token, slot) assignments by expert; slots >= num_experts are null experts."""
    num_tokens, k = topk_idx.shape
    device = topk_idx.device
    # Slot-major order: every token's first choice comes before any second choice.
    idx = topk_idx.t().reshape(-1)
    weight = topk_weight.t().reshape(-1)
    use = topk_mask.t().reshape(-1) & (idx < num_experts)
    token = torch.arange(num_tokens, device=device).repeat(k)
    if valid is not None:
        use &= valid.repeat(k)
    idx, weight, token = idx[use], weight[use], token[use]
    order = torch.argsort(idx, stable=True)
    idx, weight, token = idx[order], weight[order], token[order]
    counts = torch.bincount(idx, minlength=num_experts)
    dropped = 0
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        position = torch.arange(idx.numel(), device=device) - starts[idx]
        keep = position < capacity
        dropped = int((~keep).sum())
        if dropped:
            idx, weight, token = idx[keep], weight[keep], token[keep]
            counts = counts.clamp(max=capacity)
    return DispatchPlan(token, idx, weight, counts.tolist(), counts, dropped)
