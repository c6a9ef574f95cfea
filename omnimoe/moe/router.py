"""The router: scores every routable slot (experts, then null experts) and picks each token's experts.

Routing always runs in fp32, also under autocast: small logit differences decide top-k, and bf16 would
flip choices between backends and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.moe.config import MoEConfig


@dataclass
class RouterOutput:
    logits: torch.Tensor  # (T, S) fp32 router logits over S = experts + null experts
    probs: torch.Tensor  # (T, S) fp32 per-token distribution over slots (used by the balance loss)
    topk_idx: torch.Tensor  # (T, k) int64 chosen slots, best first
    topk_weight: torch.Tensor  # (T, k) fp32 gate weights (0 where unused)
    topk_mask: torch.Tensor  # (T, k) bool: slot used (top-p may use fewer than k)


class Router(nn.Module):
    """Linear gate + scoring + selection. Selection options: top-k, top-p, expert bias, jitter."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        slots = config.num_routed_slots
        self.weight = nn.Parameter(torch.empty(slots, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(slots)) if config.router_bias else None
        # Aux-loss-free balancing (DeepSeek-V3): a bias that only affects which experts are chosen.
        self.register_buffer("expert_bias", torch.zeros(slots), persistent=True)
        nn.init.normal_(self.weight, std=config.hidden_size**-0.5)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        cfg = self.config
        if self.training and cfg.router_jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - cfg.router_jitter_noise, 1.0 + cfg.router_jitter_noise)
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            logits = F.linear(x.float(), self.weight.float(), bias)
            if cfg.score_func == "softmax":
                scores = logits.softmax(dim=-1)
                probs = scores
            else:
                scores = logits.sigmoid()
                probs = scores / scores.sum(dim=-1, keepdim=True)
            return self.select(logits, scores, probs)

    def select(self, logits: torch.Tensor, scores: torch.Tensor, probs: torch.Tensor) -> RouterOutput:
        cfg = self.config
        k = cfg.num_experts_per_tok
        choice = scores + self.expert_bias if cfg.router_bias_update_rate > 0 else scores
        _, topk_idx = torch.topk(choice, k, dim=-1, sorted=True)
        topk_weight = scores.gather(-1, topk_idx)
        topk_mask = torch.ones_like(topk_idx, dtype=torch.bool)
        if cfg.top_p > 0:
            # Keep the smallest prefix (in order of probability) whose probability mass reaches top_p.
            p = probs.gather(-1, topk_idx)
            p, order = p.sort(dim=-1, descending=True)
            topk_idx, topk_weight = topk_idx.gather(-1, order), topk_weight.gather(-1, order)
            mass_before = p.cumsum(-1) - p
            topk_mask = mass_before < cfg.top_p
            topk_mask[:, 0] = True
            topk_weight = topk_weight * topk_mask
        if cfg.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True).clamp(min=1e-20)
        return RouterOutput(logits, probs, topk_idx, topk_weight, topk_mask)
