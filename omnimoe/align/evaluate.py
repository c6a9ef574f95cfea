"""Scoring a trained connector on stored latents: recall per direction (contrastive and regression heads),
the score early stopping selects on, the label prior alone and fused with the learned score, zero-shot
classification by category name, and the expert load.

``evaluate`` and ``fused_rows`` run inside the training loop: they put the model in eval mode and back in
training mode. The others use the model as given. Scores are computed on the CPU in float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.align.config import SELECT_ON, TrainConfig
from omnimoe.align.connector import parse_direction
from omnimoe.align.data import AlignmentData, Pairs
from omnimoe.align.prior import LabelPrior, fuse, pick_beta, prior_for
from omnimoe.eval.metrics import recall_at_k, recall_from_scores


def _to(
    args: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return args[0].to(device), None if args[1] is None else args[1].to(device)


@torch.no_grad()
def embed_pairs(
    model: nn.Module, data: AlignmentData, direction: str, split: str, batch: int = 512, cfg: TrainConfig | None = None
) -> tuple[Pairs, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``direction``'s pairs of ``split`` through ``model``: (pairs, contrastive queries, target keys,
    regression outputs or None), on the CPU in float32. The caller puts the model in eval mode."""
    tokens = cfg is not None and cfg.reads_tokens
    device = next(model.parameters()).device
    src, tgt = parse_direction(direction)
    pairs = data.pairs(direction, split)
    target = data.latents[tgt][pairs.tgt_rows].to(device)
    outs = [
        model(direction, *_to(data.inputs(src, pairs.src_rows[i : i + batch], tokens), device))
        for i in range(0, len(pairs), batch)
    ]
    con = torch.cat([o.contrastive for o in outs]).float().cpu()
    keys = model.embed_target(direction, target).float().cpu()
    reg = torch.cat([o.regression for o in outs]).float().cpu() if outs[0].regression is not None else None
    return pairs, con, keys, reg


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: AlignmentData,
    directions: list[str],
    split: str,
    batch: int = 512,
    cfg: TrainConfig | None = None,
) -> list[dict[str, Any]]:
    """Recall@1/5/10 per direction on ``split``, for the contrastive head and (if any) the regression head.
    ``cfg`` says whether the model reads token states (``token_inputs``)."""
    model.eval()
    rows = []
    for d in directions:
        src, tgt = parse_direction(d)
        if not len(data.pairs(d, split)):
            continue
        pairs, con, keys, reg = embed_pairs(model, data, d, split, batch, cfg)
        rows.append(
            {"query": src, "target": tgt, "head": "contrastive", **recall_at_k(con, keys, pairs.groups, pairs.groups)}
        )
        if reg is not None:
            target = data.latents[tgt][pairs.tgt_rows]
            rows.append(
                {
                    "query": src,
                    "target": tgt,
                    "head": "regression",
                    **recall_at_k(reg, target, pairs.groups, pairs.groups),
                }
            )
    model.train()
    return rows


def mean_r1(rows: list[dict[str, Any]], head: str = "contrastive") -> float:
    vals = [r["R@1"] for r in rows if r["head"] == head]
    return sum(vals) / len(vals) if vals else 0.0


def selection_score(rows: list[dict[str, Any]], select_on: str = "R@1") -> float:
    """Mean over directions of the recall a run is judged by (``select_on``: R@1, R@5, R@10, or ``mean`` of
    the three), on the score it is judged by: ``contrastive+prior`` where a direction has it (a connector
    trained on top of the prior), else ``contrastive``."""
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    keys = ("R@1", "R@5", "R@10") if select_on == "mean" else (select_on,)
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["query"], r["target"])
        if r["head"] == "contrastive+prior" or (r["head"] == "contrastive" and key not in best):
            best[key] = sum(r[k] for k in keys) / len(keys)
    return sum(best.values()) / len(best) if best else 0.0


@torch.no_grad()
def keep_residuals_that_help(
    model: nn.Module,
    data: AlignmentData,
    directions: list[str],
    cfg: TrainConfig,
    priors: dict[str, LabelPrior] | None = None,
    split: str = "val",
) -> dict[str, bool]:
    """``TrainConfig.residual_per_direction``: per direction, keep the residual on top of the linear path only
    where it scores higher on ``split`` (the early-stopping score) than the linear path alone; elsewhere zero
    it, in place. Returns direction -> kept. A tie keeps the linear path; a direction with fewer than two
    ``split`` pairs keeps its residual (nothing to judge by). Empty for a model without a linear path."""
    if not getattr(getattr(model, "config", None), "linear_path", False):
        return {}
    model.eval()

    def score(d: str) -> float:
        rows = evaluate(model, data, [d], split, cfg=cfg)
        if cfg.prior_weight and priors:  # trained on top of the prior: judged with it, as in early stopping
            rows += fused_rows(model, data, [d], priors, cfg, split=split)[0]
        return selection_score(rows, cfg.select_on)

    kept = {}
    for d in directions:
        if len(data.pairs(d, split)) < 2:
            kept[d] = True
            continue
        with_residual = score(d)
        parts = model.residual_parameters(d)
        saved = [p.detach().clone() for p in parts]
        for p in parts:
            p.zero_()
        kept[d] = with_residual > score(d)
        if kept[d]:
            for p, value in zip(parts, saved):
                p.copy_(value)
    return kept


def prior_rows(
    data: AlignmentData, directions: list[str], priors: dict[str, LabelPrior], split: str = "test"
) -> list[dict[str, Any]]:
    """Zero-shot recall of the prior alone (head ``"prior"``) for every direction it applies to."""
    rows = []
    for d in directions:
        prior = prior_for(priors, d)
        pairs = data.pairs(d, split)
        if prior is not None and len(pairs):
            src, tgt = parse_direction(d)
            rows.append(
                {
                    "query": src,
                    "target": tgt,
                    "head": "prior",
                    **recall_from_scores(prior.scores(data, d, pairs), pairs.groups, pairs.groups),
                }
            )
    return rows


@torch.no_grad()
def fused_rows(
    model: torch.nn.Module,
    data: AlignmentData,
    directions: list[str],
    priors: dict[str, LabelPrior],
    cfg: TrainConfig | None = None,
    split: str = "test",
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Recall of the learned contrastive score fused with the prior (head ``"contrastive+prior"``) for every
    direction a prior applies to, and the weight of the prior in each.

    A connector trained on top of the prior (``cfg.prior_weight > 0``) is scored as it was trained:
    ``cos(learned) + prior_weight * cos(prior)``. Any other is fused after training,
    ``z(learned) + beta * z(prior)``, with ``beta`` picked on the validation split."""
    weight = cfg.prior_weight if cfg is not None else 0.0
    model.eval()
    rows, betas = [], {}
    for d in directions:
        prior = prior_for(priors, d)
        if prior is None or not len(data.pairs(d, split)):
            continue
        beta = weight
        if not weight and len(data.pairs(d, "val")) > 1:
            pairs, con, keys, _ = embed_pairs(model, data, d, "val", cfg=cfg)
            beta = pick_beta(
                F.normalize(con, dim=-1) @ F.normalize(keys, dim=-1).t(), prior.scores(data, d, pairs), pairs.groups
            )
        pairs, con, keys, _ = embed_pairs(model, data, d, split, cfg=cfg)
        learned = F.normalize(con, dim=-1) @ F.normalize(keys, dim=-1).t()
        scores = (
            learned + weight * prior.scores(data, d, pairs)
            if weight
            else fuse(learned, prior.scores(data, d, pairs), beta)
        )
        src, tgt = parse_direction(d)
        rows.append(
            {
                "query": src,
                "target": tgt,
                "head": "contrastive+prior",
                **recall_from_scores(scores, pairs.groups, pairs.groups),
            }
        )
        betas[d] = beta
    model.train()
    return rows, betas


@torch.no_grad()
def serving_weights(
    model: torch.nn.Module,
    data: AlignmentData,
    directions: list[str],
    priors: dict[str, LabelPrior],
    betas: dict[str, float],
    cfg: TrainConfig | None = None,
) -> dict[str, float]:
    """Per direction, the weight ``w`` that serves a fused score from one vector index: the index holds
    ``[key, prior side]`` and a query ``[query, w * prior side]``, so a search ranks by ``cos(learned) +
    w * cos(prior)``. A connector trained on top of the prior has ``w = prior_weight``; one fused after
    training ranks by ``z(learned) + beta * z(prior)``, which orders a query's targets as ``cos(learned) +
    beta * std(learned) / std(prior) * cos(prior)``, with both spreads measured on the validation split.
    Directions without a prior, or where validation chose ``beta = 0``, are left out."""
    weight = cfg.prior_weight if cfg is not None else 0.0
    out = {}
    model.eval()
    for d in directions:
        prior = prior_for(priors, d)
        if prior is None:
            continue
        if weight:
            out[d] = weight
        elif betas.get(d, 0.0) > 0 and len(data.pairs(d, "val")) > 1:
            pairs, con, keys, _ = embed_pairs(model, data, d, "val", cfg=cfg)
            learned = F.normalize(con, dim=-1) @ F.normalize(keys, dim=-1).t()
            spread = prior.scores(data, d, pairs).std().clamp_min(1e-8)
            out[d] = float(betas[d] * learned.std() / spread)
    model.train()
    return out


@torch.no_grad()
def expert_load(
    model: Any, data: AlignmentData, directions: list[str], cfg: TrainConfig
) -> dict[str, list[float]] | None:
    """Share of routed assignments per expert, per direction, on the test split (MoE methods only)."""
    moe = getattr(model, "moe", None)
    if moe is None or moe.config.num_experts < 2:
        return None
    model.eval()  # routing as at inference: no dropout before the router
    load = {}
    for d in directions:
        pairs = data.pairs(d, "test")
        if len(pairs):
            counts = model(
                d, *data.inputs(d.split("->")[0], pairs.src_rows, cfg.reads_tokens)
            ).tokens_per_expert.float()
            load[d] = (counts / counts.sum()).tolist()
    return load


ZERO_SHOT_PROMPT = "A drawing of {}."  # a category name as a caption of the data set's kind


@torch.no_grad()
def zero_shot(
    model: Any,
    data: AlignmentData,
    categories: dict[str, str],
    names: list[str],
    prompt_latents: torch.Tensor,
    directions: list[str],
    text: str = "text",
    cfg: TrainConfig | None = None,
) -> list[dict[str, Any]]:
    """Classify each test item of every ``m->text`` direction by its nearest category prompt.

    ``prompt_latents`` are the text encoder's vectors of ``ZERO_SHOT_PROMPT.format(name)`` for ``names``. Returns one row
    per source modality: accuracy, chance (1 / classes), n.
    """
    model.eval()
    rows = []
    for d in directions:
        src, tgt = d.split("->")
        if tgt != text:
            continue
        pairs = data.pairs(d, "test")
        keep = [i for i, sid in enumerate(pairs.ids) if categories.get(sid) in names]
        if not keep:
            continue
        queries = F.normalize(
            model(d, *data.inputs(src, pairs.src_rows[keep], cfg is not None and cfg.reads_tokens)).contrastive.float(),
            dim=-1,
        )
        keys = F.normalize(model.embed_target(d, prompt_latents).float(), dim=-1)
        predicted = (queries @ keys.t()).argmax(1).tolist()
        truth = [names.index(categories[pairs.ids[i]]) for i in keep]
        accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(keep)
        rows.append(
            {"query": src, "classes": len(names), "accuracy": accuracy, "chance": 1 / len(names), "n": len(keep)}
        )
    return rows
