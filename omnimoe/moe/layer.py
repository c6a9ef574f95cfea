"""``MoELayer``: router -> dispatch -> experts -> combine, plus shared experts and router losses.

Read top to bottom, :meth:`MoELayer.forward` is the whole algorithm. Parallelism is applied from outside
(:func:`omnimoe.moe.parallel.parallelize_experts` swaps ``layer.experts`` for a sharded version).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from omnimoe.config import from_dict
from omnimoe.io import load_pretrained, save_pretrained
from omnimoe.moe.config import MoEConfig
from omnimoe.moe.dispatch import expert_capacity, plan_dispatch
from omnimoe.moe.experts import Experts, compute_dtype
from omnimoe.moe.losses import load_balancing_loss, z_loss
from omnimoe.moe.router import Router


@dataclass
class MoEOutput:
    hidden_states: torch.Tensor  # same shape as the input
    aux_loss: torch.Tensor  # unweighted load-balance loss (k at perfect balance)
    z_loss: torch.Tensor  # unweighted router z-loss
    router_loss: torch.Tensor  # router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss: add to your loss
    router_logits: torch.Tensor  # (tokens, experts + null experts), fp32
    tokens_per_expert: torch.Tensor  # (num_experts,) int64 assignments computed per expert
    dropped_tokens: int  # assignments dropped by the capacity limit


class MoELayer(nn.Module):
    """A sparse mixture-of-experts FFN: ``(..., H) -> (..., H)``.

    ``attention_mask`` (same leading shape as the input, 1 = real token) removes padding from routing,
    compute and losses; padded positions come out as zeros.
    """

    model_type = "omnimoe-moe-layer"

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = self._make_experts(config.num_experts, config.intermediate_size)
        self.shared_experts = self._make_experts(1, config.shared_size) if config.num_shared_experts else None
        self.register_buffer("_load_since_update", torch.zeros(config.num_experts), persistent=False)
        self.keep_expert_dtype()

    def keep_expert_dtype(self) -> MoELayer:
        """Put the routed experts back in ``config.expert_dtype`` (after a ``.to(dtype)`` of the whole model)."""
        self.experts.to(getattr(torch, self.config.expert_dtype))
        return self

    def _make_experts(self, n: int, size: int) -> Experts:
        c = self.config
        backend = "auto" if c.backend == "dense" else c.backend
        return Experts(n, c.hidden_size, size, c.expert_type, c.hidden_act, c.expert_bias, c.expert_dropout, backend)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.config
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, cfg.hidden_size)
        num_tokens = x.shape[0]
        valid = None
        if attention_mask is not None:
            if attention_mask.shape != shape[:-1]:
                raise ValueError(
                    f"attention_mask shape {tuple(attention_mask.shape)} != input shape {tuple(shape[:-1])}"
                )
            valid = attention_mask.reshape(-1).bool()

        # 1. Route (fp32).
        routing = self.router(x)
        capacity = None
        if cfg.capacity_factor is not None:
            n_valid = num_tokens if valid is None else int(valid.sum())
            capacity = expert_capacity(cfg.capacity_factor, n_valid, cfg.num_experts_per_tok, cfg.num_experts)

        # 2. Dispatch: rows sorted by expert, without null experts, unused top-p slots, padding, overflow.
        plan = plan_dispatch(routing.topk_idx, routing.topk_weight, routing.topk_mask, cfg.num_experts, valid, capacity)

        # 3. Experts, 4. combine (weighted sum back into token order).
        if cfg.backend == "dense":
            every = self.experts.forward_dense(x)  # (E, T, H)
            combine = plan.combine_matrix(num_tokens, cfg.num_experts).to(every.dtype)
            y = torch.einsum("eth,te->th", every, combine)
        else:
            # Cast before gathering: the gather (and its backward scatter) then moves half the bytes under bf16.
            rows = self.experts(x.to(compute_dtype(x))[plan.token_idx], plan.counts)
            y = rows.new_zeros(num_tokens, cfg.hidden_size)
            y.index_add_(0, plan.token_idx, rows * plan.weight[:, None].to(rows.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(x, [num_tokens]).to(y.dtype)
        if valid is not None:
            y = y * valid[:, None].to(y.dtype)

        # Router losses and load statistics.
        aux = load_balancing_loss(routing.probs, routing.topk_idx, routing.topk_mask, valid)
        zl = z_loss(routing.logits, valid)
        if self.training and cfg.router_bias_update_rate > 0:
            self._load_since_update += plan.tokens_per_expert.to(self._load_since_update.dtype)
        return MoEOutput(
            hidden_states=y.reshape(shape),
            aux_loss=aux,
            z_loss=zl,
            router_loss=cfg.router_aux_loss_coef * aux + cfg.router_z_loss_coef * zl,
            router_logits=routing.logits,
            tokens_per_expert=plan.tokens_per_expert,
            dropped_tokens=plan.dropped,
        )

    @torch.no_grad()
    def update_expert_bias(self, group: dist.ProcessGroup | None = None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

        Call after each optimizer step (:func:`update_expert_bias` does it for a whole model). Loads are
        summed over ``group`` when torch.distributed is initialised, so every rank applies the same update.
        """
        rate = self.config.router_bias_update_rate
        if rate <= 0:
            return
        load = self._load_since_update.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load, group=group)
        if load.sum() > 0:
            e = self.config.num_experts
            self.router.expert_bias[:e] += rate * torch.sign(load.mean() - load)
        self._load_since_update.zero_()

    # Hugging Face-style persistence.
    def save_pretrained(self, folder: str | Path) -> Path:
        return save_pretrained(folder, self.model_type, dataclasses.asdict(self.config), self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path, **overrides) -> "MoELayer":
        config, state = load_pretrained(folder, cls.model_type)
        layer = cls(from_dict(MoEConfig, {**config, **overrides}))
        layer.load_state_dict(state)
        return layer


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def update_expert_bias(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Apply :meth:`MoELayer.update_expert_bias` to every MoE layer of ``model``."""
    for layer in moe_layers(model):
        layer.update_expert_bias(group)


def collect_router_loss(outputs: list[MoEOutput]) -> torch.Tensor:
    """Sum of the weighted router losses of several layers' outputs."""
    return torch.stack([o.router_loss for o in outputs]).sum()


__all__ = ["MoELayer", "MoEOutput", "moe_layers", "update_expert_bias", "collect_router_loss"]
