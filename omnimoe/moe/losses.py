"""Router losses: Switch/GShard load balance and ST-MoE z-loss, both padding-aware."""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs: torch.Tensor, topk_idx: torch.Tensor, topk_mask: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch/GShard balance loss ``E * sum_e f_e * P_e`` in the Hugging Face convention.

    ``probs`` (T, E): router probabilities over every routable slot. ``topk_idx`` (T, k) chosen slots and
    ``topk_mask`` (T, k) which of them are used (top-p leaves some unused). ``valid`` (T,) masks padding.
    ``f_e`` = used assignments to e / valid tokens, ``P_e`` = mean probability of e over valid tokens.
    At perfect balance with k experts per token the loss equals k (as in transformers' Mixtral).
    """
    num_slots = probs.shape[-1]
    if valid is None:
        valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    n = valid.sum().clamp(min=1).to(probs.dtype)
    used = topk_mask & valid[:, None]
    counts = torch.zeros(num_slots, dtype=probs.dtype, device=probs.device)
    counts.index_add_(0, topk_idx[used], torch.ones_like(topk_idx[used], dtype=probs.dtype))
    f = counts / n
    p = (probs * valid[:, None].to(probs.dtype)).sum(0) / n
    return num_slots * (f * p).sum()


def z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over valid tokens of ``logsumexp(logits)^2``."""
    z = torch.logsumexp(logits.float(), dim=-1).square()
    if valid is None:
        return z.mean()
    return (z * valid.float()).sum() / valid.sum().clamp(min=1)
