"""Retrieval latency: (a) connector + index search, (b) a whole text query (text tower + connector + search), at
10k, 100k and 1M stored vectors, for each index kind (faiss flat / ivf / hnsw, and the torch fallback); and
(c) a bounded load test against a running ``omnimoe serve`` (2,000 requests, 16 at a time). First, side by
side: one caption through each text tower of ``--compare-encoders`` (interleaved), and one query through the
connector's paths.

    .venv/bin/python benchmarks/retrieval.py --out bench-retrieval.json     # the full run (~10 min)
    .venv/bin/python benchmarks/retrieval.py --quick                        # 10k only, 200 HTTP requests
    .venv/bin/python benchmarks/retrieval.py --text-encoder mpnet ...      # the text tower of `omnimoe align`

Targets: connector + search p50 <= 1.5 ms at 100k vectors with ivf (one query through the connector <= 0.3 ms);
whole text query p50 <= 20 ms; zero errors under load. Queries go through the connector as ``omnimoe serve``
sends them: the NumPy query path (:mod:`omnimoe.align.query`).

Stored vectors are synthetic (a mixture of 2,000 Gaussian clusters in the 256-d contrastive space, so the
approximate indexes face neighbourhoods like real ones); the connector is the demo's Alt-MoE shape (hidden
256, 12 experts, top-4) and the text encoder is a real one (``--text-encoder``, MiniLM by default): latency
does not depend on what the weights learnt. The HTTP test serves a synthetic run (random image latents with
the real encoders' records) with the real ``omnimoe serve`` process. Rows: ``{"n", "method", "path": "search"|"text-query"|"http", "p50_ms",
"p99_ms", "errors"}`` plus ``build_s`` and, for approximate kinds, ``recall@10`` against exact search.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from omnimoe.align.connector import AltMoEConnector, ConnectorConfig
from omnimoe.align.query import QueryPath
from omnimoe.io import write_json
from omnimoe.retrieval.index import IndexSpec, VectorIndex, faiss_available

DIRECTION = "text->image"
TASK = ("contrastive",)  # what a query runs (the regression path is not needed for search)
CAPTIONS = [
    "a red fire truck",
    "a frog sitting on a leaf",
    "a violin",
    "two apples on a table",
    "a sailing boat at sea",
    "a cartoon penguin",
    "an old steam locomotive",
    "a slice of pizza",
    "a snowman with a hat",
    "a black rhino",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000", help="stored vectors per run (comma list)")
    p.add_argument("--methods", default="faiss-flat,faiss-ivf,faiss-hnsw,torch", help="index kinds")
    p.add_argument(
        "--queries", type=int, default=300, help="timed single queries per cell (fewer at 1M for exact kinds)"
    )
    p.add_argument(
        "--hnsw-max", type=int, default=200_000, help="largest n to build an HNSW index for (its build is slow)"
    )
    p.add_argument("--http-n", type=int, default=100_000, help="stored items in the served synthetic run")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--quick", action="store_true", help="10k vectors, 50 queries, 200 HTTP requests (seconds; for tests)"
    )
    p.add_argument("--no-http", action="store_true")
    p.add_argument(
        "--prior",
        action="store_true",
        help="also time each cell with the label prior's half appended (a run trained "
        "with prior_weight > 0: index vectors [key, prior side] of 256 + 384 dims), side by side",
    )
    p.add_argument("--text-encoder", default="minilm", help="the text tower of the text-query rows (registry name)")
    p.add_argument(
        "--compare-encoders",
        default="minilm,mpnet",
        help="text towers timed side by side on one caption each, interleaved (comma list; '' skips)",
    )
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.queries, args.http_n, args.requests, args.hnsw_max = "10000", 50, 5000, 200, 10_000
    return args


def synthetic(n: int, dim: int, seed: int = 0, clusters: int = 1000, intrinsic: int = 16) -> np.ndarray:
    """Clustered vectors of low intrinsic dimension, like real embeddings: a cluster centre, plus variation
    along ``intrinsic`` directions of its own, plus a little isotropic noise. (Isotropic Gaussian clouds
    would have no meaningful nearest neighbours, and no index, exact or not, could be judged on them.)"""
    rng = np.random.default_rng(seed)
    gen = np.random.default_rng(12345)  # the same clusters for every seed: queries come from the items' distribution
    centres = gen.normal(size=(clusters, dim)).astype(np.float32)
    bases = gen.normal(size=(clusters, intrinsic, dim)).astype(np.float32) / np.sqrt(intrinsic)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 50_000):  # in chunks: 1M x 256 floats is 1 GB
        m = min(50_000, n - i)
        c = rng.integers(0, clusters, m)
        z = rng.normal(size=(m, 1, intrinsic)).astype(np.float32)
        out[i : i + m] = centres[c] + (z @ bases[c])[:, 0] + 0.05 * rng.normal(size=(m, dim)).astype(np.float32)
    return out


def percentiles(ms: list[float]) -> tuple[float, float]:
    s = sorted(ms)
    return s[len(s) // 2], s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def connector(text_dim: int = 384) -> AltMoEConnector:
    torch.manual_seed(0)
    return AltMoEConnector(
        ConnectorConfig(
            modalities={"text": text_dim, "image": 1280},
            hidden_size=256,
            contrastive_dim=256,
            num_experts=12,
            num_experts_per_tok=4,
        )
    ).eval()


def p50_interleaved(calls: dict, reps: int, discard: int) -> dict[str, float]:
    """``{"<name>_p50_ms": ...}``: every call of ``calls`` (name -> fn(i)) once per round, in turn, so a busy
    machine slows them alike; the first ``discard`` rounds are not timed."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(reps + discard):
        for name, call in calls.items():
            t = time.perf_counter()
            call(i)
            if i >= discard:
                times[name].append((time.perf_counter() - t) * 1e3)
    return {f"{name}_p50_ms": round(percentiles(ms)[0], 3) for name, ms in times.items()}


def time_calls(fn, reps: int, warmup: int = 5) -> list[float]:
    for i in range(warmup):
        fn(i)
    out = []
    for i in range(reps):
        t = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - t) * 1e3)
    return out


@torch.no_grad()
def index_rows(args: argparse.Namespace) -> list[dict]:
    from omnimoe.encoders import load_encoder

    encoder = load_encoder(args.text_encoder)
    latents = encoder.encode([encoder.load_item(c) for c in CAPTIONS]).pooled  # real text latents as connector inputs
    model = connector(latents.shape[1])
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for prior in (False, True) if args.prior else (False,):
            rows += _cells(args, model, encoder, latents, n, prior)
    return rows


def _cells(
    args: argparse.Namespace, model: AltMoEConnector, encoder, latents: torch.Tensor, n: int, prior: bool
) -> list[dict]:
    """Every index kind at ``n`` stored vectors; with ``prior``, vectors and queries carry the prior's dims."""
    import torch.nn.functional as F

    extra = latents.shape[1] if prior else 0  # the text side of the label prior (the text tower's width)
    vectors = synthetic(n, 256 + extra)
    ids = [f"item{i}" for i in range(n)]
    probe = synthetic(200, 256 + extra, seed=7)  # recall is judged on queries from the items' own distribution
    exact: list[list[str]] | None = None
    rows = []

    query_path = QueryPath(model, DIRECTION)

    def query(pooled: torch.Tensor) -> torch.Tensor:
        q = query_path(pooled)
        return (
            torch.cat([F.normalize(q, dim=-1), F.normalize(pooled, dim=-1)], dim=1) if prior else q
        )  # as Retriever.embed

    for method in args.methods.split(","):
        kind = method.removeprefix("faiss-")
        if method.startswith("faiss") and not faiss_available():
            print(f"skip {method}: faiss is not installed")
            continue
        if kind == "hnsw" and n > args.hnsw_max:
            print(f"skip {method} at n={n}: HNSW build time grows past the budget (--hnsw-max {args.hnsw_max})")
            continue
        t = time.perf_counter()
        index = VectorIndex.build(vectors, ids, IndexSpec(kind=kind))  # type: ignore[arg-type]
        build_s = time.perf_counter() - t
        reps = args.queries if n < 1_000_000 or kind in ("ivf", "hnsw") else max(20, args.queries // 6)

        def search(i: int, index: VectorIndex = index) -> None:
            index.search(query(latents[i % len(latents) : i % len(latents) + 1]), 10)

        def text_query(i: int, index: VectorIndex = index) -> None:
            out = encoder.encode([encoder.load_item(CAPTIONS[i % len(CAPTIONS)])])
            index.search(query(out.pooled), 10)

        found = index.search(probe, 10)[1]
        if kind in ("flat", "torch") and exact is None:
            exact = found
        recall = statistics.fmean(len(set(a) & set(b)) / 10 for a, b in zip(found, exact)) if exact else None
        for path, fn in (("search", search), ("text-query", text_query)):
            p50, p99 = percentiles(time_calls(fn, reps))
            row = {
                "n": n,
                "method": method,
                "path": path,
                "p50_ms": round(p50, 3),
                "p99_ms": round(p99, 3),
                "errors": 0,
                "queries": reps,
                "build_s": round(build_s, 2),
                "prior": prior,
                "text_encoder": args.text_encoder,
            }
            if kind in ("ivf", "hnsw") and recall is not None:
                row["recall@10"] = round(recall, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del index
    return rows


def synthetic_run(folder: Path, n: int) -> Path:
    """A run ``omnimoe serve`` can open: the demo's connector shape, n random image latents, a few texts."""
    from omnimoe.encoders import load_encoder
    from omnimoe.latents.store import write_store

    text_enc, image_enc = load_encoder("minilm"), load_encoder("efficientnet-lite0")
    texts = text_enc.encode([text_enc.load_item(c) for c in CAPTIONS]).pooled
    write_store(
        folder / "stores" / "text",
        [f"t{i}" for i in range(len(CAPTIONS))],
        texts,
        {**text_enc.describe(), "field": "text"},
    )
    images = torch.from_numpy(np.abs(synthetic(n, 1280, seed=1)))  # EfficientNet features are non-negative
    write_store(
        folder / "stores" / "image", [f"img{i}" for i in range(n)], images, {**image_enc.describe(), "field": "image"}
    )
    connector().save_pretrained(folder / "connectors" / "moe-alternating")
    write_json(
        folder / "summary.json",
        {
            "stores": {"text": str(folder / "stores" / "text"), "image": str(folder / "stores" / "image")},
            "modalities": ["text", "image"],
            "train_config": {"token_inputs": False},
        },
    )
    return folder


def load_test(args: argparse.Namespace, run: Path, coalesce: bool) -> dict:
    """Start ``omnimoe serve`` on ``run``; send ``args.requests`` text queries, ``args.concurrency`` at a time."""
    import httpx

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "serve",
        "--run",
        str(run),
        "--port",
        "0",
        "--coalesce" if coalesce else "--no-coalesce",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while not line.startswith("listening on "):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stderr.read()[-2000:]}")
        url = line.split()[-1]
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=args.concurrency)) as client:

            def one(i: int) -> tuple[float, bool]:
                t = time.perf_counter()
                try:
                    r = client.post(
                        f"{url}/search", json={"text": CAPTIONS[i % len(CAPTIONS)], "target": "image", "k": 10}
                    )
                    ok = r.status_code == 200 and len(r.json()["results"]) == 10
                except httpx.HTTPError:
                    ok = False
                return (time.perf_counter() - t) * 1e3, ok

            for i in range(20):
                one(i)  # warm-up
            t = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(one, range(args.requests)))
            wall = time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    p50, p99 = percentiles([ms for ms, _ in results])
    return {
        "n": args.http_n,
        "method": "faiss-flat" if faiss_available() else "torch",
        "path": "http",
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "errors": sum(not ok for _, ok in results),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "requests_per_s": round(args.requests / wall, 1),
        "coalesce": coalesce,
    }


def http_rows(args: argparse.Namespace) -> list[dict]:
    """The service with query coalescing (the default) and without it, on the same run, one after the other."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="omnimoe-bench-") as tmp:
        run = synthetic_run(Path(tmp) / "run", args.http_n)
        for coalesce in (True, False):
            rows.append(load_test(args, run, coalesce))
            print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def connector_comparison(reps: int) -> dict[str, float]:
    """p50 ms of one query through the connector: both task paths (what training runs), the contrastive
    path alone, and the NumPy query path that serving uses, interleaved in one loop after 10 discarded
    rounds."""
    model = connector()
    path = QueryPath(model, DIRECTION)
    x = torch.randn(1, 384)
    calls = {
        "both_tasks": lambda: model(DIRECTION, x, tasks=("regression", "contrastive")),
        "contrastive_only": lambda: model(DIRECTION, x, tasks=TASK),
        "query_path": lambda: path(x),
    }
    result = p50_interleaved({name: lambda i, call=call: call() for name, call in calls.items()}, reps, discard=10)
    # the query path call after call, as a search loop makes it (interleaved, the torch calls between evict
    # its weights from the caches)
    result["query_path_consecutive_p50_ms"] = round(percentiles(time_calls(lambda i: path(x), reps, warmup=20))[0], 3)
    print(json.dumps({"connector": result}), flush=True)
    return result


@torch.no_grad()
def encoder_comparison(names: list[str], reps: int) -> dict[str, float]:
    """p50 ms of one caption through each text tower (load, tokenise, encode, pool), interleaved in one loop
    after 5 discarded rounds, so a busy machine slows every tower alike."""
    from omnimoe.encoders import load_encoder

    encoders = {name: load_encoder(name) for name in names}
    calls = {
        name: lambda i, enc=enc: enc.encode([enc.load_item(CAPTIONS[i % len(CAPTIONS)])])
        for name, enc in encoders.items()
    }
    result = p50_interleaved(calls, reps, discard=5)
    print(json.dumps({"text_encoders": result, "threads": torch.get_num_threads()}), flush=True)
    return result


def run(args: argparse.Namespace) -> list[dict]:
    if args.compare_encoders:
        encoder_comparison([n for n in args.compare_encoders.split(",") if n], args.queries)
    connector_comparison(args.queries)
    rows = index_rows(args)
    if not args.no_http:
        rows += http_rows(args)
    if args.out:
        write_json(args.out, rows)
    print(
        "\n| n | method | prior | path | p50 ms | p99 ms | errors | recall@10 | coalesce |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['n']} | {r['method']} | {r.get('prior', '')} | {r['path']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('recall@10', '')} | {r.get('coalesce', '')} |"
        )
    return rows


if __name__ == "__main__":
    run(parse_args())
