"""What storing a text encoder's linear weights in bf16 buys, side by side in one process: one caption through
the same encoder with its linear weights stored in bf16 (what ``omnimoe`` loads under bf16) and with them
kept in float32 and cast by autocast at every call (how they ran before). Both run under bf16 autocast.

    .venv/bin/python benchmarks/encoder_weights.py --encoder mpnet --out bench-encoder-weights.json
    .venv/bin/python benchmarks/encoder_weights.py --quick

The two forms take turns caption by caption (``benchmarks/timing.py``); each is reported as its median with
the spread, with the ratio, the thread count, and whether the outputs are bit-identical (they should be:
the cast is the same rounding, done once).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

from omnimoe.encoders import EncoderOptions, load_encoder
from omnimoe.io import write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/timing.py, however this file is loaded
from timing import interleaved  # noqa: E402

CAPTIONS = ["A crowned crane.", "A pink birthday cake with candles.", "A red fire truck with a ladder."]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="mpnet", help="a text encoder's registry name")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="MiniLM, 6 rounds (a smoke run for the tests)")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.encoder, args.rounds = "minilm", 6
    torch.set_num_threads(args.threads)

    bf16 = load_encoder(args.encoder, EncoderOptions(dtype="bfloat16"))
    cast = copy.copy(bf16)  # the same tokenizer and options; its own model, linear weights back in float32
    cast.model = load_encoder(args.encoder, EncoderOptions(dtype="float32")).model
    cast.dtype = torch.bfloat16
    items = [bf16.load_item(c) for c in CAPTIONS]
    identical = all(torch.equal(bf16.encode([i]).tokens, cast.encode([i]).tokens) for i in items)
    turn = {"bf16": 0, "float32": 0}

    def one(encoder, name):
        def call():
            encoder.encode([items[turn[name] % len(items)]])
            turn[name] += 1

        return call

    timed = interleaved({"bf16_weights": one(bf16, "bf16"), "float32_weights": one(cast, "float32")}, args.rounds)
    result = {
        "encoder": args.encoder,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "bit_identical": identical,
        **{f"{k}_ms": round(v["median_ms"], 2) for k, v in timed.items()},
        **{f"{k}_spread_ms": [round(v["min_ms"], 2), round(v["max_ms"], 2)] for k, v in timed.items()},
    }
    result["speedup"] = round(result["float32_weights_ms"] / result["bf16_weights_ms"], 2)
    print(result)
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
