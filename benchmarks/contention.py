"""Speed of long jobs on a busy machine: steps/s idle and with one core held by another process, for the
thread policy (:mod:`omnimoe.threads`, ``auto``) and for fixed thread counts (torch's default is one thread
per core), side by side in one run.

Jobs (each a real step of the project, on random inputs):

* ``connector``: one training step of the demo-sized Alt-MoE connector (text 384 -> image 1280, hidden 256,
  12 experts top-4, batch 128, both task paths, InfoNCE + regression, AdamW), bf16 autocast where fast;
  the policy calls it small work;
* ``unimoe``: one training step of a Uni-MoE language model (every FFN an MoE of 4 experts top-2, LoRA-free,
  batch 4 x 128 tokens) on a tiny Llama (hidden 256, 4 layers; ``--gemma``: the real Gemma-3-270M, which
  takes about a minute to load); large work;
* ``encoder``: MiniLM (the quick demo's text encoder) on 64 captions, no grad; large work.

Candidates per job: ``auto`` (the policy), and each fixed count from 1 to the cores (``torch``'s default is
the largest). Conditions: ``idle``, then ``busy`` (a Python busy loop on one core, started for the
condition). Within a condition the candidates take turns, each round in a rotated order, each window
``--window`` seconds after one discarded step; the median over ``--rounds`` rounds is reported with the
spread (min, max).

    .venv/bin/python benchmarks/contention.py --out docs/results/bench-contention.json   # ~4 min
    .venv/bin/python benchmarks/contention.py --quick --out /tmp/contention.json          # ~30 s

Targets: under one busy core, ``auto`` keeps >= 50% of its idle speed on every job, and its idle speed is
within 10% of the best fixed count. Rows: ``{"job", "candidate", "condition", "steps_per_s", "min", "max",
"threads_used"}``; a summary row per job with the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from omnimoe.io import write_json
from omnimoe.runtime import autocast_dtype
from omnimoe.threads import ThreadPolicy, usable_cores

Step = Callable[[], None]


def connector_job() -> tuple[Step, str]:
    from omnimoe.align.connector import AltMoEConnector, ConnectorConfig
    from omnimoe.align.losses import info_nce, regression_loss

    torch.manual_seed(0)
    model = AltMoEConnector(ConnectorConfig(modalities={"text": 384, "image": 1280}, directions=["text->image"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src, tgt = torch.randn(128, 384), torch.randn(128, 1280)
    dtype = autocast_dtype("auto")

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            o = model("text->image", src)
            keys = model.embed_target("text->image", tgt)
            loss = info_nce(o.contrastive, keys, torch.tensor(20.0)) + regression_loss(o.regression, tgt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, "small"


def unimoe_job(gemma: bool = False) -> tuple[Step, str]:
    from omnimoe.mllm import MoELLMConfig, moefy
    from omnimoe.mllm.llm import load_llm

    if gemma:
        llm, _ = load_llm("gemma3-270m")
    else:
        llm, _ = load_llm("tiny:llama", tiny_hidden=256, tiny_layers=4)
    moefy(llm, MoELLMConfig(layers="all", num_experts=4, num_experts_per_tok=2, noise_std=0.01))
    llm.train()
    params = [p for p in llm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    vocab = llm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, min(vocab, 30000), (4, 128), generator=torch.Generator().manual_seed(0))
    dtype = autocast_dtype("auto")

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            hidden = llm.model(input_ids=ids).last_hidden_state
            loss = F.cross_entropy(llm.lm_head(hidden[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, "large"


def encoder_job() -> tuple[Step, str]:
    from omnimoe.encoders import load_encoder

    enc = load_encoder("minilm")
    items = [enc.load_item(f"A drawing of a small red object number {i}.") for i in range(64)]

    def step() -> None:
        enc.encode(items)

    return step, "large"


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def measure(step: Step, work: str, candidate: str, window: float) -> tuple[float, int]:
    """Steps/s of ``step`` over ``window`` seconds under ``candidate`` (a setting of :mod:`omnimoe.threads`),
    after one discarded step; and the thread count at the end."""
    with ThreadPolicy(work, candidate, interval=0.5) as policy:  # type: ignore[arg-type]
        step()
        policy.tick()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < window:
            step()
            policy.tick()
            n += 1
        return n / (time.perf_counter() - start), policy.threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="short windows, 2 rounds, the connector and encoder")
    parser.add_argument("--gemma", action="store_true", help="the Uni-MoE step on the real Gemma-3-270M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=3.0, help="seconds per measurement")
    args = parser.parse_args()
    rounds, window = (2, 1.0) if args.quick else (args.rounds, args.window)
    cores = usable_cores()
    candidates = ["auto"] + [str(n) for n in range(1, cores + 1)]
    builders = {"connector": connector_job, "unimoe": lambda: unimoe_job(args.gemma), "encoder": encoder_job}
    if args.quick:
        builders.pop("unimoe")
    jobs = {name: build() for name, build in builders.items()}
    samples: dict[tuple[str, str, str], list[float]] = {}
    used: dict[tuple[str, str, str], int] = {}
    for condition in ("idle", "busy"):
        loop = busy_loop() if condition == "busy" else None
        try:
            time.sleep(1.0 if loop else 0.0)
            for r in range(rounds):
                for name, (step, work) in jobs.items():
                    order = candidates[r % len(candidates) :] + candidates[: r % len(candidates)]
                    for cand in order:
                        rate, threads = measure(step, work, cand, window)
                        samples.setdefault((name, cand, condition), []).append(rate)
                        used[(name, cand, condition)] = threads
                        print(f"{condition:>4} round {r} {name:>9} {cand:>4}: {rate:8.2f} steps/s ({threads} thr)")
        finally:
            if loop is not None:
                loop.kill()
                loop.wait()
    rows: list[dict] = []
    for (name, cand, condition), rates in samples.items():
        rows.append(
            {
                "job": name,
                "candidate": cand,
                "condition": condition,
                "steps_per_s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "threads_used": used[(name, cand, condition)],
            }
        )
    med = {(r["job"], r["candidate"], r["condition"]): r["steps_per_s"] for r in rows}
    print(f"\n{'job':>9} | {'candidate':>9} | idle steps/s | busy steps/s | busy/idle | idle/best idle")
    for name in jobs:
        best = max(med[(name, c, "idle")] for c in candidates[1:])
        for cand in candidates:
            idle, busy = med[(name, cand, "idle")], med[(name, cand, "busy")]
            print(f"{name:>9} | {cand:>9} | {idle:12.2f} | {busy:12.2f} | {busy / idle:9.2f} | {idle / best:14.2f}")
        auto_idle, auto_busy = med[(name, "auto", "idle")], med[(name, "auto", "busy")]
        rows.append(
            {
                "job": name,
                "summary": True,
                "auto_busy_over_idle": auto_busy / auto_idle,
                "auto_idle_over_best": auto_idle / best,
                "torch_default_busy_over_idle": med[(name, str(cores), "busy")] / med[(name, str(cores), "idle")],
                "meets_target": auto_busy / auto_idle >= 0.5 and auto_idle / best >= 0.9,
            }
        )
    write_json(
        args.out,
        {"cores": cores, "torch": torch.__version__, "rounds": rounds, "window_s": window, "rows": rows},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
