"""The label prior: what a frozen encoder's own classifier already knows, placed in the text encoder's space.

EfficientNet was trained to name what it sees among 1,000 ImageNet classes, and MiniLM can embed those names.
So every stored image latent gets a vector in text space without any training: the class-probability-weighted
mean of the class-name embeddings (ConSE, Norouzi et al. 2014). The classifier is a linear map of the pooled
latent, so this needs the stored latents only, never the images. The cosine between a caption's latent and
that vector is a zero-shot text<->image score.

A connector trained on a few hundred pairs learns what the prior misses, and forgets some of what it knows.
They are combined as an ensemble of scores, per direction between the text modality and a modality with a
prior::

    s = z(learned) + beta * z(prior),    z(S) = (S - mean(S)) / std(S)

with ``beta`` picked on the validation split from :data:`BETAS` (``beta = 0`` when the prior does not help, so
it never hurts validation recall). Both terms are inner products, so the fused score is the inner product of
concatenated, scaled vectors: a vector index can serve it unchanged.

Or the connector learns on top of the prior (``TrainConfig.prior_weight > 0``): the prior's cosine, times the
weight, is added to the InfoNCE logits, so training fits only what the prior gets wrong; validation (early
stopping) and test score ``cos(learned) + prior_weight * cos(prior)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from omnimoe.align.connector import parse_direction
from omnimoe.align.data import AlignmentData, Pairs
from omnimoe.encoders.base import LabelHead
from omnimoe.eval.metrics import recall_from_scores

BETAS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
LABEL_PROMPT = "A {}."  # the label names as captions ("A koala.")


@dataclass
class LabelPrior:
    modality: str  # the modality whose encoder has the label head, e.g. "image"
    text: str  # the text modality whose encoder embedded the label names
    head: LabelHead
    label_vectors: torch.Tensor  # (num_labels, D_text), L2-normalised

    def bridge(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D_modality) pooled latents -> (N, D_text) L2-normalised vectors in the text encoder's space."""
        probs = torch.softmax(self.head.logits(pooled), dim=-1)
        return F.normalize(probs @ self.label_vectors, dim=-1)

    def applies_to(self, direction: str) -> bool:
        return set(parse_direction(direction)) == {self.modality, self.text}

    def pair_scores(self, direction: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(Q, N) prior cosines between ``direction``'s source latents (rows) and target latents (columns)."""
        src, tgt = parse_direction(direction)
        return self.side(src, source) @ self.side(tgt, target).t()

    def scores(self, data: AlignmentData, direction: str, pairs: Pairs) -> torch.Tensor:
        """(Q, N) prior scores between ``pairs``' sources (rows) and targets (columns), in the pairs' order."""
        src, tgt = parse_direction(direction)
        return self.pair_scores(direction, data.latents[src][pairs.src_rows], data.latents[tgt][pairs.tgt_rows])

    def side(self, modality: str, pooled: torch.Tensor) -> torch.Tensor:
        """One side of :meth:`pair_scores`: unit vectors in text space for ``modality``'s pooled latents
        (the text latents themselves, or the bridge of the other modality's)."""
        pooled = pooled.to(self.label_vectors.device)
        return F.normalize(pooled.float(), dim=-1) if modality == self.text else self.bridge(pooled)

    def to(self, device: torch.device | str) -> LabelPrior:
        head = LabelHead(self.head.weight.to(device), self.head.bias.to(device), self.head.names)
        return LabelPrior(self.modality, self.text, head, self.label_vectors.to(device))


def prior_for(priors: dict[str, LabelPrior] | None, direction: str) -> LabelPrior | None:
    """The prior that applies to ``direction`` (text <-> its modality), if any."""
    return next((p for p in (priors or {}).values() if p.applies_to(direction)), None)


def build_label_priors(
    encoders: dict[str, str], text: str = "text", prompt: str = LABEL_PROMPT
) -> dict[str, LabelPrior]:
    """A prior for every modality whose encoder has a label head, bridged into ``text``'s encoder
    (``encoders``: modality -> registry name). Empty when there is no text modality or no label head."""
    from omnimoe.encoders import load_encoder

    if text not in encoders:
        return {}
    loaded = {name: load_encoder(name) for name in dict.fromkeys(encoders.values())}  # each encoder once
    return label_priors({m: loaded[name] for m, name in encoders.items()}, text, prompt)


def label_priors(encoders: dict[str, Any], text: str = "text", prompt: str = LABEL_PROMPT) -> dict[str, LabelPrior]:
    """:func:`build_label_priors` from loaded encoders (modality -> :class:`FrozenEncoder`)."""
    if text not in encoders:
        return {}
    heads = {m: head for m, enc in encoders.items() if m != text and (head := enc.label_head()) is not None}
    encoder, priors = encoders[text], {}
    for modality, head in heads.items():
        vectors = encoder.encode([encoder.load_item(prompt.format(n)) for n in head.names]).pooled.float()
        priors[modality] = LabelPrior(modality, text, head, F.normalize(vectors, dim=-1))
    return priors


def standardise(scores: torch.Tensor) -> torch.Tensor:
    return (scores - scores.mean()) / scores.std().clamp_min(1e-8)


def fuse(learned: torch.Tensor, prior: torch.Tensor, beta: float) -> torch.Tensor:
    return standardise(learned) + beta * standardise(prior)


def pick_beta(learned: torch.Tensor, prior: torch.Tensor, groups: list[str]) -> float:
    """The :data:`BETAS` value with the best validation R@1 (then R@5); the smallest on a tie."""
    best, best_key = 0.0, (-1.0, -1.0)
    for beta in BETAS:
        r = recall_from_scores(fuse(learned, prior, beta), groups, groups)
        if (r["R@1"], r["R@5"]) > best_key:
            best, best_key = beta, (r["R@1"], r["R@5"])
    return best
