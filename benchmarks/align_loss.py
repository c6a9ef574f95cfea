"""The contrastive loss under bf16 autocast: logits in float32 (the default since session 5) against logits
left to autocast (bf16, the behaviour before), side by side in one process, forward + backward.

    .venv/bin/python benchmarks/align_loss.py --out bench-align-loss.json
    .venv/bin/python benchmarks/align_loss.py --quick

The two variants alternate (``--repeat`` rounds, best of each kept) on the same tensors.
"""

from __future__ import annotations

import argparse
import time

import torch

from omnimoe.align.losses import info_nce
from omnimoe.io import write_json


def time_once(batch: int, dim: int, float32_logits: bool, iters: int) -> float:
    """Milliseconds per forward + backward of the loss on a (batch, dim) pair of bf16-autocast inputs."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, dim, generator=g, requires_grad=True)
    k = torch.randn(batch, dim, generator=g, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            info_nce(q, k, 20.0, float32_logits=float32_logits).backward()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        step()
    return (time.perf_counter() - start) / iters * 1e3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="128,512,1024")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 128 and 256, few iterations")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    batches = [128, 256] if args.quick else [int(b) for b in args.batches.split(",")]
    iters, repeat = (5, 1) if args.quick else (args.iters, args.repeat)
    rows = []
    for batch in batches:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(repeat):
            for fp32 in (False, True):
                best[fp32] = min(best[fp32], time_once(batch, args.dim, fp32, iters))
        rows.append(
            {
                "batch": batch,
                "dim": args.dim,
                "bf16_logits_ms": best[False],
                "float32_logits_ms": best[True],
                "ratio": best[True] / best[False],
            }
        )
        print(
            f"batch {batch:5d}: bf16 logits {best[False]:.3f} ms, float32 logits {best[True]:.3f} ms ({best[True] / best[False]:.2f}x)"
        )
    if args.out:
        write_json(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
