"""The label prior: what a frozen encoder's own classifier already knows, placed in the text encoder's space.

EfficientNet was trained to name what it sees among 1,000 ImageNet classes, and the text encoder can embed those names.
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

import dataclasses
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
# The bridge's settings that :func:`calibrate` tries, on the train split: the prompt of the label names, a
# softmax temperature, and how many of the most probable labels to keep (0: all; ConSE keeps the top few).
# The first of each is the plain bridge, which a tie keeps.
PROMPTS: tuple[str, ...] = (LABEL_PROMPT, "{}")
TEMPERATURES: tuple[float, ...] = (1.0, 2.0, 3.0)
TOP_KS: tuple[int, ...] = (0, 5, 10, 20)
CALIBRATION_PAIRS = 2000  # at most this many train pairs score each setting (every k-th pair beyond)
PLAIN_BRIDGE: dict[str, Any] = {"prompt": PROMPTS[0], "temperature": TEMPERATURES[0], "top_k": TOP_KS[0]}


@dataclass
class LabelPrior:
    modality: str  # the modality whose encoder has the label head, e.g. "image"
    text: str  # the text modality whose encoder embedded the label names
    head: LabelHead
    label_vectors: torch.Tensor  # (num_labels, D_text), L2-normalised
    prompt: str = LABEL_PROMPT  # how the label names were written before the text encoder embedded them
    temperature: float = 1.0  # of the classifier's softmax
    top_k: int = 0  # keep only the k most probable labels (0: all)

    def bridge(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D_modality) pooled latents -> (N, D_text) L2-normalised vectors in the text encoder's space."""
        logits = self.head.logits(pooled) / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return F.normalize(probs @ self.label_vectors, dim=-1)

    @property
    def settings(self) -> dict[str, Any]:
        """What :func:`label_priors` needs to rebuild this prior from the encoders (``prior.json``)."""
        return {"prompt": self.prompt, "temperature": self.temperature, "top_k": self.top_k}

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
        return dataclasses.replace(self, head=head, label_vectors=self.label_vectors.to(device))


def prior_for(priors: dict[str, LabelPrior] | None, direction: str) -> LabelPrior | None:
    """The prior that applies to ``direction`` (text <-> its modality), if any."""
    return next((p for p in (priors or {}).values() if p.applies_to(direction)), None)


def build_label_priors(
    encoders: dict[str, str], text: str = "text", prompt: str = LABEL_PROMPT, calibrate_on: AlignmentData | None = None
) -> dict[str, LabelPrior]:
    """A prior for every modality whose encoder has a label head, bridged into ``text``'s encoder
    (``encoders``: modality -> registry name). Empty when there is no text modality or no label head.
    With ``calibrate_on``, each prior's bridge settings are chosen on that data's train split
    (:func:`calibrate`; ``prompt`` is then ignored)."""
    from omnimoe.encoders import load_encoder

    if text not in encoders:
        return {}
    loaded = {name: load_encoder(name) for name in dict.fromkeys(encoders.values())}  # each encoder once
    by_modality = {m: loaded[name] for m, name in encoders.items()}
    if calibrate_on is None:
        return label_priors(by_modality, text, prompt)
    candidates = {p: label_priors(by_modality, text, p) for p in PROMPTS}
    return calibrate(candidates, calibrate_on)


def label_priors(
    encoders: dict[str, Any], text: str = "text", prompt: str = LABEL_PROMPT, temperature: float = 1.0, top_k: int = 0
) -> dict[str, LabelPrior]:
    """:func:`build_label_priors` from loaded encoders (modality -> :class:`FrozenEncoder`), with given bridge
    settings."""
    if text not in encoders:
        return {}
    heads = {m: head for m, enc in encoders.items() if m != text and (head := enc.label_head()) is not None}
    encoder, priors = encoders[text], {}
    for modality, head in heads.items():
        vectors = encoder.encode([encoder.load_item(prompt.format(n)) for n in head.names]).pooled.float()
        priors[modality] = LabelPrior(modality, text, head, F.normalize(vectors, dim=-1), prompt, temperature, top_k)
    return priors


def calibrate(
    candidates: dict[str, dict[str, LabelPrior]], data: AlignmentData, split: str = "train"
) -> dict[str, LabelPrior]:
    """Per modality, the bridge settings (prompt, from ``candidates``: prompt -> priors; :data:`TEMPERATURES`;
    :data:`TOP_KS`) of best zero-shot mean R@1 over text -> modality and back on ``split`` (then R@5). The prior
    is never trained, so the train split is held out for it; a tie keeps the earlier setting (the first is the
    plain bridge). Settings are kept where the split has fewer than two pairs."""
    chosen: dict[str, LabelPrior] = {}
    first = next(iter(candidates.values()), {})
    for modality, plain in first.items():
        pairs = data.pairs(f"{plain.text}->{modality}", split) if {plain.text, modality} <= set(data.latents) else None
        if pairs is None or len(pairs) < 2:
            chosen[modality] = plain
            continue
        keep = torch.arange(0, len(pairs), max(1, -(-len(pairs) // CALIBRATION_PAIRS)))
        groups = [pairs.groups[i] for i in keep.tolist()]
        text_side = data.latents[plain.text][pairs.src_rows[keep]]
        pooled = data.latents[modality][pairs.tgt_rows[keep]]
        best, best_key = plain, (-1.0, -1.0)
        for prompt, priors in candidates.items():
            for temperature in TEMPERATURES:
                for top_k in TOP_KS:
                    prior = dataclasses.replace(priors[modality], temperature=temperature, top_k=top_k)
                    scores = prior.side(plain.text, text_side) @ prior.side(modality, pooled).t()
                    forward = recall_from_scores(scores, groups, groups)
                    backward = recall_from_scores(scores.t(), groups, groups)
                    key = ((forward["R@1"] + backward["R@1"]) / 2, (forward["R@5"] + backward["R@5"]) / 2)
                    if key > best_key:
                        best, best_key = prior, key
        chosen[modality] = best
    return chosen


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
