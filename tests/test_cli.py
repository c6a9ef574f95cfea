"""The CLI through real subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def omnimoe(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env=env,
        timeout=600,
    )


def test_info_json():
    out = omnimoe("info", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["torch"].startswith("2.")
    assert set(data) >= {"omnimoe", "cpu_capability", "grouped_mm_cpu_bf16"}


@pytest.mark.slow
def test_moe_example_quick_end_to_end(tmp_path):
    out = omnimoe("moe", "example", "--quick", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["model"].split()[0] for r in result["rows"]] == ["dense", "MoE", "MoE"]
    assert result["reload_identical"] is True
    for name in result["plots"]:
        assert (tmp_path / "run" / name).stat().st_size > 10_000
    assert (tmp_path / "run" / "moe_layer" / "model.safetensors").is_file()
    assert "test MSE" in out.stdout


def test_example_rejects_bad_override(tmp_path):
    out = omnimoe("moe", "example", "--quick", "--out", str(tmp_path), "--set", "num_expert=3")
    assert out.returncode == 2
    assert "num_expert" in out.stderr and "known:" in out.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_altmoe_demo_quick(demo_run):
    """The README's main job in its quick form: Tux Paint, three encoders, two methods, held-out recall, and
    the retrieval index of the Alt-MoE connector."""
    run, out = demo_run
    rows = json.loads((run / "results.json").read_text())
    modalities = {r["query"] for r in rows} | {r["target"] for r in rows}
    assert modalities >= {"text", "image", "sound"}  # speech too when espeak-ng or recordings are there
    assert {r["method"] for r in rows} == {
        "linear",
        "moe-alternating",
        "label-prior",
    }  # label-prior: EfficientNet's own classifier
    assert {r["head"] for r in rows} == {"contrastive", "regression", "prior", "contrastive+prior"}
    assert "text <-> image" in out.stdout and "mean R@1" in out.stdout and "moe-alternating + prior" in out.stdout
    for name in ("recall.png", "training_curves.png", "expert_load_moe-alternating.png"):
        assert (run / name).is_file()
    assert "Retrieval index (moe-alternating)" in out.stdout and "text->image for" in out.stdout
    assert (run / "index" / "moe-alternating" / "text-to-image" / "index.faiss").is_file()
    assert {p.name for p in (run / "connectors").iterdir()} == {"linear", "moe-alternating"}
