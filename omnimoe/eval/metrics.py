"""Retrieval metrics.

Captions repeat (several Tux Paint stamps are "A star."), so a retrieved item is a hit when its *group*
(e.g. the normalised caption) equals the query's, not only when it is the query's own pair.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def recall_at_k(
    queries: torch.Tensor,
    targets: torch.Tensor,
    query_groups: Sequence[str],
    target_groups: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k of cosine-similarity retrieval: share of queries with a same-group target in their top k.

    ``queries`` (Q, d), ``targets`` (N, d). Returns ``{"R@1": ..., "R@5": ..., "R@10": ..., "n": Q}``.
    """
    if len(queries) != len(query_groups) or len(targets) != len(target_groups):
        raise ValueError("one group label per query and per target is needed")
    if len(queries) == 0 or len(targets) == 0:
        raise ValueError("recall needs at least one query and one target")
    q = F.normalize(queries.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    return recall_from_scores(q @ t.t(), query_groups, target_groups, ks)


def recall_from_scores(
    scores: torch.Tensor, query_groups: Sequence[str], target_groups: Sequence[str], ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k from a (Q, N) score matrix (higher is better), hits counted by group as in :func:`recall_at_k`."""
    if scores.shape != (len(query_groups), len(target_groups)):
        raise ValueError(
            f"scores of shape {tuple(scores.shape)} for {len(query_groups)} queries and {len(target_groups)} targets"
        )
    names = {g: i for i, g in enumerate(dict.fromkeys([*query_groups, *target_groups]))}
    qg = torch.tensor([names[g] for g in query_groups])
    tg = torch.tensor([names[g] for g in target_groups])
    kmax = min(max(ks), len(target_groups))
    top = scores.topk(kmax, dim=1).indices  # (Q, kmax)
    hit = tg[top] == qg[:, None]  # (Q, kmax)
    out = {f"R@{k}": hit[:, : min(k, kmax)].any(1).float().mean().item() for k in ks}
    out["n"] = len(query_groups)
    return out
