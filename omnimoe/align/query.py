"""A served query through a trained connector, without torch's per-op cost.

One pooled query through the Alt-MoE connector is about 25 small ops: the input projection, the router,
four 256 x 256 experts, a LayerNorm, the head. On a CPU each torch op costs several microseconds of
dispatch, more than its arithmetic, and the MoE's batched dispatch (sorting, counting, gathering) adds more:
about 1.3 ms a query. :class:`QueryPath` holds a snapshot of one direction's weights as NumPy float32 arrays
and computes the same contrastive query row by row, in about 0.16 ms (``benchmarks/retrieval.py``).

It covers what a :class:`~omnimoe.align.connector.ConnectorConfig` can make (softmax router, top-k with or
without renormalisation, top-p, MLP or GLU experts, any expert activation, the dense-MLP ablation, the linear
path) on pooled inputs in float32; it refuses an MoE with other options (shared or null experts, sigmoid
scores, biases). Anything else (token inputs, training mode, an autocast dtype) is the connector's ``forward``.
The snapshot is taken once: build a new path after changing the weights.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import erf
from threadpoolctl import ThreadpoolController

from omnimoe.align.connector import AltMoEConnector, _key

MAX_ROWS = 16  # above this many queries, the connector's batched forward is the faster path
_BLAS = ThreadpoolController()  # NumPy's BLAS runs these 256-wide products on one thread (two only wait)


def _gelu_tanh(z: np.ndarray) -> np.ndarray:
    return 0.5 * z * (1.0 + np.tanh(np.float32(0.7978845608028654) * (z + np.float32(0.044715) * z**3)))


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.exp(-z))


_ACTIVATIONS = {  # omnimoe.moe.experts.ACTIVATIONS, in NumPy
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z * np.float32(0.7071067811865476))),
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": lambda z: np.maximum(z, 0),
    "silu": _silu,
    "swish": _silu,
}


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().float().cpu().numpy().copy()


class QueryPath:
    """``direction``'s contrastive query of ``connector`` for pooled inputs: ``path(pooled)`` equals
    ``connector(direction, pooled, tasks=("contrastive",)).contrastive`` (to float32 rounding)."""

    def __init__(self, connector: AltMoEConnector, direction: str) -> None:
        src, _ = connector._check(direction)
        cfg, moe = connector.config, connector.moe.config
        other = {
            "num_shared_experts": moe.num_shared_experts,
            "num_null_experts": moe.num_null_experts,
            "score_func": moe.score_func != "softmax",
            "router_bias": moe.router_bias,
            "expert_bias": moe.expert_bias,
            "router_bias_update_rate": moe.router_bias_update_rate,
        }
        if any(other.values()):
            raise ValueError(
                f"QueryPath covers the connector's own MoE options, not {[k for k, v in other.items() if v]}"
            )
        key = _key(direction)
        self.width = cfg.modalities[src]
        if moe.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"QueryPath has no {moe.hidden_act!r} activation")
        self.act, self.expert_act = _ACTIVATIONS["gelu"], _ACTIVATIONS[moe.hidden_act]  # the connector's own GELUs
        self.glu = moe.expert_type == "glu"
        self.k, self.top_p, self.renormalise = moe.num_experts_per_tok, moe.top_p, moe.norm_topk_prob
        self.in_w = _np(connector.in_proj[src].weight)
        self.in_b = _np(connector.in_proj[src].bias + connector.direction_embed[key])
        self.task = _np(connector.task_embed["contrastive"])
        router = connector.moe.router
        self.router_w = _np(router.weight)
        experts = connector.moe.experts
        self.w_in, self.w_out = _np(experts.w_in), _np(experts.down_proj)
        norm = connector.norm["contrastive"]
        self.norm_w, self.norm_b, self.eps = _np(norm.weight), _np(norm.bias), norm.eps
        head = connector.contrastive_head[key]
        self.head_w, self.head_b = _np(head.weight), _np(head.bias)
        linear = connector.linear[src] if cfg.linear_path else None
        self.linear_w, self.linear_b = (_np(linear.weight), _np(linear.bias)) if linear is not None else (None, None)

    def __call__(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D_src) pooled latents -> (B, d) contrastive queries (not normalised), float32."""
        if pooled.dim() != 2 or pooled.shape[1] != self.width:
            raise ValueError(f"expected pooled latents of shape (B, {self.width}), got {tuple(pooled.shape)}")
        x = pooled.detach().float().cpu().numpy()
        with _BLAS.limit(limits=1, user_api="blas"):
            return torch.from_numpy(np.stack([self._one(row) for row in x]))

    def _route(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Chosen experts and their weights, as :class:`omnimoe.moe.router.Router` chooses them."""
        logits = self.router_w @ h
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[: self.k]
        weight = probs[top]
        if self.top_p > 0:  # the smallest prefix (by probability) whose mass reaches top_p
            p = weight
            keep = (np.cumsum(p) - p) < self.top_p
            keep[0] = True
            weight = weight * keep
        if self.renormalise:
            weight = weight / max(weight.sum(), 1e-20)
        return top, weight

    def _expert(self, e: int, h: np.ndarray) -> np.ndarray:
        z = self.w_in[e] @ h
        if self.glu:
            gate, up = np.split(z, 2)
            z = self.expert_act(gate) * up
        else:
            z = self.expert_act(z)
        return self.w_out[e] @ z

    def _one(self, x: np.ndarray) -> np.ndarray:
        h = self.act(self.in_w @ x + self.in_b) + self.task
        y = np.zeros_like(h)
        for e, w in zip(*self._route(h)):
            if w != 0:
                y += w * self._expert(int(e), h)
        mu = y.mean()
        y = (y - mu) / np.sqrt(((y - mu) ** 2).mean() + self.eps) * self.norm_w + self.norm_b
        query = self.head_w @ (self.act(y) + h) + self.head_b
        if self.linear_w is not None:
            query = query + self.linear_w @ x + self.linear_b
        return query.astype(np.float32)
