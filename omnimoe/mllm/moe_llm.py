"""Turning a Hugging Face causal LM into an MoE-LLM: the FFN of chosen decoder layers becomes an
``omnimoe.moe`` layer, upcycled from that FFN (copies, optionally with noise; or sliced), or built from a
list of FFNs (Uni-MoE stage 3: the stage-2 modality FFNs plus the base FFN).

Works for decoder stacks that keep their layers in a ``ModuleList`` of blocks with an ``mlp`` child (Llama,
Qwen2/3, Gemma/Gemma3, Mistral, Phi-3, ...). The MoE sees the padding mask (``set_token_mask``) so padded
positions are not routed and do not count in the balance loss; ``router_loss(model)`` is the sum of the
layers' weighted aux + z losses of the last forward, to be added to the LM loss.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from omnimoe.config import check_ranges
from omnimoe.moe import MoEConfig, MoELayer
from omnimoe.moe.layer import MoEOutput
from omnimoe.moe.upcycle import read_ffn, upcycle_from_ffns, upcycle_sliced


@dataclass
class MoELLMConfig:
    """Where the MoE goes and how it routes (HF names). ``layers``: "all", "every:N" (layers 0, N, 2N, ...),
    "every:N:1" (layers 1, 1+N, ...) or a comma list of indices ("0,5,11"); negative indices count from the end."""

    layers: str | int | list[int] = "all"  # normalised to a string ("3", [0, 5] -> "0,5")
    num_experts: int = 4
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # Mixtral / Uni-MoE v1: softmax over the chosen k
    num_shared_experts: int = 0
    num_null_experts: int = 0
    top_p: float = 0.0
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    router_jitter_noise: float = 0.0
    capacity_factor: float | None = None
    init: str = "copy"  # copy: every expert = the dense FFN (+ noise_std); sliced: the FFN cut into experts
    noise_std: float = 0.0
    backend: str = "auto"
    expert_dtype: str = "float32"  # bfloat16: pure-bf16 expert weights (omnimoe.moe.MoEConfig.expert_dtype)

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            self.layers = str(self.layers)
        elif isinstance(self.layers, (list, tuple)):
            self.layers = ",".join(str(int(i)) for i in self.layers)
        if self.init not in ("copy", "sliced"):
            raise ValueError(f"init {self.init!r}: choose 'copy' or 'sliced'")
        check_ranges(
            self,
            {
                "num_experts": "[1, inf)",
                "num_experts_per_tok": "[1, inf)",
                "num_shared_experts": "[0, inf)",
                "num_null_experts": "[0, inf)",
                "top_p": "[0, 1]",
                "router_aux_loss_coef": "[0, inf)",
                "router_z_loss_coef": "[0, inf)",
                "router_jitter_noise": "[0, inf)",
                "capacity_factor": "(0, inf)",
                "noise_std": "[0, inf)",
            },
        )

    def routing(self) -> dict[str, Any]:
        """The MoEConfig fields this config sets."""
        names = {f.name for f in fields(MoEConfig)}
        return {
            k: getattr(self, k)
            for k in (
                "num_experts",
                "num_experts_per_tok",
                "norm_topk_prob",
                "num_shared_experts",
                "num_null_experts",
                "top_p",
                "router_aux_loss_coef",
                "router_z_loss_coef",
                "router_jitter_noise",
                "capacity_factor",
                "backend",
                "expert_dtype",
            )
            if k in names
        }


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM: the first ModuleList whose blocks all have an ``mlp`` child."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(block, "mlp") for block in module):
            return module
    raise ValueError(
        f"{type(model).__name__}: found no list of decoder blocks with an 'mlp' child (Llama/Qwen/Gemma/Mistral layout)"
    )


def select_layers(spec: str, n: int) -> list[int]:
    """Indices named by ``spec`` (see :class:`MoELLMConfig`) among ``n`` layers, sorted and unique."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n))
    if spec.startswith("every:"):
        parts = spec.split(":")
        try:
            step, start = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        except (ValueError, IndexError):
            raise ValueError(f"layers {spec!r}: expected every:N or every:N:START") from None
        if step < 1:
            raise ValueError(f"layers {spec!r}: N must be at least 1")
        return list(range(start, n, step))
    try:
        picked = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"layers {spec!r}: expected 'all', 'every:N' or a comma list of integers") from None
    bad = [i for i in picked if not -n <= i < n]
    if bad or not picked:
        raise ValueError(f"layers {spec!r}: indices {bad or picked} outside a model of {n} layers")
    return sorted({i % n for i in picked})


class MoEMLP(nn.Module):
    """Drop-in for a decoder block's ``mlp``: an MoE layer that takes and returns hidden states, keeping
    its last :class:`MoEOutput` (router loss, load) and reading the padding mask set on it."""

    def __init__(self, moe: MoELayer) -> None:
        super().__init__()
        self.moe = moe
        self.token_mask: torch.Tensor | None = None
        self.last: MoEOutput | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if (
            mask is not None
            and hidden_states.dim() == 3
            and mask.shape[0] == hidden_states.shape[0]
            and mask.shape[1] >= hidden_states.shape[1]
        ):
            mask = mask[:, -hidden_states.shape[1] :]  # under a KV cache only the newest positions come through
        else:
            mask = None
        out = self.moe(hidden_states, attention_mask=mask)
        self.last = out
        return out.hidden_states.to(hidden_states.dtype)


def moe_mlps(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def moefy(
    model: nn.Module,
    config: MoELLMConfig,
    ffns: dict[int, list[nn.Module]] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Replace the FFN of the chosen layers by MoE layers, in place; returns the layer indices.

    ``ffns``: for a layer index, the FFN modules its experts start from (one per expert, e.g. Uni-MoE's
    stage-2 FFNs plus the base one); other layers are upcycled from their own FFN by ``config.init``.
    """
    blocks = decoder_layers(model)
    chosen = select_layers(config.layers, len(blocks))
    for i in chosen:
        block = blocks[i]
        if isinstance(block.mlp, MoEMLP):
            raise ValueError(f"layer {i} already has an MoE")
        dense = block.mlp
        if ffns and i in ffns:
            layer = upcycle_from_ffns(
                ffns[i],
                noise_std=config.noise_std,
                generator=generator,
                **{**config.routing(), "num_experts": len(ffns[i])},
            )
        elif config.init == "sliced":
            layer = upcycle_sliced(
                dense, config.num_experts, **{k: v for k, v in config.routing().items() if k != "num_experts"}
            )
        else:
            layer = upcycle_from_ffns(
                [dense], noise_std=config.noise_std, generator=generator, copies=True, **config.routing()
            )
        ref = next(dense.parameters())
        block.mlp = MoEMLP(layer.to(device=ref.device, dtype=ref.dtype).keep_expert_dtype())
    return chosen


def empty_moe(model: nn.Module, config: MoELLMConfig, experts: dict[int, int] | None = None) -> list[int]:
    """The structure of :func:`moefy` without copying weights (for loading a saved MoE-LLM): every chosen
    FFN becomes an MoE of the FFN's shapes; ``experts`` gives per-layer expert counts where they differ."""
    blocks = decoder_layers(model)
    chosen = select_layers(config.layers, len(blocks))
    for i in chosen:
        dense = read_ffn(blocks[i].mlp)
        intermediate = (
            dense.intermediate_size // config.num_experts if config.init == "sliced" else dense.intermediate_size
        )
        routing = {**config.routing(), "num_experts": (experts or {}).get(i, config.num_experts)}
        cfg = MoEConfig(
            hidden_size=dense.hidden_size,
            intermediate_size=intermediate,
            expert_type=dense.expert_type,  # type: ignore[arg-type]
            hidden_act=dense.hidden_act or "silu",
            expert_bias=dense.b_in is not None or dense.b_down is not None,
            **routing,
        )
        ref = next(blocks[i].mlp.parameters())
        blocks[i].mlp = MoEMLP(MoELayer(cfg).to(device=ref.device, dtype=ref.dtype).keep_expert_dtype())
    return chosen


def set_token_mask(model: nn.Module, mask: torch.Tensor | None) -> None:
    """Tell every MoE which positions are real tokens (``attention_mask``), or None for all."""
    for m in moe_mlps(model):
        m.token_mask = None if mask is None else mask.bool()


def router_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the MoE layers' weighted router losses from the last forward (0 when there is none)."""
    losses = [m.last.router_loss for m in moe_mlps(model) if m.last is not None]
    return torch.stack(losses).sum() if losses else torch.zeros(())


def expert_load(model: nn.Module) -> dict[int, torch.Tensor]:
    """Tokens per expert in the last forward, per decoder layer index."""
    blocks = decoder_layers(model)
    return {
        i: b.mlp.last.tokens_per_expert
        for i, b in enumerate(blocks)
        if isinstance(b.mlp, MoEMLP) and b.mlp.last is not None
    }
