"""The contrastive loss under bf16 autocast: logits in float32 (the default) against logits left to autocast
(bf16), side by side in one process, forward + backward.

    .venv/bin/python benchmarks/align_loss.py --out bench-align-loss.json
    .venv/bin/python benchmarks/align_loss.py --quick

The two variants take turns step by step on the same tensors (``benchmarks/timing.py``: 3 discarded warm-up
steps each, then ``--rounds`` interleaved steps); each is reported as its median with the spread.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch

from omnimoe.align.losses import info_nce
from omnimoe.io import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, however this file is loaded
from timing import interleaved  # noqa: E402


def loss_step(batch: int, dim: int, float32_logits: bool) -> Callable[[], None]:
    """Forward + backward of the loss on a (batch, dim) pair of bf16-autocast inputs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=g, requires_grad=True)
    k = torch.randn(batch, dim, generator=g, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            info_nce(q, k, 20.0, float32_logits=float32_logits).backward()

    return step


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="128,512,1024")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="batch 128 and 256, few rounds")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    batches = [128, 256] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 5 if args.quick else args.rounds
    rows = []
    for batch in batches:
        timed = interleaved(
            {"bf16": loss_step(batch, args.dim, False), "float32": loss_step(batch, args.dim, True)}, rounds
        )
        bf16, fp32 = timed["bf16"], timed["float32"]
        rows.append(
            {
                "batch": batch,
                "dim": args.dim,
                "bf16_logits_ms": bf16["median_ms"],
                "bf16_logits_ms_spread": [bf16["min_ms"], bf16["max_ms"]],
                "float32_logits_ms": fp32["median_ms"],
                "float32_logits_ms_spread": [fp32["min_ms"], fp32["max_ms"]],
                "ratio": fp32["median_ms"] / bf16["median_ms"],
                "rounds": rounds,
            }
        )
        print(
            f"batch {batch:5d}: bf16 logits {bf16['median_ms']:.3f} ms, float32 logits {fp32['median_ms']:.3f} ms "
            f"({fp32['median_ms'] / bf16['median_ms']:.2f}x; medians of {rounds} interleaved steps)"
        )
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
