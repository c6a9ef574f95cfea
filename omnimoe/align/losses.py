"""Alignment losses: regression onto the target encoder's latent, and symmetric InfoNCE."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "smooth_l1") -> torch.Tensor:
    """``smooth_l1`` (the Alt-MoE reference, which calls it "L2"), ``mse`` or ``cosine`` (1 - cos)."""
    pred, target = pred.float(), target.float()
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"regression loss must be smooth_l1, mse or cosine, got {kind!r}")


def info_nce(query: torch.Tensor, key: torch.Tensor, logit_scale: torch.Tensor | float, key_all: torch.Tensor | None = None,
             offset: int = 0) -> torch.Tensor:  # fmt: skip
    """Symmetric InfoNCE between L2-normalised ``query`` (B, d) and ``key`` (B, d); row i matches row i.

    ``key_all`` / query negatives gathered from other ranks: when given, ``key_all`` holds every rank's keys
    and this rank's rows start at ``offset`` in it (the query->key direction uses all keys as negatives).
    """
    q = F.normalize(query.float(), dim=-1)
    k = F.normalize(key.float(), dim=-1)
    scale = logit_scale if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale)
    if key_all is None:
        logits = scale * q @ k.t()
        labels = torch.arange(len(q), device=q.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    ka = F.normalize(key_all.float(), dim=-1)
    labels = torch.arange(len(q), device=q.device) + offset
    q_to_k = F.cross_entropy(scale * q @ ka.t(), labels)
    k_to_q = F.cross_entropy(scale * k @ q.t(), torch.arange(len(q), device=q.device))
    return (q_to_k + k_to_q) / 2


class LogitScale(nn.Module):
    """``1 / temperature``, fixed or learnable (stored as a log, clamped at 100 as in CLIP)."""

    def __init__(self, temperature: float = 0.03, learnable: bool = False) -> None:
        super().__init__()
        value = torch.tensor(math.log(1 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(100)).exp()
