"""Dense baselines for an MoE-LLM: the model an MoE must beat at equal compute.

:func:`dense_equal_active` widens the FFN of the layers :func:`~omnimoe.mllm.moe_llm.moefy` would make
sparse so that each dense FFN holds exactly the parameters one token *uses* in the MoE: ``k`` routed experts
(``k = num_experts_per_tok``) plus the always-on shared experts. Per token it therefore does the same FFN
matmul FLOPs as the MoE (same active parameters), but it has no router, no dispatch and ``E / k`` times
fewer FFN parameters in all. The MoE's router (``E x H`` weights, well under 1% of an expert) has no
counterpart: the dense model has no router parameters. Comparing the two separates what sparsity costs
(routing, dispatch, the extra parameters' optimizer and cast work) from what the FLOPs cost.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from omnimoe.moe import MoELayer
from omnimoe.moe.upcycle import upcycle_from_ffns, upcycle_sliced
from omnimoe.mllm.moe_llm import MoELLMConfig, MoEMLP, decoder_layers, select_layers

# FFN layouts (nn.Linear children), in the order omnimoe.moe.upcycle.read_ffn recognises them.
_LAYOUTS = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"), ("gate_up_proj", "down_proj"), ("fc1", "fc2"))


def moe_active_parameters(layer: MoELayer, include_router: bool = False) -> int:
    """Parameters one token uses in ``layer``: ``k`` routed experts plus the shared experts (plus the
    router's when ``include_router``)."""
    ex = layer.experts
    per_expert = sum(p[0].numel() for p in ex.parameters(recurse=False))
    shared = sum(p.numel() for p in layer.shared_experts.parameters()) if layer.shared_experts is not None else 0
    router = sum(p.numel() for p in layer.router.parameters()) if include_router else 0
    return layer.config.num_experts_per_tok * per_expert + shared + router


def _moe_like_moefy(
    dense: nn.Module, config: MoELLMConfig, ffns: list[nn.Module] | None, generator: torch.Generator | None
) -> MoELayer:
    """The MoE layer moefy would put in place of ``dense`` (same recipe, same expert initialisation)."""
    if ffns:
        return upcycle_from_ffns(
            ffns, noise_std=config.noise_std, generator=generator, **{**config.routing(), "num_experts": len(ffns)}
        )
    if config.init == "sliced":
        return upcycle_sliced(
            dense, config.num_experts, **{k: v for k, v in config.routing().items() if k != "num_experts"}
        )
    return upcycle_from_ffns([dense], noise_std=config.noise_std, generator=generator, copies=True, **config.routing())


@torch.no_grad()
def _wide_weights(layer: MoELayer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(w_in, b_in, w_down, b_down) of one FFN that is the first k experts side by side (down scaled by
    1/k: their mean) plus the shared experts (unscaled, as the MoE adds them); w_in is [gate; up] for GLU."""
    k, ex, sh = layer.config.num_experts_per_tok, layer.experts, layer.shared_experts
    glu = ex.expert_type == "glu"
    parts = [(ex.w_in[e], None if ex.b_in is None else ex.b_in[e], ex.down_proj[e] / k) for e in range(k)]
    if sh is not None:
        parts.append((sh.w_in[0], None if sh.b_in is None else sh.b_in[0], sh.down_proj[0]))

    def halves(w: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (w, None) if w is None or not glu else tuple(w.chunk(2, dim=0))  # type: ignore[return-value]

    gates, ups = zip(*(halves(w) for w, _, _ in parts))
    w_in = torch.cat(list(gates) + (list(ups) if glu else []))
    b_in = None
    if ex.b_in is not None:
        b_gates, b_ups = zip(*(halves(b) for _, b, _ in parts))
        b_in = torch.cat(list(b_gates) + (list(b_ups) if glu else []))
    w_down = torch.cat([d for _, _, d in parts], dim=1)
    b_down = None
    if ex.down_proj_bias is not None:
        b_down = ex.down_proj_bias[:k].mean(0) + (sh.down_proj_bias[0] if sh is not None else 0)
    return w_in, b_in, w_down, b_down


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    ref = like.weight
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=like.bias is not None, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if lin.bias is not None:
            lin.bias.copy_(bias if bias is not None else torch.zeros(weight.shape[0]))
    return lin


def _widened(
    mlp: nn.Module, w_in: torch.Tensor, b_in: torch.Tensor | None, w_down: torch.Tensor, b_down: torch.Tensor | None
) -> nn.Module:
    """A module of ``mlp``'s own class, activation and layout whose Linear children carry these weights."""
    children = dict(mlp.named_children())
    layout = next((names for names in _LAYOUTS if all(isinstance(children.get(n), nn.Linear) for n in names)), None)
    if layout is None:
        raise ValueError(f"{type(mlp).__name__}: no FFN layout among {_LAYOUTS}; found {sorted(children)}")
    width = w_down.shape[1]
    if len(layout) == 3:  # separate gate and up projections
        gate, up, down = (children[n] for n in layout)
        b_gate, b_up = (None, None) if b_in is None else b_in.chunk(2)
        new = {layout[0]: _linear(w_in[:width], b_gate, gate), layout[1]: _linear(w_in[width:], b_up, up)}
    else:  # fused [gate; up] (Phi-3) or a plain fc1/fc2 MLP
        down = children[layout[1]]
        new = {layout[0]: _linear(w_in, b_in, children[layout[0]])}
    new[layout[-1]] = _linear(w_down, b_down, down)
    # Deep-copy everything else (activation, dropout, flags); share the model config, take the new Linears.
    memo = {id(children[name]): lin for name, lin in new.items()}
    if hasattr(mlp, "config"):
        memo[id(mlp.config)] = mlp.config
    wide = copy.deepcopy(mlp, memo)
    if isinstance(getattr(wide, "intermediate_size", None), int):
        wide.intermediate_size = width
    return wide


def dense_equal_active(
    llm: nn.Module,
    config: MoELLMConfig,
    ffns: dict[int, list[nn.Module]] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """In place: the FFN of every layer :func:`moefy` would choose becomes a dense FFN with the MoE's active
    parameters (see the module docstring); returns the layer indices.

    The new FFN is the MoE's first ``k`` experts side by side along the intermediate dimension (width
    ``k * F``, plus ``num_shared_experts * F`` for the shared experts), with each routed expert's down
    projection scaled by 1/k. Its experts start as moefy's would: from ``ffns[i]`` (the first k used), else
    k copies of the layer's own FFN (``noise_std`` applies as in moefy), else, with ``init="sliced"``, the
    FFN's first k slices. At init it thus computes the mean of those k FFNs, which with copies is exactly
    the original FFN, plus the shared experts (initialised as omnimoe.moe initialises them). The module keeps
    the original FFN's class, activation and layout (e.g. a ``LlamaMLP`` with wider ``nn.Linear`` children
    and ``intermediate_size`` updated); the model config is left as it is, so save such a model with
    ``torch.save``/safetensors, not by ``from_pretrained`` of its config.
    """
    blocks = decoder_layers(llm)
    chosen = select_layers(config.layers, len(blocks))
    k = config.num_experts_per_tok
    for i in chosen:
        mlp = blocks[i].mlp
        if isinstance(mlp, MoEMLP):
            raise ValueError(f"layer {i} already has an MoE")
        sources = (ffns or {}).get(i)
        if sources is not None and len(sources) < k:
            raise ValueError(f"layer {i}: {len(sources)} FFNs given, num_experts_per_tok={k} needs at least {k}")
        layer = _moe_like_moefy(mlp, config, sources, generator)
        blocks[i].mlp = _widened(mlp, *_wide_weights(layer))
    return chosen


__all__ = ["dense_equal_active", "moe_active_parameters"]
