"""Connectors: encoder token states -> soft tokens in the LLM's embedding space.

* ``mlp``: LLaVA-1.5 / Uni-MoE's image projector, two linear layers with GELU, one soft token per encoder
  token (``max_tokens`` > 0 first average-pools long sequences down to that many, e.g. Whisper's 1500 frames);
  ``global_token`` puts one more first: the same MLP on the mean of all the item's tokens (the pooled
  feature a linear probe reads; a per-token MLP on regional tokens never sees the whole item);
* ``qformer``: a fixed number of learnable queries cross-attending to the encoder states (Uni-MoE's speech
  and audio aligners, BLIP-2's Q-Former), then a linear map to the LLM width.

``video`` is frames through the image encoder, averaged over time before the connector (Uni-MoE), so a
video connector is an image-shaped connector fed with the mean of its frames' token states.

Soft tokens must sit at the scale of the LM's own input embeddings: a fresh connector's outputs are about
ten times smaller than Gemma's (scaled) text embeddings, and the LM then reads them as near-silence. With
``out_scale > 0`` every connector ends in :class:`SoftTokenNorm`: each soft token RMS-normalised, times a
learnable per-channel gain that starts at ``out_scale`` (the trainers set it to the RMS of the LM's text
embeddings, :func:`embedding_rms`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ConnectorSpec:
    kind: str = "mlp"  # mlp | qformer
    in_dim: int = 0  # encoder width
    out_dim: int = 0  # LLM width
    hidden_dim: int = 0  # mlp: 0 = out_dim
    max_tokens: int = 0  # mlp: > 0 pools longer sequences to this many tokens
    num_queries: int = 32  # qformer: soft tokens per item
    num_layers: int = 2  # qformer
    num_heads: int = 8  # qformer
    dropout: float = 0.0
    out_scale: float = 0.0  # > 0: soft tokens RMS-normalised, gain started here (the LM's embedding RMS); 0: raw
    global_token: bool = False  # mlp: one more soft token first, from the mean of all the item's encoder tokens

    def __post_init__(self) -> None:
        if self.kind not in ("mlp", "qformer"):
            raise ValueError(f"connector kind {self.kind!r}: choose 'mlp' or 'qformer'")
        if self.in_dim <= 0 or self.out_dim <= 0:
            raise ValueError(f"connector needs in_dim and out_dim > 0, got {self.in_dim}, {self.out_dim}")
        if not self.out_scale >= 0:
            raise ValueError(f"connector out_scale must be >= 0 (0: no output norm), got {self.out_scale}")


class SoftTokenNorm(nn.Module):
    """RMS norm over the last dimension with a learnable gain started at ``scale`` (computed in float32)."""

    def __init__(self, dim: int, scale: float, eps: float = 1e-6) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.full((dim,), float(scale)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.gain.float()).to(x.dtype)


def output_norm(spec: ConnectorSpec) -> nn.Module:
    return SoftTokenNorm(spec.out_dim, spec.out_scale) if spec.out_scale > 0 else nn.Identity()


@torch.no_grad()
def embedding_rms(llm: nn.Module, sample: int = 8192) -> float:
    """The median RMS of the LM's input embeddings (as the LM computes them: Gemma's scaling included), over
    ``sample`` token ids spread evenly across the vocabulary: the scale soft tokens should have."""
    table = llm.get_input_embeddings()
    vocab = table.weight.shape[0]
    ids = torch.linspace(0, vocab - 1, min(sample, vocab)).long().to(table.weight.device)
    rms = table(ids).float().pow(2).mean(-1).sqrt()
    return float(rms.median())


def pool_tokens(tokens: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average each row's real tokens down to at most ``max_tokens`` (row by row, over its own length, so
    the count, ``min(length, max_tokens)``, does not depend on how the batch was padded)."""
    if max_tokens <= 0 or tokens.shape[1] <= max_tokens:
        return tokens, mask
    lengths = mask.sum(1).tolist()
    out = tokens.new_zeros(len(tokens), min(max_tokens, max(lengths)), tokens.shape[-1])
    new_mask = torch.zeros(out.shape[:2], dtype=torch.bool, device=tokens.device)
    for i, n in enumerate(lengths):
        n = int(n)
        if n == 0:
            continue
        row = tokens[i, :n] if n <= max_tokens else F.adaptive_avg_pool1d(tokens[i, :n].T.unsqueeze(0), max_tokens)[0].T
        out[i, : len(row)] = row
        new_mask[i, : len(row)] = True
    return out, new_mask


class MLPConnector(nn.Module):
    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.hidden_dim or spec.out_dim
        self.net = nn.Sequential(
            nn.Linear(spec.in_dim, hidden), nn.GELU(), nn.Dropout(spec.dropout), nn.Linear(hidden, spec.out_dim)
        )
        self.norm = output_norm(spec)

    def num_tokens(self, encoder_tokens: int) -> int:
        n = min(encoder_tokens, self.spec.max_tokens) if self.spec.max_tokens > 0 else encoder_tokens
        return n + int(self.spec.global_token and encoder_tokens > 0)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        whole = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)  # (N, D): the pooled item
        tokens, mask = pool_tokens(tokens, mask, self.spec.max_tokens)
        if self.spec.global_token:
            tokens = torch.cat([whole.unsqueeze(1).to(tokens.dtype), tokens], 1)
            mask = torch.cat([mask.any(1, keepdim=True), mask], 1)
        return self.norm(self.net(tokens)), mask


class QFormerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_self, self.norm_ff = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.norm_q(q), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return q + self.ff(self.norm_ff(q))


class QFormerConnector(nn.Module):
    """Learnable queries read the encoder states through cross-attention: always ``num_queries`` soft tokens."""

    def __init__(self, spec: ConnectorSpec) -> None:
        super().__init__()
        self.spec = spec
        width = (
            spec.in_dim if spec.in_dim % spec.num_heads == 0 else spec.num_heads * max(1, spec.in_dim // spec.num_heads)
        )
        self.inp = nn.Identity() if width == spec.in_dim else nn.Linear(spec.in_dim, width)
        self.queries = nn.Parameter(torch.randn(spec.num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(QFormerBlock(width, spec.num_heads, spec.dropout) for _ in range(spec.num_layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, spec.out_dim)
        self.out_norm = output_norm(spec)

    def num_tokens(self, encoder_tokens: int) -> int:
        return self.spec.num_queries

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self.inp(tokens)
        q = self.queries.unsqueeze(0).expand(len(tokens), -1, -1).to(kv.dtype)
        pad = ~mask.bool()
        for block in self.blocks:
            q = block(q, kv, pad)
        out = self.out_norm(self.out(self.norm(q)))
        return out, torch.ones(out.shape[:2], dtype=torch.bool, device=out.device)


def build_connector(spec: ConnectorSpec) -> nn.Module:
    return MLPConnector(spec) if spec.kind == "mlp" else QFormerConnector(spec)
