"""The sparse Mixture-of-Experts engine: router, experts (backends side by side), dispatch, layer,
upcycling from dense FFNs, and expert parallelism applied from outside the model."""

from omnimoe.moe.config import MoEConfig
from omnimoe.moe.dispatch import DispatchPlan, expert_capacity, plan_dispatch
from omnimoe.moe.experts import ACTIVATIONS, Experts, grouped_mm_supported
from omnimoe.moe.layer import MoELayer, MoEOutput, collect_router_loss, moe_layers, update_expert_bias
from omnimoe.moe.losses import load_balancing_loss, z_loss
from omnimoe.moe.router import Router, RouterOutput

__all__ = [
    "ACTIVATIONS",
    "DispatchPlan",
    "Experts",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "Router",
    "RouterOutput",
    "collect_router_loss",
    "expert_capacity",
    "grouped_mm_supported",
    "load_balancing_loss",
    "moe_layers",
    "plan_dispatch",
    "update_expert_bias",
    "z_loss",
]
