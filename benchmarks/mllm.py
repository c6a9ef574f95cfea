"""MoE-LLM training throughput: tokens/s of a whole training step of three models built from one
randomly initialised Hugging Face Llama (no download), side by side in one process.

A step is forward + LM loss (+ router loss) + backward + ``AdamW.step()`` on a fixed batch of
``batch x seq`` tokens (labels = inputs, every position a real token). AdamW is ``fused=True`` for all three
(``--adamw for-loop`` is torch's CPU default, which is much slower on large stacked expert tensors: see
docs/benchmarks.md). Models:

* ``moe``: every FFN made sparse by :func:`omnimoe.mllm.moefy`, 4 experts top-2 (Uni-MoE v1 / MoE-LLaVA
  shape: softmax router, top-k renormalised, experts upcycled from the FFN plus 1% noise so they differ),
  ``backend="auto"``, aux loss 0.01. As :class:`~omnimoe.mllm.MultimodalLLM` does in training, the padding
  mask (all ones here) is given to the MoE layers (``set_token_mask``).
* ``dense-equal-active``: every FFN widened by :func:`omnimoe.mllm.baselines.dense_equal_active` to the MoE's
  active parameters (width k*F): the same FFN FLOPs per token, no router, no dispatch.
* ``moe-hf-eager``: the same MoE (the same weights, copied from ``moe``) computed the way Hugging Face
  transformers' classic ``MixtralSparseMoeBlock`` does it: router ``nn.Linear`` -> softmax -> top-k ->
  renormalise, ``one_hot(...).permute`` expert mask, a Python loop over experts with ``torch.where``,
  per-expert ``nn.Linear`` w1/w3/w2 modules and ``index_add_``; aux loss as ``load_balancing_loss_func``.

Before timing, the ``moe`` and ``moe-hf-eager`` logits are checked to agree in fp32 (max relative error
< 1e-4). Timing (``benchmarks/timing.py``): three discarded warm-up steps per model (the first steps of a
model run about 2x slower than later ones), then ``--repeat`` rounds; each round runs one step of every
model (the order rotating between rounds), so machine noise and warm-up hit all three alike; the median step
is reported with its spread (min, max). Mixed precision by default: fp32 parameters and AdamW state, forward under
``torch.autocast("cpu", dtype=torch.bfloat16)`` (our MoE layer runs its experts in bf16 under autocast and
its router in fp32); ``--dtype float32`` runs everything in fp32.

Sizes: full = hidden 512, FFN 1408, 4 layers, 8 heads, vocab 8000, batch 4 x seq 256 (1,024 tokens a step);
``--quick`` = a tiny model, 2 rounds (seconds, for tests).

    .venv/bin/python benchmarks/mllm.py --threads 1 --out docs/results/bench-mllm.json   # full run, ~1 min
    .venv/bin/python benchmarks/mllm.py --quick --out /tmp/bench-mllm.json              # seconds

``--threads`` defaults to all cores; use 1 when another process keeps a core busy: torch's threads then
wait for each other at every op and steps come out 2-3x slower and erratic.

Target: ``moe`` at most 1.3x slower than ``dense-equal-active`` (tokens/s ratio dense / moe <= 1.3).
Rows: ``{"model", "tokens_per_s", "step_ms", "slowdown_vs_dense", "params", "ffn_active_params", ...}``.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from omnimoe.io import write_json
from omnimoe.mllm import MoELLMConfig, decoder_layers, moefy, router_loss, set_token_mask
from omnimoe.mllm.baselines import dense_equal_active, moe_active_parameters
from omnimoe.mllm.moe_llm import MoEMLP
from omnimoe.moe import MoELayer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, however this file is loaded
from timing import interleaved  # noqa: E402

MODELS = ("moe", "dense-equal-active", "moe-hf-eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TARGET = 1.3  # moe step time / dense-equal-active step time, at most
CHECK_TOLERANCE = 1e-4  # max |moe - moe-hf-eager| / max |moe-hf-eager| over the logits, fp32

SIZES = {
    "full": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        vocab_size=8000,
        batch=4,
        seq=256,
    ),
    "quick": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=512,
        batch=2,
        seq=32,
    ),
}


def moe_config(backend: str = "auto") -> MoELLMConfig:
    """Uni-MoE v1 shape: 4 experts, top-2, softmax over the chosen two, every layer."""
    return MoELLMConfig(
        layers="all",
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        noise_std=0.01,
        router_aux_loss_coef=0.01,
        backend=backend,
    )


class HFExpert(nn.Module):
    """transformers' ``MixtralBlockSparseTop2MLP``: ``w2(act(w1(x)) * w3(x))``."""

    def __init__(self, hidden: int, intermediate: int, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden, intermediate, bias=False)
        self.w2 = nn.Linear(intermediate, hidden, bias=False)
        self.w3 = nn.Linear(hidden, intermediate, bias=False)
        self.act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class HFEagerSparseMoeBlock(nn.Module):
    """transformers' classic eager ``MixtralSparseMoeBlock`` (router, top-k, expert loop), as a decoder
    block's ``mlp``. Keeps its router logits for :func:`hf_load_balancing_loss`."""

    def __init__(
        self, hidden: int, intermediate: int, num_experts: int, top_k: int, act: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(HFExpert(hidden, intermediate, act) for _ in range(num_experts))
        self.router_logits: torch.Tensor | None = None

    @classmethod
    @torch.no_grad()
    def from_moe(cls, layer: MoELayer) -> "HFEagerSparseMoeBlock":
        """The same weights as ``layer`` (a GLU MoE, softmax router, top-k renormalised, no shared/null experts)."""
        cfg, ex = layer.config, layer.experts
        if (
            cfg.expert_type != "glu"
            or cfg.num_shared_experts
            or cfg.num_null_experts
            or not cfg.norm_topk_prob
            or cfg.score_func != "softmax"
        ):
            raise ValueError(
                "the Mixtral block reproduces GLU experts with a softmax router and renormalised top-k only"
            )
        block = cls(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.num_experts_per_tok, ex.act)
        block.gate.weight.copy_(layer.router.weight)
        f = cfg.intermediate_size
        for e, expert in enumerate(block.experts):
            expert.w1.weight.copy_(ex.w_in[e, :f])
            expert.w3.weight.copy_(ex.w_in[e, f:])
            expert.w2.weight.copy_(ex.down_proj[e])
        return block.to(ex.w_in.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden_dim)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final_hidden_states = torch.zeros(
            (batch_size * sequence_length, hidden_dim), dtype=hidden_states.dtype, device=hidden_states.device
        )
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        for expert_idx in range(self.num_experts):
            expert_layer = self.experts[expert_idx]
            idx, top_x = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
            current_hidden_states = expert_layer(current_state) * routing_weights[top_x, idx, None]
            final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
        self.router_logits = router_logits
        return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


def hf_load_balancing_loss(model: nn.Module) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func`` over the router logits of every eager block (no padding)."""
    blocks = [m for m in model.modules() if isinstance(m, HFEagerSparseMoeBlock) and m.router_logits is not None]
    if not blocks:
        return torch.zeros(())
    num_experts, top_k = blocks[0].num_experts, blocks[0].top_k
    gate_logits = torch.cat([b.router_logits for b in blocks], dim=0)
    routing_weights = F.softmax(gate_logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = F.one_hot(selected_experts, num_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


def to_hf_eager(model: nn.Module) -> nn.Module:
    """A copy of a moefied model whose MoE layers are :class:`HFEagerSparseMoeBlock` with the same weights."""
    model = copy.deepcopy(model)
    for block in decoder_layers(model):
        if isinstance(block.mlp, MoEMLP):
            block.mlp = HFEagerSparseMoeBlock.from_moe(block.mlp.moe)
    return model


def base_llm(size: dict, seed: int) -> nn.Module:
    cfg = LlamaConfig(
        **{k: v for k, v in size.items() if k not in ("batch", "seq")},
        num_key_value_heads=size["num_attention_heads"],
        max_position_embeddings=max(256, size["seq"]),
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def build_models(size: dict, seed: int, backend: str = "auto") -> dict[str, nn.Module]:
    """The three models from one random-init Llama: same attention/embedding weights, MoE experts upcycled
    with seeded noise; the dense baseline starts from the same (noisy) first k experts."""
    base = base_llm(size, seed)
    cfg = moe_config(backend)
    moe = copy.deepcopy(base)
    moefy(moe, cfg, generator=torch.Generator().manual_seed(seed))
    dense = copy.deepcopy(base)
    dense_equal_active(dense, cfg, generator=torch.Generator().manual_seed(seed))
    return {"moe": moe, "dense-equal-active": dense, "moe-hf-eager": to_hf_eager(moe)}


def make_batch(size: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g)
    return ids, torch.ones_like(ids)


@torch.no_grad()
def check_hf_eager(models: dict[str, nn.Module], ids: torch.Tensor, mask: torch.Tensor) -> float:
    """fp32 logits of ``moe`` and ``moe-hf-eager`` on the batch; raises beyond CHECK_TOLERANCE."""
    outs = {}
    for name in ("moe", "moe-hf-eager"):
        model = models[name]
        set_token_mask(model, mask)
        outs[name] = model(input_ids=ids, attention_mask=mask).logits
        set_token_mask(model, None)
    ref = outs["moe-hf-eager"]
    err = ((outs["moe"] - ref).abs().max() / ref.abs().max()).item()
    if not err < CHECK_TOLERANCE:
        raise AssertionError(f"moe and moe-hf-eager logits differ: max rel error {err:.2e}")
    print(f"check moe vs moe-hf-eager logits (fp32): max rel error {err:.1e} ok")
    return err


def autocast_for(dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> AbstractContextManager:
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def train_step(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype,
    aux_coef: float,
    use_mask: bool = True,
) -> float:
    """One training step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    if name == "moe" and use_mask:
        set_token_mask(model, mask)
    with autocast_for(dtype, ids.device):
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    loss = out.loss
    if name == "moe":
        set_token_mask(model, None)
        loss = loss + router_loss(model)
    elif name == "moe-hf-eager":
        loss = loss + aux_coef * hf_load_balancing_loss(model)
    loss.backward()
    optimizer.step()
    return loss.item()  # waits for the device: a CUDA step is timed to its end


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW, ``fused`` (one kernel per parameter), ``foreach`` or torch's CPU default (``for-loop``: one op
    per parameter and update term, with full-size temporaries)."""
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **options)


def ffn_active_params(model: nn.Module) -> int:
    """FFN parameters one token uses, summed over the layers (routers excluded)."""
    total = 0
    for block in decoder_layers(model):
        mlp = block.mlp
        if isinstance(mlp, MoEMLP):
            total += moe_active_parameters(mlp.moe)
        elif isinstance(mlp, HFEagerSparseMoeBlock):
            total += mlp.top_k * sum(p.numel() for p in mlp.experts[0].parameters())
        else:
            total += sum(p.numel() for p in mlp.parameters())
    return total


def run(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); return the rows (also written to --out)."""
    torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    dtype = DTYPES[args.dtype]
    repeat = args.repeat if args.repeat is not None else (2 if args.quick else 10)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, AdamW {args.adamw}, size {size}, {repeat} rounds (median; the models interleaved step by step after 3 warm-up steps each)"
    )
    device = torch.device(args.device)
    models = {name: model.to(device) for name, model in build_models(size, args.seed, args.backend).items()}
    ids, mask = (t.to(device) for t in make_batch(size, args.seed))
    for model in models.values():
        model.train()
    check_hf_eager(models, ids, mask)
    aux_coef = moe_config().router_aux_loss_coef
    optimizers = {name: make_optimizer(m, args.adamw) for name, m in models.items()}
    names = list(args.models)

    def step_of(name: str) -> Callable[[], None]:
        return lambda: train_step(name, models[name], optimizers[name], ids, mask, dtype, aux_coef, not args.no_mask)

    timed = interleaved({name: step_of(name) for name in names}, repeat, warmup=1 if args.quick else 3)
    times = {name: t["ms"] for name, t in timed.items()}
    tokens = size["batch"] * size["seq"]
    medians = {name: t["median_ms"] for name, t in timed.items()}
    dense_ms = medians.get("dense-equal-active")
    rows = []
    for name in names:
        model = models[name]
        rows.append(
            {
                "model": name,
                "tokens_per_s": round(tokens / medians[name] * 1e3, 1),
                "step_ms": round(medians[name], 2),
                "step_ms_min": round(min(times[name]), 2),
                "step_ms_max": round(max(times[name]), 2),
                "step_ms_all": [round(t, 2) for t in times[name]],
                "slowdown_vs_dense": round(medians[name] / dense_ms, 3) if dense_ms else None,
                "params": sum(p.numel() for p in model.parameters()),
                "ffn_active_params": ffn_active_params(model),
                "tokens_per_step": tokens,
                "dtype": args.dtype,
                "adamw": args.adamw,
                "backend": args.backend if name == "moe" else None,
                "token_mask": (not args.no_mask) if name == "moe" else None,
                "num_experts": 4 if name != "dense-equal-active" else None,
                "num_experts_per_tok": 2,
                "config": dict(size),
                "threads": torch.get_num_threads(),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "repeat": repeat,
                "quick": args.quick,
                "torch": torch.__version__,
            }
        )
    print_table(rows)
    if args.out:
        write_json(args.out, rows)
        print(f"\nwrote {len(rows)} rows to {args.out}")
    return rows


def print_table(rows: Sequence[dict]) -> None:
    header = f"{'model':<20} {'tokens/s':>10} {'step ms':>10} {'vs dense':>9} {'params':>12} {'FFN active':>12}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['slowdown_vs_dense']:.2f}x" if r["slowdown_vs_dense"] else "-"
        print(
            f"{r['model']:<20} {r['tokens_per_s']:>10,.0f} {r['step_ms']:>10.1f} {ratio:>9} {r['params']:>12,} {r['ffn_active_params']:>12,}"
        )
    moe = next((r for r in rows if r["model"] == "moe"), None)
    if moe and moe["slowdown_vs_dense"]:
        verdict = "PASS" if moe["slowdown_vs_dense"] <= TARGET else "MISS"
        quick = " (quick size: not meaningful)" if moe["quick"] else ""
        print(
            f"\nTarget: moe step time <= {TARGET}x dense-equal-active: {moe['slowdown_vs_dense']:.2f}x {verdict}{quick}"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model and 2 rounds (seconds; for tests)")
    p.add_argument("--out", help="write the rows as a JSON list to this file (atomically)")
    p.add_argument(
        "--dtype", choices=tuple(DTYPES), default="bfloat16", help="bfloat16 = fp32 weights + bf16 autocast (default)"
    )
    p.add_argument("--repeat", type=int, default=None, help="timed rounds (default 10; 2 with --quick)")
    p.add_argument(
        "--adamw",
        choices=("fused", "foreach", "for-loop"),
        default="fused",
        help="AdamW implementation (default fused; for-loop is torch's CPU default)",
    )
    p.add_argument(
        "--backend", choices=("auto", "loop", "grouped_mm"), default="auto", help="experts backend of the moe model"
    )
    p.add_argument(
        "--models", type=lambda s: [m for m in s.split(",") if m], default=list(MODELS), help="default: all three"
    )
    p.add_argument("--no-mask", action="store_true", help="do not give the padding mask to the moe model's MoE layers")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    if (args.repeat is not None and args.repeat < 1) or args.threads < 1:
        p.error("--repeat and --threads must be >= 1")
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: expected a comma list of {','.join(MODELS)}")
    return args


if __name__ == "__main__":
    run(parse_args())
