"""Stacked expert weights (Hugging Face v5 layout) and the backends that compute them.

Layout, weights stored as ``[expert, out_features, in_features]`` (``y = x @ W[e].T``):

* ``expert_type="glu"``: ``gate_up_proj [E, 2F, H]`` (gate rows first, then up rows), ``down_proj [E, H, F]``;
  ``y = down(act(gate(x)) * up(x))`` (SwiGLU when ``hidden_act="silu"``).
* ``expert_type="mlp"``: ``up_proj [E, F, H]``, ``down_proj [E, H, F]``; ``y = down(act(up(x)))`` (the
  Alt-MoE expert with ``hidden_act="gelu"``; dropout after the activation and after ``down``).

Backends (all take tokens already sorted by expert plus per-expert counts, except ``dense``):

* ``grouped_mm``: one ``torch.nn.functional.grouped_mm`` per projection over all experts. Needs rows whose
  byte strides are multiples of 16 (``H`` and ``F`` multiples of 4 in fp32, 8 in bf16), fp32/bf16 on CPU,
  bf16 on CUDA.
* ``loop``: weights unbound once per call, one matmul per expert with tokens. Works for any shape/dtype.
  (Indexing ``w[e]`` inside the loop instead would make autograd allocate a full ``[E, ...]`` zero gradient
  per expert; ``unbind`` produces one stacked gradient.)
* ``dense``: every expert on every token (:meth:`Experts.forward_dense`): E/k times the FLOPs; the
  test oracle and the method of the Alt-MoE reference code.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

GROUPED_MM_MIN_EXPERTS_CPU = 32  # below this, "auto" picks the loop backend on CPU (see resolve_backend)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for x's device, else x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *widths: int) -> bool:
    """Whether ``grouped_mm`` can run these shapes (see the module docstring)."""
    if not hasattr(F, "grouped_mm"):
        return False
    allowed = (torch.bfloat16,) if device.type == "cuda" else (torch.float32, torch.bfloat16)
    if dtype not in allowed or device.type not in ("cpu", "cuda"):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return all((w * size) % 16 == 0 for w in widths)


class Experts(nn.Module):
    """``num_experts`` independent MLPs with stacked weights."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_type: str = "glu",
        hidden_act: str = "silu",
        bias: bool = False,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if expert_type not in ("glu", "mlp"):
            raise ValueError(f"expert_type must be 'glu' or 'mlp', got {expert_type!r}")
        if hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.expert_type, self.hidden_act, self.dropout = expert_type, hidden_act, dropout
        self.act = ACTIVATIONS[hidden_act]
        self.backend = backend
        in_rows = 2 * intermediate_size if expert_type == "glu" else intermediate_size
        self.in_name = "gate_up_proj" if expert_type == "glu" else "up_proj"
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(num_experts, in_rows, hidden_size)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.register_parameter(self.in_name + "_bias", nn.Parameter(torch.zeros(num_experts, in_rows)))
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))
        else:
            self.register_parameter(self.in_name + "_bias", None)
            self.down_proj_bias = None
        self.reset_parameters()

    # The input projection under one name whatever the expert type.
    @property
    def w_in(self) -> torch.Tensor:
        return getattr(self, self.in_name)

    @property
    def b_in(self) -> torch.Tensor | None:
        return getattr(self, self.in_name + "_bias")

    def reset_parameters(self) -> None:
        # nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        for w, fan_in in ((self.w_in, self.hidden_size), (self.down_proj, self.intermediate_size)):
            nn.init.uniform_(w, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        for b in (self.b_in, self.down_proj_bias):
            if b is not None:
                nn.init.zeros_(b)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
            f"type={self.expert_type}, act={self.hidden_act}, backend={self.backend}"
        )

    def resolve_backend(self, dtype: torch.dtype, device: torch.device) -> str:
        """``auto``: grouped_mm on CUDA (one fused kernel). On CPU torch runs grouped_mm as a loop of matmuls
        too and the two backends are within noise of each other (docs/benchmarks.md). From
        GROUPED_MM_MIN_EXPERTS_CPU experts on, grouped_mm's single op spares the per-expert Python dispatch of
        the loop; below that, loop (which runs any shape and dtype)."""
        if self.backend != "auto":
            return self.backend
        if not grouped_mm_supported(dtype, device, self.hidden_size, self.intermediate_size):
            return "loop"
        if device.type == "cpu" and self.num_experts < GROUPED_MM_MIN_EXPERTS_CPU:
            return "loop"
        return "grouped_mm"

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.expert_type == "glu":
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return F.dropout(h, self.dropout, self.training)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x`` (N, H): tokens sorted by expert; ``counts[e]`` tokens for expert e (sum = N)."""
        if len(counts) != self.num_experts:
            raise ValueError(f"expected {self.num_experts} per-expert counts, got {len(counts)}")
        dtype = compute_dtype(x)
        x = x.to(dtype)
        if x.shape[0] == 0:
            # Stay connected to the input and weights: under expert parallelism every rank must run the
            # same backward collectives, also one that received no token.
            anchor = (x.sum() + sum(p.sum() for p in self.parameters(recurse=False))).to(dtype)
            return x.new_zeros(0, self.hidden_size) + 0 * anchor
        backend = self.resolve_backend(dtype, x.device)
        if backend == "grouped_mm" and not grouped_mm_supported(
            dtype, x.device, self.hidden_size, self.intermediate_size
        ):
            raise ValueError(
                f"grouped_mm cannot run {dtype} hidden={self.hidden_size} intermediate={self.intermediate_size} on "
                f"{x.device.type}; use backend='loop' or 'auto'"
            )
        if backend == "grouped_mm":
            y = self._forward_grouped(x, counts, dtype)
        elif backend == "loop":
            y = self._forward_loop(x, counts, dtype)
        elif backend == "dense":
            raise ValueError("the dense backend computes every expert on every token: call forward_dense")
        else:
            raise ValueError(f"unknown experts backend {backend!r}; choose from auto, grouped_mm, loop, dense")
        return F.dropout(y, self.dropout, self.training)

    def _forward_loop(self, x: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        w_in = self.w_in.to(dtype).unbind(0)
        w_out = self.down_proj.to(dtype).unbind(0)
        b_in = self.b_in.to(dtype).unbind(0) if self.b_in is not None else [None] * self.num_experts
        b_out = (
            self.down_proj_bias.to(dtype).unbind(0) if self.down_proj_bias is not None else [None] * self.num_experts
        )
        outs = []
        for e, xe in enumerate(x.split(counts)):
            if xe.shape[0] == 0:
                continue
            h = self._activate(F.linear(xe, w_in[e], b_in[e]))
            outs.append(F.linear(h, w_out[e], b_out[e]))
        return torch.cat(outs)

    def _forward_grouped(self, x: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        counts_t = torch.tensor(counts, device=x.device)
        offs = counts_t.cumsum(0).to(torch.int32)
        h = F.grouped_mm(x, self.w_in.to(dtype).transpose(-2, -1), offs=offs)
        if self.b_in is not None:
            h = h + self.b_in.to(dtype).repeat_interleave(counts_t, dim=0, output_size=x.shape[0])
        h = self._activate(h)
        y = F.grouped_mm(h, self.down_proj.to(dtype).transpose(-2, -1), offs=offs)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias.to(dtype).repeat_interleave(counts_t, dim=0, output_size=x.shape[0])
        return y

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: (T, H) -> (E, T, H)."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        h = torch.matmul(x.unsqueeze(0), self.w_in.to(dtype).transpose(-2, -1))
        if self.b_in is not None:
            h = h + self.b_in.to(dtype)[:, None, :]
        h = self._activate(h)
        y = torch.matmul(h, self.down_proj.to(dtype).transpose(-2, -1))
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias.to(dtype)[:, None, :]
        return F.dropout(y, self.dropout, self.training)
