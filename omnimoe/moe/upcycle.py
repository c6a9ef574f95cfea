"""Upcycling: build an MoE layer from dense FFN modules.

Three recipes:

* :func:`upcycle_from_dense`: every expert a copy of one FFN (optionally with small noise), the sparse
  upcycling of Komatsuzaki et al. used by MoE-LLaVA. With ``norm_topk_prob=True`` (or k = E) and no noise the
  layer computes exactly the dense FFN.
* :func:`upcycle_from_ffns`: one FFN per expert, e.g. Uni-MoE's stage-2 modality-specific FFNs (duplicates
  allowed).
* :func:`upcycle_sliced`: the FFN's intermediate dimension cut into ``num_experts`` fine-grained experts
  (Uni-MoE-2.0); the sum of all experts is the dense FFN.

Recognised FFN layouts (``nn.Linear`` children): ``gate_proj/up_proj/down_proj`` (Llama, Qwen, Mistral,
Gemma), ``w1/w3/w2`` (Mixtral experts), fused ``gate_up_proj/down_proj`` (Phi-3), ``fc1/fc2`` (ViT,
Whisper, CLIP and GELU-MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from omnimoe.moe.config import MoEConfig
from omnimoe.moe.layer import MoELayer


@dataclass
class DenseFFN:
    """The weights of one dense FFN in our layout (``w_in`` is ``[gate; up]`` for GLU)."""

    expert_type: str
    w_in: torch.Tensor  # (F or 2F, H)
    b_in: torch.Tensor | None
    w_down: torch.Tensor  # (H, F)
    b_down: torch.Tensor | None
    hidden_act: str | None

    @property
    def hidden_size(self) -> int:
        return self.w_down.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.w_down.shape[1]


def _activation_name(ffn: nn.Module) -> str | None:
    cfg = getattr(ffn, "config", None)
    for attr in ("hidden_activation", "hidden_act", "activation_function"):
        name = getattr(cfg, attr, None) if cfg is not None else None
        if isinstance(name, str):
            return name
    for attr in ("act_fn", "activation_fn", "act"):
        mod = getattr(ffn, attr, None)
        if mod is None:
            continue
        if isinstance(mod, nn.GELU):
            return "gelu_pytorch_tanh" if mod.approximate == "tanh" else "gelu"
        cls = type(mod).__name__.lower()
        for key, name in (
            ("tanh", "gelu_pytorch_tanh"),
            ("gelu", "gelu"),
            ("silu", "silu"),
            ("swish", "silu"),
            ("relu", "relu"),
        ):
            if key in cls:
                return name
    return None


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach()


def read_ffn(ffn: nn.Module) -> DenseFFN:
    """Extract the weights of a dense FFN module (see the module docstring for the layouts)."""
    act = _activation_name(ffn)
    names = dict(ffn.named_children())

    def lin(*keys: str) -> list[nn.Linear] | None:
        mods = [names.get(k) for k in keys]
        return mods if all(isinstance(m, nn.Linear) for m in mods) else None

    for keys in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
        found = lin(*keys)
        if found:
            gate, up, down = found
            b_in = None
            if gate.bias is not None or up.bias is not None:
                zeros = torch.zeros(gate.out_features)
                b_in = torch.cat(
                    [_bias(gate) if gate.bias is not None else zeros, _bias(up) if up.bias is not None else zeros]
                )
            w_in = torch.cat([gate.weight.detach(), up.weight.detach()])
            return DenseFFN("glu", w_in, b_in, down.weight.detach(), _bias(down), act)
    found = lin("gate_up_proj", "down_proj")
    if found:
        return DenseFFN(
            "glu", found[0].weight.detach(), _bias(found[0]), found[1].weight.detach(), _bias(found[1]), act
        )
    found = lin("fc1", "fc2")
    if found:
        return DenseFFN(
            "mlp", found[0].weight.detach(), _bias(found[0]), found[1].weight.detach(), _bias(found[1]), act
        )
    raise ValueError(
        f"cannot upcycle {type(ffn).__name__}: expected nn.Linear children gate_proj/up_proj/down_proj, w1/w3/w2, "
        f"gate_up_proj/down_proj or fc1/fc2; found {sorted(names)}"
    )


def _config_for(dense: DenseFFN, config: MoEConfig | None, overrides: dict[str, Any], intermediate: int) -> MoEConfig:
    act = overrides.pop("hidden_act", None) or dense.hidden_act or (config.hidden_act if config else None)
    if act is None:
        raise ValueError("cannot tell the FFN's activation: pass hidden_act='silu' (or gelu, gelu_pytorch_tanh, ...)")
    fields = dict(
        hidden_size=dense.hidden_size,
        intermediate_size=intermediate,
        expert_type=dense.expert_type,
        hidden_act=act,
        expert_bias=dense.b_in is not None or dense.b_down is not None,
    )
    base = config if config is not None else MoEConfig(**fields)
    return replace(base, **fields, **overrides)


@torch.no_grad()
def _load_expert(
    layer: MoELayer, e: int, dense: DenseFFN, rows: slice | None = None, down_bias_scale: float = 1.0
) -> None:
    ex = layer.experts
    f = ex.intermediate_size
    if rows is None:
        w_in, b_in, w_down = dense.w_in, dense.b_in, dense.w_down
    else:  # fine-grained slice of the intermediate dimension
        full_f = dense.intermediate_size
        pick = torch.arange(full_f)[rows]
        if dense.expert_type == "glu":
            pick_in = torch.cat([pick, pick + full_f])
        else:
            pick_in = pick
        w_in = dense.w_in[pick_in]
        b_in = dense.b_in[pick_in] if dense.b_in is not None else None
        w_down = dense.w_down[:, pick]
    if w_in.shape != ex.w_in.shape[1:] or w_down.shape != (ex.hidden_size, f):
        raise ValueError(f"expert {e}: FFN weights {tuple(w_in.shape)}/{tuple(w_down.shape)} do not fit the layer")
    ex.w_in[e].copy_(w_in)
    ex.down_proj[e].copy_(w_down)
    if ex.b_in is not None:
        ex.b_in[e].copy_(b_in if b_in is not None else torch.zeros_like(ex.b_in[e]))
    if ex.down_proj_bias is not None:
        b = dense.b_down if dense.b_down is not None else torch.zeros_like(ex.down_proj_bias[e])
        ex.down_proj_bias[e].copy_(b * down_bias_scale)


def upcycle_from_dense(
    ffn: nn.Module,
    config: MoEConfig | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    **overrides: Any,
) -> MoELayer:
    """Every expert a copy of ``ffn``; ``noise_std`` adds Gaussian noise scaled by each weight's std.

    Sizes, expert type and activation come from ``ffn``; routing options from ``config`` and ``overrides``
    (e.g. ``num_experts=8, num_experts_per_tok=2``).
    """
    return upcycle_from_ffns([ffn], config, noise_std=noise_std, generator=generator, copies=True, **overrides)


def upcycle_from_ffns(
    ffns: list[nn.Module],
    config: MoEConfig | None = None,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
    copies: bool = False,
    **overrides: Any,
) -> MoELayer:
    """Expert ``e`` initialised from ``ffns[e]`` (all FFNs must have the same shapes and activation).

    With ``copies=True`` a single FFN is copied into ``num_experts`` experts.
    """
    if not ffns:
        raise ValueError("upcycle_from_ffns needs at least one FFN")
    dense = [read_ffn(f) for f in ffns]
    first = dense[0]
    for i, d in enumerate(dense[1:], 1):
        if (
            d.w_in.shape != first.w_in.shape
            or d.w_down.shape != first.w_down.shape
            or d.expert_type != first.expert_type
        ):
            raise ValueError(
                f"FFN {i} has shapes {tuple(d.w_in.shape)}/{tuple(d.w_down.shape)}, FFN 0 has {tuple(first.w_in.shape)}/{tuple(first.w_down.shape)}"
            )
        if d.hidden_act != first.hidden_act:
            raise ValueError(f"FFN {i} uses {d.hidden_act!r}, FFN 0 uses {first.hidden_act!r}")
    if not copies:
        overrides.setdefault("num_experts", len(dense))
    cfg = _config_for(first, config, overrides, first.intermediate_size)
    if not copies and cfg.num_experts != len(dense):
        raise ValueError(f"{len(dense)} FFNs given for num_experts={cfg.num_experts}")
    layer = MoELayer(cfg)
    for e in range(cfg.num_experts):
        _load_expert(layer, e, first if copies else dense[e])
    if noise_std > 0:
        with torch.no_grad():
            for p in (layer.experts.w_in, layer.experts.down_proj):
                for e in range(cfg.num_experts):
                    noise = torch.randn(p[e].shape, generator=generator, dtype=p.dtype)
                    p[e].add_(noise * (noise_std * p[e].std()))
    return layer


def upcycle_sliced(ffn: nn.Module, num_experts: int, config: MoEConfig | None = None, **overrides: Any) -> MoELayer:
    """Cut ``ffn``'s intermediate dimension into ``num_experts`` equal fine-grained experts.

    Summed over all experts (each with weight 1) the experts compute exactly ``ffn`` (a down-projection
    bias is split evenly between them).
    """
    dense = read_ffn(ffn)
    if dense.intermediate_size % num_experts:
        raise ValueError(f"intermediate size {dense.intermediate_size} is not divisible by num_experts={num_experts}")
    size = dense.intermediate_size // num_experts
    overrides["num_experts"] = num_experts
    overrides.setdefault("num_experts_per_tok", min(2, num_experts))
    cfg = _config_for(dense, config, overrides, size)
    layer = MoELayer(cfg)
    for e in range(num_experts):
        _load_expert(layer, e, dense, rows=slice(e * size, (e + 1) * size), down_bias_scale=1.0 / num_experts)
    return layer
