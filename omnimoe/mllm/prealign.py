"""Connector pre-alignment in latent space: soft tokens pulled onto the LM's own embeddings of what the
media show, before any LM forward.

A fresh connector emits soft tokens the frozen LM cannot read, and stage 1 then spends its first hundreds of
LM steps (about 1.3 s each for Gemma-3-270M on two CPU cores) finding a readable form. Pre-alignment gives
it one for almost nothing: for every media item of the stage-1 data, the target is the sum of the
normalised mean input embeddings (as the LM computes them) of the answers given about it by the chosen
tasks (captions, transcriptions, categories: answers that describe the item, not yes/no). The connector
is trained so that

* its mean soft token picks the item's target among the batch's (InfoNCE, items with identical targets
  not counted as negatives), and
* every soft token points along the target (1 - cosine).

Only directions are fitted: the connector's output norm keeps the LM's embedding scale. It costs no LM
forward (600 steps of 64 items: about a minute on two cores) and makes the soft tokens look like the words
the LM already knows ("animals", "zebra"), so the LM-loss steps that follow start from a readable prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from omnimoe.config import check_ranges
from omnimoe.runtime import adamw, require_finite
from omnimoe.mllm.connectors import pool_tokens
from omnimoe.mllm.data import ConversationData, pad_items


@dataclass
class PrealignRecipe:
    steps: int = 0  # 0: off
    tasks: list[str] = field(
        default_factory=lambda: ["caption-image", "image-category", "transcribe-speech", "caption-sound"]
    )
    batch_size: int = 64  # items per modality and step
    lr: float = 1e-3
    temperature: float = 0.05

    def __post_init__(self) -> None:
        check_ranges(self, {"steps": "[0, inf)", "batch_size": "[2, inf)", "lr": "(0, inf)", "temperature": "(0, inf)"})


@torch.no_grad()
def _answer_direction(text: str, tokenizer: Any, embedding: nn.Module) -> torch.Tensor | None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        return None
    device = embedding.weight.device
    return F.normalize(embedding(torch.tensor(ids, device=device)).float().mean(0), dim=-1).cpu()


def prealign_targets(
    data: ConversationData, tokenizer: Any, embedding: nn.Module, tasks: list[str]
) -> dict[str, tuple[list[list[str]], torch.Tensor, list[int]]]:
    """Per modality: the items (feature keys), their targets ``(N, width)`` and a target id per item (equal
    ids: equal answers). Records count when their ``task`` is in ``tasks`` (``"*"``: every record) and they
    hold exactly one media item."""
    answers: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for ex in data.examples:
        task = ex.sample.record.get("task")
        if "*" not in tasks and task not in tasks:
            continue
        items = [(m, tuple(keys)) for m, per in ex.media.items() for keys in per]
        replies = [text for role, text in ex.sample.turns if role == "assistant" and text.strip()]
        if len(items) != 1 or not replies:
            continue
        answers.setdefault(items[0], []).extend(replies)
    out: dict[str, tuple[list[list[str]], torch.Tensor, list[int]]] = {}
    ids: dict[tuple[str, ...], int] = {}
    direction: dict[str, torch.Tensor | None] = {}  # per answer text (a category is the answer of many items)
    for (modality, keys), replies in answers.items():
        unique = sorted(set(replies))
        for t in unique:
            if t not in direction:
                direction[t] = _answer_direction(t, tokenizer, embedding)
        dirs = [d for d in (direction[t] for t in unique) if d is not None]
        if not dirs:
            continue
        items, targets, tids = out.setdefault(modality, ([], [], []))  # type: ignore[arg-type]
        items.append(list(keys))
        targets.append(torch.stack(dirs).sum(0))  # type: ignore[attr-defined]
        tids.append(ids.setdefault(tuple(unique), len(ids)))
    return {m: (items, torch.stack(t), tids) for m, (items, t, tids) in out.items()}  # type: ignore[misc]


def _connector_input(connector: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """An item's encoder tokens, average-pooled once here when the connector would pool them itself on every
    call (an MLP connector with ``max_tokens`` and no global token: the same numbers, Whisper's 1500 frames
    read once instead of every step)."""
    spec = getattr(connector, "spec", None)
    if (
        spec is None
        or spec.kind != "mlp"
        or spec.max_tokens <= 0
        or spec.global_token
        or len(tokens) <= spec.max_tokens
    ):
        return tokens
    pooled, _ = pool_tokens(tokens.unsqueeze(0), torch.ones(1, len(tokens), dtype=torch.bool), spec.max_tokens)
    return pooled[0]


def prealign(
    connectors: nn.ModuleDict,
    data: ConversationData,
    tokenizer: Any,
    embedding: nn.Module,
    recipe: PrealignRecipe,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit ``connectors`` to the targets of :func:`prealign_targets` (in place). Returns ``{"items": {modality:
    n}, "history": [{"step", "loss"}...]}``; raises when no record of ``recipe.tasks`` holds a media item."""
    targets = prealign_targets(data, tokenizer, embedding, recipe.tasks)
    targets = {m: t for m, t in targets.items() if m in connectors}
    if not targets:
        raise ValueError(f"prealign: no record of tasks {recipe.tasks} with one media item in {data.path}")
    device = next(connectors.parameters()).device
    inputs = {
        m: [_connector_input(connectors[m], data.features.item(m, keys)) for keys in items]
        for m, (items, _, _) in targets.items()
    }
    params = [p for m in targets for p in connectors[m].parameters()]
    # the for-each AdamW the published stage-1 results were trained with (small tensors: fused buys little)
    opt = adamw(params, lr=recipe.lr, weight_decay=0.0, device=device, fused=False)
    rng = random.Random(seed)
    history, running = [], []
    connectors.train()
    bar = tqdm(range(recipe.steps), desc="stage 1: pre-align connectors", disable=not progress, dynamic_ncols=True)
    for step in bar:
        total = torch.zeros((), device=device)
        for m, (items, target, tids) in targets.items():
            pick = rng.sample(range(len(items)), min(recipe.batch_size, len(items)))
            batch = pad_items([inputs[m][i] for i in pick])
            soft, mask = connectors[m](batch.tokens.to(device), batch.mask.to(device))
            soft = soft.float()
            y = F.normalize(target[pick].to(device), dim=-1)
            mean = (soft * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
            logits = F.normalize(mean, dim=-1) @ y.T / recipe.temperature
            picked_ids = torch.tensor([tids[i] for i in pick], device=device)
            same = picked_ids.unsqueeze(0) == picked_ids.unsqueeze(1)
            logits = logits.masked_fill(same & ~torch.eye(len(pick), dtype=torch.bool, device=device), float("-inf"))
            cosine = F.cosine_similarity(soft, y.unsqueeze(1), dim=-1)[mask]
            total = total + F.cross_entropy(logits, torch.arange(len(pick), device=device)) + (1 - cosine).mean()
        require_finite(total, f"pre-alignment step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        running.append(float(total.detach()))
        if (step + 1) % 50 == 0 or step + 1 == recipe.steps:
            history.append({"step": step + 1, "loss": sum(running) / len(running)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            running.clear()
    connectors.eval()
    return {"items": {m: len(t[0]) for m, t in targets.items()}, "history": history}
