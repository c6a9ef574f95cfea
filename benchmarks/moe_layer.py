"""Benchmark of one MoE layer: training step and forward time of our backends against the usual alternatives.

Measured, per shape and dtype, in one run on the same weights and tokens:

* ``train_ms``: forward + ``loss = (out * g).sum()`` (``g`` a fixed random tensor) + backward + zeroing the
  gradients, router included. The input requires a gradient, as in the middle of a network.
* ``forward_ms``: forward only, under ``torch.no_grad()``.

Under bf16 the parameters stay fp32 and the forward runs inside ``torch.autocast("cpu", dtype=torch.bfloat16)``
(the mixed-precision training mode). The methods of one shape and dtype take turns step by step (each round
in a rotated order) after two discarded warm-up steps each (``benchmarks/timing.py``); each time is the median
of ``--repeat`` rounds, with the spread (min, max) in the rows.

Methods:

* ``grouped_mm``, ``loop``: :class:`~omnimoe.moe.layer.MoELayer` with that experts backend ("ours").
* ``hf-eager``: Hugging Face transformers' eager expert loop on the same stacked weights and the same router
  (indexes ``w[e]`` inside the loop, so autograd allocates a full zero gradient per expert).
* ``dense-all-experts``: ``MoELayer(backend="dense")``, every expert on every token (the Alt-MoE reference).
* ``dense-equal-flops``: a plain two-``nn.Linear`` MLP of intermediate size ``k * F`` (the same active FLOPs
  per token, no router, no dispatch): the roofline a sparse layer can at best reach.
* ``ours-bf16-weights``, ``dense-equal-flops-bf16-weights`` (bf16 runs): the same two with their weights
  stored in bf16 (``MoEConfig.expert_dtype="bfloat16"``; the router stays fp32), so autocast casts nothing.
  Under fp32 weights an MoE casts all E experts' weights at every step though a token uses k of them; the
  dense MLP casts only its active width. ``--curves FILE`` also trains shape (b) for 200 steps both ways
  (fp32 master weights under autocast, and pure-bf16 weights with ``omnimoe.runtime.adamw``'s float32
  masters) on the same regression task and writes both loss curves (JSON, and a PNG beside it).

Shapes: (a) the Alt-MoE connector, (b) an LLM MoE (Mixtral-like), (c) a fine-grained MoE (many small
experts). The run ends with three target ratios, each printed as PASS or MISS.

Run (the full run takes tens of minutes on 2 cores; ``--quick`` takes seconds)::

    .venv/bin/python benchmarks/moe_layer.py --out bench-moe.json
    make bench ARGS="--out bench-moe.json"

Run it on an otherwise idle machine: with every core used by torch threads, any other busy process stalls
the threads at each op's barrier and the many small per-expert matmuls come out several times slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omnimoe.io import write_json
from omnimoe.moe import MoEConfig, MoELayer, grouped_mm_supported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, however this file is loaded
from timing import interleaved  # noqa: E402

OURS = ("grouped_mm", "loop")
BF16_WEIGHTS = ("ours-bf16-weights", "dense-equal-flops-bf16-weights")  # bf16 runs only
METHODS = (*OURS, "hf-eager", "dense-all-experts", "dense-equal-flops", *BF16_WEIGHTS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CHECK_TOLERANCE = 1e-4  # max |ours - hf-eager| / max |hf-eager| in fp32


@dataclass(frozen=True)
class Shape:
    label: str
    name: str
    tokens: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    k: int
    expert_type: str
    hidden_act: str
    norm_topk_prob: bool

    def config(self, backend: str = "auto") -> MoEConfig:
        return MoEConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.k,
            expert_type=self.expert_type,
            hidden_act=self.hidden_act,
            score_func="softmax",
            norm_topk_prob=self.norm_topk_prob,
            backend=backend,
        )

    def describe(self) -> str:
        return (
            f"({self.label}) {self.name}: T={self.tokens} H={self.hidden_size} F={self.intermediate_size} "
            f"E={self.num_experts} k={self.k} {self.expert_type}/{self.hidden_act}"
        )


SHAPES = {
    "a": Shape("a", "Alt-MoE connector", 4096, 2048, 2048, 12, 4, "mlp", "gelu", False),
    "b": Shape("b", "LLM MoE", 2048, 1024, 2816, 8, 2, "glu", "silu", True),
    "c": Shape("c", "fine-grained MoE", 2048, 1024, 256, 64, 8, "glu", "silu", True),
}
QUICK_SHAPES = {
    "a": Shape("a", "Alt-MoE connector (quick)", 64, 64, 64, 4, 2, "mlp", "gelu", False),
    "b": Shape("b", "LLM MoE (quick)", 64, 64, 128, 4, 2, "glu", "silu", True),
    "c": Shape("c", "fine-grained MoE (quick)", 64, 64, 32, 8, 4, "glu", "silu", True),
}


@dataclass(frozen=True)
class Target:
    """``numerator / denominator`` train-time ratio on one shape in bf16; ``"ours"`` = best of our backends."""

    shape: str
    numerator: str
    denominator: str
    bound: float
    at_least: bool
    note: str

    def passes(self, ratio: float) -> bool:
        return ratio >= self.bound if self.at_least else ratio <= self.bound

    def describe(self) -> str:
        sign = ">=" if self.at_least else "<="
        return f"({self.shape}) bf16 {self.numerator} / {self.denominator} train_ms {sign} {self.bound} ({self.note})"


TARGETS = (
    Target("c", "hf-eager", "ours", 3.0, True, "stacked-weight indexing costs"),
    Target("c", "hf-eager", "ours-bf16-weights", 10.0, True, "with pure-bf16 expert weights"),
    Target("a", "dense-all-experts", "ours", 2.5, True, "FLOP limit E/k = 3"),
    Target("b", "ours", "dense-equal-flops", 1.3, False, "routing + dispatch overhead"),
    Target("b", "ours-bf16-weights", "dense-equal-flops", 1.3, False, "pure-bf16 experts, fp32 dense"),
    Target("b", "ours-bf16-weights", "dense-equal-flops-bf16-weights", 1.3, False, "both in bf16"),
)


class HiddenStates(nn.Module):
    """An :class:`MoELayer` returning only its output tensor."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x).hidden_states


class HFEagerMoE(nn.Module):
    """Hugging Face transformers' eager MoE expert loop, run on an :class:`MoELayer`'s router and weights."""

    def __init__(self, layer: MoELayer) -> None:
        super().__init__()
        self.router = layer.router
        self.experts = layer.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        experts = self.experts
        final = torch.zeros_like(x)
        with torch.no_grad():
            expert_mask = F.one_hot(routing.topk_idx, num_classes=experts.num_experts).permute(2, 1, 0)
            hit = torch.nonzero(expert_mask.sum(dim=(-1, -2)) > 0)
        for e in hit:
            pos, tok = torch.where(expert_mask[e[0]])
            h = F.linear(x[tok], experts.w_in[e[0]])
            if experts.expert_type == "glu":
                gate, up = h.chunk(2, dim=-1)
                h = experts.act(gate) * up
            else:
                h = experts.act(h)
            y = F.linear(h, experts.down_proj[e[0]]) * routing.topk_weight[tok, pos, None]
            final.index_add_(0, tok, y.to(final.dtype))
        return final


class DenseMLP(nn.Module):
    """A plain FFN of the same expert type: the dense model with the MoE layer's active FLOPs per token."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, expert_type: str, act: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.glu = expert_type == "glu"
        self.act = act
        self.up = nn.Linear(hidden_size, (2 if self.glu else 1) * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down(h)


def with_backend(base: MoELayer, backend: str) -> MoELayer:
    """An :class:`MoELayer` with another backend that shares ``base``'s parameters (not copies)."""
    layer = MoELayer(dataclasses.replace(base.config, backend=backend))
    layer.load_state_dict(base.state_dict(keep_vars=True), assign=True)
    return layer


def build(method: str, base: MoELayer, shape: Shape, seed: int) -> nn.Module:
    if method in OURS:
        return HiddenStates(with_backend(base, method))
    if method == "dense-all-experts":
        return HiddenStates(with_backend(base, "dense"))
    if method == "hf-eager":
        return HFEagerMoE(base)
    if method == "dense-equal-flops":
        torch.manual_seed(seed)
        return DenseMLP(shape.hidden_size, shape.k * shape.intermediate_size, shape.expert_type, base.experts.act)
    if method == "ours-bf16-weights":
        layer = MoELayer(dataclasses.replace(base.config, expert_dtype="bfloat16"))
        layer.load_state_dict(base.state_dict())  # the same values, rounded to bf16
        return HiddenStates(layer)
    if method == "dense-equal-flops-bf16-weights":
        return build("dense-equal-flops", base, shape, seed).to(torch.bfloat16)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def autocast_for(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a step is timed to its end)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def steps(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype
) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train step, forward step) of ``module`` on input ``x`` with output gradient weights ``g``."""
    device = x.device

    def train_step() -> None:
        with autocast_for(dtype, device):
            loss = (module(x) * g).sum()
        loss.backward()
        module.zero_grad(set_to_none=True)
        x.grad = None
        sync(device)

    def forward_step() -> None:
        with torch.no_grad(), autocast_for(dtype, device):
            module(x)
        sync(device)

    module.train()
    return train_step, forward_step


def make_inputs(
    shape: Shape, seed: int, device: torch.device = torch.device("cpu")
) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """The shape's weights (one :class:`MoELayer`), input tokens and output-gradient weights, all seeded
    (drawn on the CPU, then moved: the same values on every device)."""
    torch.manual_seed(seed)
    base = MoELayer(shape.config()).to(device)
    x = torch.randn(shape.tokens, shape.hidden_size).to(device).requires_grad_(True)
    g = torch.randn(shape.tokens, shape.hidden_size).to(device)
    return base, x, g


def skip_reason(
    method: str, shape: Shape, dtype: torch.dtype, device: torch.device = torch.device("cpu")
) -> str | None:
    if method in BF16_WEIGHTS and dtype != torch.bfloat16:
        return "bf16 weights run in the bf16 rows only"
    if method == "grouped_mm" and not grouped_mm_supported(dtype, device, shape.hidden_size, shape.intermediate_size):
        return f"grouped_mm cannot run {dtype} H={shape.hidden_size} F={shape.intermediate_size} on {device.type}"
    return None


def check_against_hf(shape: Shape, seed: int, device: torch.device = torch.device("cpu")) -> None:
    """fp32: every MoE method's output must match the hf-eager loop's (max relative error < CHECK_TOLERANCE)."""
    base, x, _ = make_inputs(shape, seed, device)
    with torch.no_grad():
        reference = HFEagerMoE(base)(x)
        for method in (*OURS, "dense-all-experts"):
            if skip_reason(method, shape, torch.float32, device):
                continue
            out = build(method, base, shape, seed).to(device)(x)
            err = ((out - reference).abs().max() / reference.abs().max()).item()
            if not err < CHECK_TOLERANCE:
                raise AssertionError(f"({shape.label}) {method} differs from hf-eager: max rel error {err:.2e}")
            print(f"check ({shape.label}) {method} vs hf-eager: max rel error {err:.1e} ok")


def best_ours_ms(rows: Sequence[dict]) -> float | None:
    times = [r["train_ms"] for r in rows if r["method"] in OURS]
    return min(times) if times else None


def train_ms_of(rows: Sequence[dict], shape: str, dtype: str, method: str) -> float | None:
    """Train time of one method on one shape/dtype; ``"ours"`` = the best of our backends."""
    same = [r for r in rows if r["shape"] == shape and r["dtype"] == dtype]
    if method == "ours":
        return best_ours_ms(same)
    return next((r["train_ms"] for r in same if r["method"] == method), None)


def print_table(shape: Shape, dtype_name: str, rows: Sequence[dict]) -> None:
    best = best_ours_ms(rows)
    best_fwd = min((r["forward_ms"] for r in rows if r["method"] in OURS), default=None)
    print(f"\n{shape.describe()}  [{dtype_name}]")
    header = (
        f"{'method':<31} {'train ms':>10} {'fwd ms':>10} {'train tok/s':>12} {'fwd tok/s':>12} "
        f"{'train/ours':>11} {'fwd/ours':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        train_ratio = f"{r['train_ms'] / best:.2f}x" if best else "-"
        fwd_ratio = f"{r['forward_ms'] / best_fwd:.2f}x" if best_fwd else "-"
        print(
            f"{r['method']:<31} {r['train_ms']:>10.1f} {r['forward_ms']:>10.1f} {r['train_tokens_per_s']:>12,.0f} "
            f"{r['forward_tokens_per_s']:>12,.0f} {train_ratio:>11} {fwd_ratio:>9}"
        )
    print("(ours = the faster of grouped_mm and loop; ratios are time / ours' time, > 1 means slower than ours)")


def print_targets(rows: Sequence[dict], quick: bool) -> None:
    print("\nTargets" + (" (quick shapes: the ratios are not meaningful)" if quick else "") + ":")
    for target in TARGETS:
        num = train_ms_of(rows, target.shape, "bfloat16", target.numerator)
        den = train_ms_of(rows, target.shape, "bfloat16", target.denominator)
        if num is None or den is None:
            print(f"  {target.describe()}: not measured")
            continue
        ratio = num / den
        verdict = "PASS" if target.passes(ratio) else "MISS"
        print(f"  {target.describe()}: {ratio:.2f} {verdict}")


def run(args: argparse.Namespace) -> list[dict]:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); return the rows (also written to --out)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = 1 if args.quick else args.repeat
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(
        f"torch {torch.__version__}, {device}, {where}, {torch.get_num_threads()} threads, repeat {repeat} "
        "(median, methods interleaved after 2 warm-ups)"
    )
    rows: list[dict] = []
    for label in args.shapes:
        shape = shapes[label]
        if args.check:
            check_against_hf(shape, args.seed, device)
        base, x, g = make_inputs(shape, args.seed, device)
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            table: list[dict] = []
            modules = {}
            for method in args.methods:
                reason = skip_reason(method, shape, dtype, device)
                if reason:
                    print(f"skip ({label}) {dtype_name} {method}: {reason}")
                    continue
                modules[method] = build(method, base, shape, args.seed).to(device)
            pairs = {method: steps(module, x, g, dtype) for method, module in modules.items()}
            train = interleaved({m: pair[0] for m, pair in pairs.items()}, repeat, warmup=2)
            forward = interleaved({m: pair[1] for m, pair in pairs.items()}, repeat, warmup=2)
            del modules, pairs
            gc.collect()
            for method in train:
                train_ms, forward_ms = train[method]["median_ms"], forward[method]["median_ms"]
                table.append(
                    {
                        "shape": label,
                        "dtype": dtype_name,
                        "method": method,
                        "train_ms": round(train_ms, 3),
                        "train_ms_min": round(train[method]["min_ms"], 3),
                        "train_ms_max": round(train[method]["max_ms"], 3),
                        "forward_ms": round(forward_ms, 3),
                        "forward_ms_min": round(forward[method]["min_ms"], 3),
                        "forward_ms_max": round(forward[method]["max_ms"], 3),
                        "train_tokens_per_s": round(shape.tokens / train_ms * 1e3, 1),
                        "forward_tokens_per_s": round(shape.tokens / forward_ms * 1e3, 1),
                        "tokens": shape.tokens,
                        "hidden_size": shape.hidden_size,
                        "intermediate_size": shape.intermediate_size,
                        "num_experts": shape.num_experts,
                        "num_experts_per_tok": shape.k,
                        "expert_type": shape.expert_type,
                        "threads": torch.get_num_threads(),
                        "device": where,
                        "repeat": repeat,
                        "quick": args.quick,
                        "torch": torch.__version__,
                    }
                )
            print_table(shape, dtype_name, table)
            rows.extend(table)
        del base, x, g
        gc.collect()
    print_targets(rows, args.quick)
    if args.out:
        write_json(args.out, rows)
        print(f"\nwrote {len(rows)} rows to {args.out}")
    return rows


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated subset of ``allowed``."""

    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(items))  # drop repeats, keep the order

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=_choices(tuple(SHAPES)), default=list(SHAPES), help="default: a,b,c")
    parser.add_argument("--dtypes", type=_choices(tuple(DTYPES)), default=list(DTYPES), help="default: both")
    parser.add_argument("--methods", type=_choices(METHODS), default=list(METHODS), help="default: all five")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement, median reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (the backends' ``auto`` picks grouped_mm on CUDA)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes and repeat 1 (a smoke test, seconds)")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"first check that fp32 outputs match hf-eager (max rel error < {CHECK_TOLERANCE:g})",
    )
    parser.add_argument("--out", help="write the rows as a JSON list to this file (atomically)")
    parser.add_argument("--curves", help="also write the fp32-master vs pure-bf16 training curves here (JSON + PNG)")
    parser.add_argument("--curve-steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be >= 1")
    return args


def training_curves(shape: Shape, steps: int, seed: int) -> dict[str, list[float]]:
    """Loss per step of the same MoE layer fitted to the same regression task (a fixed random two-layer
    teacher) under bf16 autocast: fp32 master weights, and pure-bf16 expert weights with float32 masters in
    the optimizer (``omnimoe.runtime.adamw``)."""
    from omnimoe.runtime import adamw

    g = torch.Generator().manual_seed(seed + 1)
    teacher = [
        torch.randn(shape.hidden_size, shape.hidden_size, generator=g) / shape.hidden_size**0.5 for _ in range(2)
    ]
    curves = {}
    for expert_dtype in ("float32", "bfloat16"):
        torch.manual_seed(seed)
        layer = MoELayer(dataclasses.replace(shape.config(), expert_dtype=expert_dtype))
        opt = adamw(layer.parameters(), lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
        batches = torch.Generator().manual_seed(seed + 2)
        losses = []
        for _ in range(steps):
            x = torch.randn(min(shape.tokens, 512), shape.hidden_size, generator=batches)
            y = torch.tanh(x @ teacher[0]) @ teacher[1]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (layer(x).hidden_states.float() - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[expert_dtype] = losses
        print(f"curve {expert_dtype}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return curves


def write_curves(curves: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(path, {"steps": len(curves["float32"]), **curves})
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, label in (
        ("float32", "fp32 master weights (autocast)"),
        ("bfloat16", "pure-bf16 experts + fp32 masters"),
    ):
        ax.plot(curves[name], label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel="MSE", yscale="log", title="MoE layer (b): training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(path)[0] + ".png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    run(args)
    if args.curves:
        shapes = QUICK_SHAPES if args.quick else SHAPES
        write_curves(training_curves(shapes["b"], 20 if args.quick else args.curve_steps, args.seed), args.curves)


if __name__ == "__main__":
    main()
