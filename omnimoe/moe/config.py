"""``MoEConfig``: every knob of a sparse MoE layer, named as in Hugging Face transformers where a name exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

ScoreFunc = Literal["softmax", "sigmoid"]
ExpertType = Literal["glu", "mlp"]
Backend = Literal["auto", "grouped_mm", "loop", "dense"]


@dataclass
class MoEConfig:
    """Configuration of one :class:`~omnimoe.moe.layer.MoELayer`.

    Routing recipes as combinations of these fields:

    * Mixtral / Uni-MoE v1 (softmax over the chosen k logits): ``score_func="softmax", norm_topk_prob=True``
      (softmax over all experts followed by renormalising the top k is the same function).
    * Alt-MoE / M3-JEPA connector: ``score_func="softmax", norm_topk_prob=False, expert_type="mlp",
      hidden_act="gelu"``.
    * Uni-MoE-2.0 dynamic capacity: ``top_p=0.7`` with ``num_shared_experts`` and ``num_null_experts``.
    * DeepSeek-V3 style: ``score_func="sigmoid", norm_topk_prob=True, router_bias_update_rate=1e-3``.
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int = 8
    num_experts_per_tok: int = 2
    # Expert MLP: "glu" = act(x W_gate) * (x W_up) then W_down (SwiGLU with silu); "mlp" = W_down act(x W_up).
    expert_type: ExpertType = "glu"
    hidden_act: str = "silu"
    expert_bias: bool = False
    expert_dropout: float = 0.0
    # Router.
    score_func: ScoreFunc = "softmax"
    norm_topk_prob: bool = True
    top_p: float = 0.0  # > 0: smallest set of experts (at most num_experts_per_tok) whose probability reaches top_p
    router_jitter_noise: float = 0.0  # multiplicative U(1-eps, 1+eps) noise on router inputs while training
    router_bias: bool = False
    router_aux_loss_coef: float = 0.0  # Switch/GShard load-balance loss weight (HF convention: k at balance)
    router_z_loss_coef: float = 0.0  # ST-MoE z-loss weight
    router_bias_update_rate: float = 0.0  # > 0: aux-loss-free balancing (expert bias nudged after each step)
    # Extra experts.
    num_shared_experts: int = 0  # always-on experts, fused into one MLP of width num_shared * shared_size
    shared_intermediate_size: Optional[int] = None  # default: intermediate_size
    num_null_experts: int = 0  # routable experts with zero output: a token routed there skips compute
    # Capacity: None = dropless. Else each expert takes at most ceil(cf * tokens * k / num_experts) tokens.
    capacity_factor: Optional[float] = None
    # Expert compute backend; "auto" = grouped_mm when the shapes allow it, else loop.
    backend: Backend = "auto"
    # The routed experts' weights: "float32" (under bf16 autocast they are cast at every forward), or
    # "bfloat16" (pure-bf16 weights: no cast, half the memory; train them with omnimoe.runtime.adamw, which
    # keeps float32 master copies and optimizer state for them).
    expert_dtype: str = "float32"

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"MoEConfig: {msg}")

        if self.hidden_size <= 0 or self.intermediate_size <= 0:
            bad(f"hidden_size and intermediate_size must be positive, got {self.hidden_size}, {self.intermediate_size}")
        if self.num_experts < 1:
            bad(f"num_experts must be >= 1, got {self.num_experts}")
        if self.num_null_experts < 0 or self.num_shared_experts < 0:
            bad("num_null_experts and num_shared_experts must be >= 0")
        if not 1 <= self.num_experts_per_tok <= self.num_routed_slots:
            bad(
                f"num_experts_per_tok must be in [1, num_experts + num_null_experts = {self.num_routed_slots}], "
                f"got {self.num_experts_per_tok}"
            )
        if not 0.0 <= self.top_p <= 1.0:
            bad(f"top_p must be in [0, 1], got {self.top_p}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            bad(f"capacity_factor must be positive or None, got {self.capacity_factor}")
        if not 0.0 <= self.expert_dropout < 1.0:
            bad(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        if self.expert_dtype not in ("float32", "bfloat16"):
            bad(f"expert_dtype must be 'float32' or 'bfloat16', got {self.expert_dtype!r}")
        if self.router_jitter_noise < 0:
            bad(f"router_jitter_noise must be >= 0, got {self.router_jitter_noise}")
        from omnimoe.moe.experts import ACTIVATIONS  # local import: config stays importable on its own

        if self.hidden_act not in ACTIVATIONS:
            bad(f"hidden_act {self.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")

    @property
    def num_routed_slots(self) -> int:
        """Router outputs: real experts followed by null experts."""
        return self.num_experts + self.num_null_experts

    @property
    def shared_size(self) -> int:
        return self.num_shared_experts * (self.shared_intermediate_size or self.intermediate_size)
