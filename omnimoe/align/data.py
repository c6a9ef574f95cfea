"""Stored latents of several modalities, aligned by sample id, with the splits training needs.

The manifest gives each sample its split and its *group* (the normalised caption): two samples with the
same caption are interchangeable targets in retrieval. A validation split for early stopping is carved
out of ``train`` by group (so a caption never straddles train and val), unless the manifest has ``val``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from omnimoe.align.connector import parse_direction
from omnimoe.data.adapters import carved_as_val, grouped_split, normalise_caption
from omnimoe.data.manifest import read_manifest
from omnimoe.latents.store import LatentStore


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, most: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens averaged down to at most ``most`` (runs of consecutive tokens, as even as they
    split; a row with fewer keeps its own): (B, L, D) and mask (B, L) -> (B, min(L, most), D) and mask.
    Fewer tokens make token inputs cheap; the mean of the pooled tokens, weighted by run length, is the
    mean of the row's tokens."""
    if most <= 0 or tokens.shape[1] <= most:
        return tokens, mask
    lengths = mask.sum(1).tolist()
    out = tokens.new_zeros(len(tokens), most, tokens.shape[-1])
    kept = torch.zeros(len(tokens), most, dtype=torch.bool, device=mask.device)
    for i, n in enumerate(lengths):
        n = int(n)
        if n <= most:
            out[i, :n], kept[i, :n] = tokens[i, :n], True
            continue
        bounds = [round(j * n / most) for j in range(most + 1)]  # `most` runs of n // most or n // most + 1
        for j in range(most):
            out[i, j] = tokens[i, bounds[j] : bounds[j + 1]].mean(0)
        kept[i] = True
    return out, kept


@dataclass
class Pairs:
    """Rows of the source and target tables for the samples of one split that have both modalities."""

    ids: list[str]
    src_rows: torch.Tensor  # (n,) int64 into the source modality's latents
    tgt_rows: torch.Tensor  # (n,) int64 into the target modality's latents
    groups: list[str]

    def __len__(self) -> int:
        return len(self.ids)


class AlignmentData:
    def __init__(
        self,
        manifest: str | Path,
        stores: dict[str, str | Path | LatentStore],
        group_field: str = "text",
        val_fraction: float = 0.1,
        seed: int = 0,
        dev_fraction: float = 0.0,
        tokens: bool = False,
        max_tokens: int = 128,
        pooled_tokens: int = 0,
    ) -> None:
        """``val_fraction``: the share of train groups carved out as ``val`` (early stopping) when the manifest
        has no val split. ``dev_fraction`` > 0: another share of train groups carved out as ``dev``, used by
        neither training nor early stopping: an unbiased score for choosing between recipes (the val score
        of a run is the best of many evaluations, so it flatters the runs that fluctuate most).
        ``tokens``: also load token states (the first ``max_tokens`` of each item), pooled down to at most
        ``pooled_tokens`` per item when > 0 (:func:`pool_tokens`)."""
        self.manifest_path = Path(manifest)
        records = read_manifest(manifest)
        has_val = any(r.get("split") == "val" for r in records)
        self.split: dict[str, str] = {}
        self.group: dict[str, str] = {}
        for r in records:
            key = r.get(group_field)
            group = normalise_caption(key) if isinstance(key, str) and key.strip() else r["id"]
            split = r.get("split", "train")
            if split == "train" and not has_val and val_fraction > 0:
                split = "val" if carved_as_val(group, val_fraction, seed) else "train"
            if split == "train" and dev_fraction > 0:
                split = "dev" if grouped_split(group, dev_fraction, seed=seed + 2) == "test" else "train"
            self.split[r["id"]], self.group[r["id"]] = split, group
        self.latents: dict[str, torch.Tensor] = {}  # pooled (N, D) per modality
        self.tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (N, L, D) and mask, when asked for
        self.row: dict[str, dict[str, int]] = {}
        for modality, store in stores.items():
            store = store if isinstance(store, LatentStore) else LatentStore.open(store)
            self.latents[modality] = store.pooled()
            self.row[modality] = {sid: i for i, sid in enumerate(store.ids)}
            if tokens:
                self.tokens[modality] = pool_tokens(*store.padded_tokens(max_tokens), pooled_tokens)

    @classmethod
    def from_tensors(
        cls,
        splits: dict[str, str],
        latents: dict[str, tuple[list[str], torch.Tensor]],
        tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        groups: dict[str, str] | None = None,
        pooled_tokens: int = 0,
    ) -> "AlignmentData":
        """Latents held in memory instead of stores: ``splits`` (id -> train/val/test), ``latents`` (modality ->
        (ids, pooled (N, D))), optional ``tokens`` (modality -> (N, L, D) states and (N, L) mask, rows as in
        ``latents``) and ``groups`` (id -> caption group; default: each id its own)."""
        data = cls.__new__(cls)
        data.manifest_path = Path("<memory>")
        data.split = dict(splits)
        data.group = {sid: (groups or {}).get(sid, sid) for sid in splits}
        data.latents = {m: pooled for m, (_, pooled) in latents.items()}
        data.row = {m: {sid: i for i, sid in enumerate(ids)} for m, (ids, _) in latents.items()}
        data.tokens = {m: pool_tokens(t, k, pooled_tokens) for m, (t, k) in (tokens or {}).items()}
        return data

    def source(self, modality: str, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Model inputs for ``rows``: token states trimmed to the longest row and their mask when the data
        was loaded with tokens, else pooled vectors and None."""
        if modality not in self.tokens:
            return self.latents[modality][rows], None
        tokens, mask = self.tokens[modality]
        mask = mask[rows]
        width = max(1, int(mask.sum(1).max()))
        return tokens[rows, :width], mask[:, :width]

    def inputs(self, modality: str, rows: torch.Tensor, tokens: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A connector's inputs for ``rows``: token states and their mask (``tokens``; the data must have been
        loaded with ``tokens=True``), else pooled vectors and None."""
        if not tokens:
            return self.latents[modality][rows], None
        if modality not in self.tokens:
            raise ValueError(
                f"token_inputs: no token states for {modality!r}; load AlignmentData(..., tokens=True) from "
                "stores extracted with --tokens"
            )
        return self.source(modality, rows)

    @property
    def widths(self) -> dict[str, int]:
        return {m: t.shape[1] for m, t in self.latents.items()}

    def pairs(self, direction: str, split: str) -> Pairs:
        src, tgt = parse_direction(direction)
        for m in (src, tgt):
            if m not in self.latents:
                raise ValueError(
                    f"direction {direction!r}: no latent store for modality {m!r} (have {sorted(self.latents)})"
                )
        ids = [sid for sid, s in self.split.items() if s == split and sid in self.row[src] and sid in self.row[tgt]]
        return Pairs(
            ids,
            torch.tensor([self.row[src][i] for i in ids], dtype=torch.long),
            torch.tensor([self.row[tgt][i] for i in ids], dtype=torch.long),
            [self.group[i] for i in ids],
        )
