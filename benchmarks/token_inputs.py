"""What token inputs cost in connector training, against pooled inputs, side by side in one process: one
optimizer step of ``moe-alternating`` (text <-> image, alternating directions, batch 128) on pooled latents,
on every token, and on tokens averaged down to at most K per item (``pool_tokens``).

    .venv/bin/python benchmarks/token_inputs.py --out bench-token-inputs.json
    .venv/bin/python benchmarks/token_inputs.py --quick

Shapes are the demo's: 701 Tux Paint items, MiniLM text tokens (384-d; 6-20 per caption, the real range)
and EfficientNet-Lite0 image tokens (1280-d; a 7x7 grid, 49 per image). The candidates take turns step by
step (``benchmarks/timing.py``: discarded warm-up steps, then ``--rounds`` interleaved steps); each is
reported as its median with the spread, and as a ratio to the pooled step. The thread count is the
trainer's own (one: omnimoe.threads), and is printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from omnimoe.align.config import TrainConfig
from omnimoe.align.data import AlignmentData
from omnimoe.align.trainer import Trainer
from omnimoe.io import write_json
from omnimoe.threads import ThreadPolicy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, however this file is loaded
from timing import interleaved  # noqa: E402

DIRECTIONS = ["text->image", "image->text"]


def demo_sized_data(n: int = 701, seed: int = 0) -> tuple[dict, dict, dict]:
    """Splits, pooled latents and token states of the demo's shapes (random values: timing needs shapes only)."""
    g = torch.Generator().manual_seed(seed)
    ids = [f"item{i}" for i in range(n)]
    splits = {sid: "test" if i % 5 == 0 else ("val" if i % 15 == 1 else "train") for i, sid in enumerate(ids)}
    text_len = torch.randint(6, 21, (n,), generator=g)
    text = torch.randn(n, 20, 384, generator=g)
    text_mask = torch.arange(20)[None, :] < text_len[:, None]
    image = torch.randn(n, 49, 1280, generator=g)
    image_mask = torch.ones(n, 49, dtype=torch.bool)
    pooled = {
        "text": (text * text_mask[..., None]).sum(1) / text_len[:, None],
        "image": image.mean(1),
    }
    tokens = {"text": (text, text_mask), "image": (image, image_mask)}
    return splits, {m: (ids, p) for m, p in pooled.items()}, tokens


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--pools", default="16,8,4", help="comma list of pool_tokens values to time")
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    splits, latents, tokens = demo_sized_data()
    variants = {"pooled": (False, 0), "tokens (all)": (True, 0)}
    variants.update({f"tokens, pool {k}": (True, int(k)) for k in args.pools.split(",") if k.strip()})
    steps = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPolicy("small") as policy:
        for name, (use_tokens, pool) in variants.items():
            data = AlignmentData.from_tensors(splits, latents, tokens if use_tokens else None, pooled_tokens=pool)
            cfg = TrainConfig(method="moe-alternating", token_inputs=use_tokens, pool_tokens=pool, dtype="auto")
            run = Trainer(data, DIRECTIONS, cfg, Path(tmp) / name.replace(" ", "_"), progress=False)
            run.model.train()
            steps[name] = run.train_step
        timed = interleaved(steps, rounds, warmup=1 if args.quick else 3)
        threads = policy.threads
    base = timed["pooled"]["median_ms"]
    rows = [
        {"variant": name, **{k: v for k, v in t.items() if k != "ms"}, "ratio_to_pooled": t["median_ms"] / base}
        for name, t in timed.items()
    ]
    print(f"threads: {threads}; one optimizer step (one direction, batch 128), {rounds} rounds")
    print("| variant | median ms | min-max ms | x pooled |\n|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['median_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | {r['ratio_to_pooled']:.2f} |"
        )
    result = {"threads": threads, "rounds": rounds, "rows": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
