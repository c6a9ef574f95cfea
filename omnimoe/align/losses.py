"""Alignment losses: regression onto the target encoder's latent, and symmetric InfoNCE."""

from __future__ import annotations

import contextlib
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


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    logit_scale: torch.Tensor | float,
    key_all: torch.Tensor | None = None,
    query_all: torch.Tensor | None = None,
    offset: int = 0,
    prior_qk: torch.Tensor | None = None,
    prior_kq: torch.Tensor | None = None,
    float32_logits: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised ``query`` (B, d) and ``key`` (B, d); row i matches row i.

    Under data parallelism pass every rank's rows as ``key_all`` and ``query_all`` (see :func:`gather_rows`),
    with this rank's rows starting at ``offset``: each local query is scored against all keys and each local
    key against all queries. The mean of the ranks' losses is then exactly the loss of one process on the
    concatenated batch.

    ``prior_qk`` (B, B_all) and ``prior_kq`` (B, B_all) are fixed scores added to the cosines before scaling
    (local queries against all keys, local keys against all queries): training on top of a prior.
    """
    # In float32 even under autocast: at a logit scale of 20, bf16 logits are rounded in steps of up to
    # 0.125, which made results hinge on the order of operations (docs/history.md). ``float32_logits=False``
    # leaves autocast in charge (the behaviour before; benchmarks/align_loss.py compares the two).
    with torch.autocast(query.device.type, enabled=False) if float32_logits else contextlib.nullcontext():
        q = F.normalize(query.float(), dim=-1)
        k = F.normalize(key.float(), dim=-1)
        scale = logit_scale.float() if isinstance(logit_scale, torch.Tensor) else torch.tensor(float(logit_scale))
        ka = k if key_all is None else F.normalize(key_all.float(), dim=-1)
        qa = q if query_all is None else F.normalize(query_all.float(), dim=-1)
        labels = torch.arange(len(q), device=q.device) + (offset if key_all is not None or query_all is not None else 0)
        qk, kq = scale * (q @ ka.t()), scale * (k @ qa.t())
        if prior_qk is not None:
            qk = qk + scale * prior_qk.float()
        if prior_kq is not None:
            kq = kq + scale * prior_kq.float()
        return (F.cross_entropy(qk, labels) + F.cross_entropy(kq, labels)) / 2


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (autograd flows back to each rank's own rows) and this rank's offset among them.

    Every rank must pass the same number of rows. Without torch.distributed, returns ``(x, 0)``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts), dist.get_rank() * len(x)


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
