"""The benchmarks run (quick forms) and write the JSON their docs promise. No timing is asserted here."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_moe_layer_benchmark_quick(tmp_path):
    bench = load("moe_layer")
    out = tmp_path / "moe.json"
    rows = bench.run(bench.parse_args(["--quick", "--check", "--out", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    methods = {r["method"] for r in rows}
    assert methods == {"grouped_mm", "loop", "hf-eager", "dense-all-experts", "dense-equal-flops", *bench.BF16_WEIGHTS}
    assert {r["dtype"] for r in rows if r["method"] in bench.BF16_WEIGHTS} == {"bfloat16"}
    assert {r["shape"] for r in rows} == {"a", "b", "c"} and {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert all(0 < r["train_ms_min"] <= r["train_ms"] <= r["train_ms_max"] and r["forward_ms"] > 0 for r in rows)
    curves = tmp_path / "curves.json"
    bench.write_curves(bench.training_curves(bench.QUICK_SHAPES["b"], 5, 0), str(curves))
    written = json.loads(curves.read_text())
    assert written["steps"] == 5 and len(written["float32"]) == len(written["bfloat16"]) == 5
    assert curves.with_suffix(".png").stat().st_size > 1000


@pytest.mark.slow
def test_extract_benchmark_quick(tmp_path):
    bench = load("extract")
    out = tmp_path / "extract.json"
    rows = bench.main(["--quick", "--out", str(out)])
    assert [set(r) >= {"encoder", "items", "bare_items_per_s", "pipeline_items_per_s"} for r in rows] == [True]
    assert json.loads(out.read_text())[0]["encoder"] == "minilm"


@pytest.mark.slow
def test_retrieval_benchmark_quick(tmp_path):
    bench = load("retrieval")
    out = tmp_path / "retrieval.json"
    rows = bench.run(bench.parse_args(["--quick", "--out", str(out)]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert all({"n", "method", "path", "p50_ms", "p99_ms", "errors"} <= set(r) for r in rows)
    assert {(r["method"], r["path"]) for r in rows if r["path"] != "http"} == {
        (m, p) for m in ("faiss-flat", "faiss-ivf", "faiss-hnsw", "torch") for p in ("search", "text-query")
    }
    http = [r for r in rows if r["path"] == "http"]
    assert [r["coalesce"] for r in http] == [True, False] and all(
        r["errors"] == 0 and r["requests"] == 200 for r in http
    )
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert all(0.5 <= r["recall@10"] <= 1 for r in rows if "recall@10" in r)


@pytest.mark.slow
def test_retrieval_benchmark_with_the_prior_side_by_side():
    bench = load("retrieval")
    rows = bench.run(bench.parse_args(["--quick", "--no-http", "--prior", "--methods", "faiss-flat"]))
    assert sorted((r["prior"], r["path"]) for r in rows) == [
        (False, "search"),
        (False, "text-query"),
        (True, "search"),
        (True, "text-query"),
    ]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] for r in rows)
    assert {r["text_encoder"] for r in rows} == {"minilm"}
    towers = bench.encoder_comparison(["minilm", "minilm"], 3)  # one name timed once, whatever the list repeats
    assert list(towers) == ["minilm_p50_ms"] and towers["minilm_p50_ms"] > 0


def test_align_loss_benchmark_quick(tmp_path):
    bench = load("align_loss")
    out = tmp_path / "loss.json"
    rows = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [r["batch"] for r in rows] == [128, 256] and all(
        r["bf16_logits_ms"] > 0 and r["float32_logits_ms"] > 0 for r in rows
    )


def test_float32_logits_differ_from_bf16_logits_only_by_rounding():
    """The switch the benchmark compares is real: under bf16 autocast the two losses differ, slightly."""
    import torch

    from omnimoe.align.losses import info_nce

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    exact = info_nce(q, k, 20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32, bf16 = info_nce(q, k, 20.0), info_nce(q, k, 20.0, float32_logits=False)
    assert fp32.dtype == torch.float32 and torch.allclose(fp32, exact, atol=1e-5)
    assert not torch.equal(bf16, exact) and torch.allclose(bf16, exact, rtol=0.05)


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu_check.sh end to end with DEVICE=cpu QUICK=1: every step runs and passes (the CUDA tests
    skip without a GPU), and the summary reads the files the steps wrote."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu"
    env = {**os.environ, "DEVICE": "cpu", "QUICK": "1", "PY": sys.executable}
    done = subprocess.run(
        ["benchmarks/gpu_check.sh", str(out)], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [line.split()[:2] for line in (out / "steps.txt").read_text().splitlines()]
    assert steps == [["hardware", "rc=0"], ["cuda-tests", "rc=0"], ["moe-layer", "rc=0"], ["mllm", "rc=0"]]
    summary = (out / "summary.md").read_text()
    tests = summary.split("CUDA tests: ")[1].split("\n")[0]
    assert tests.startswith("5 run, 0 failed, 0 errors, 5 skipped"), tests  # no GPU here
    layer = json.loads((out / "moe_layer.json").read_text())
    assert {r["dtype"] for r in layer} == {"float32", "bfloat16"} and all(r["device"].startswith("CPU") for r in layer)
    assert "| moe | " in summary and len(json.loads((out / "mllm.json").read_text())) == 3


def test_token_inputs_benchmark_quick(tmp_path):
    bench = load("token_inputs")
    out = tmp_path / "tokens.json"
    result = bench.main(["--quick", "--pools", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["variant"] for r in result["rows"]] == ["pooled", "tokens (all)", "tokens, pool 8"]
    assert result["rows"][0]["ratio_to_pooled"] == 1.0 and all(r["median_ms"] > 0 for r in result["rows"])
    splits, latents, tokens = bench.demo_sized_data()
    assert tokens["image"][0].shape == (701, 49, 1280) and 6 <= int(tokens["text"][1].sum(1).min())


def test_encoder_weights_benchmark_quick(tmp_path):
    bench = load("encoder_weights")
    out = tmp_path / "weights.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["bit_identical"] is True and result["encoder"] == "minilm"
    assert result["bf16_weights_ms"] > 0 and result["float32_weights_ms"] > 0 and result["speedup"] > 0
