"""The Uni-MoE demo on the real embedded models (Gemma-3-270M, EfficientNet-Lite0, Whisper-tiny) and Tux
Paint, in its --quick form, as a user runs it: every stage, both stage-3 models, scores, plots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_unimoe_demo_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "mllm", "demo", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    tasks = {"image-what", "image-category", "image-yesno", "speech-what", "sound-what"}
    for model in ("blind (most frequent answer)", "stage1 (connectors)", "stage3 moe", "stage3 dense-equal-active"):
        got = {r["task"] for r in rows if r["model"] == model}
        assert got == tasks, (model, got)
    held_out = json.loads((tmp_path / "tasks" / "test.json").read_text())
    per_task = {t: sum(r["task"] == t for r in held_out) for t in tasks}
    for r in rows:
        assert {"model", "stage", "task", "score", "n", "swapped", "seed"} <= set(r) and r["seed"] == 0, r
        if r["stage"] == "3":  # every held-out record, each also scored with swapped media
            assert r["n"] == per_task[r["task"]] and r["swapped"] is not None
            assert abs(r["seeing_gain"] - (r["score"] - r["swapped"])) < 1e-9
    yesno = next(r for r in rows if r["model"] == "stage3 moe" and r["task"] == "image-yesno")
    assert abs(sum(yesno["replies"].values()) - 1) < 1e-9 and set(yesno["replies"]) <= {"yes", "no", "none"}
    probe = {r["task"]: r for r in rows if r["model"].startswith("probe ceiling")}
    assert set(probe) == {"image-category", "image-yesno"} and all(r["n"] == per_task[t] for t, r in probe.items())
    nearest = {r["task"]: r for r in rows if r["model"].startswith("nearest training answer")}
    oracle = {r["task"]: r for r in rows if r["model"].startswith("best training answer")}
    assert set(nearest) == set(oracle) == {"image-what", "speech-what", "sound-what"}
    assert all(oracle[t]["score"] >= nearest[t]["score"] and oracle[t]["swapped"] == oracle[t]["score"] for t in oracle)
    blind = {r["task"]: r for r in rows if r["model"].startswith("blind")}
    assert all(r["swapped"] == r["score"] for r in blind.values())
    chats = json.loads((tmp_path / "chat.json").read_text())
    assert len(chats) == 2 and all(c["answer"] and c["caption"] and Path(c["image"]).is_file() for c in chats)
    assert "| stage3 moe |" in done.stdout and "spread" in done.stdout and "swapped" in done.stdout
    config = json.loads((tmp_path / "stage3-moe" / "model" / "config.json").read_text())
    sources = next(iter(config["expert_sources"].values()))
    assert sources[0] == "base:gemma3-270m" and sorted(s.split(":")[1] for s in sources[1:]) == [
        "image",
        "sound",
        "speech",
    ]
    assert config["moe_layers"] == list(range(0, 18, 2)) and str(tmp_path) not in json.dumps(config)
    load = json.loads((tmp_path / "stage3-moe" / "expert_load.json").read_text())
    assert set(load) == {"image", "speech", "sound"} and all(
        abs(sum(v) - 1) < 1e-5 for g in load.values() for v in g.values()
    )
    assert (tmp_path / "scores.png").stat().st_size > 1000 and (tmp_path / "expert_load.png").stat().st_size > 1000
    assert (tmp_path / "chat.png").stat().st_size > 1000
    prealigned = json.loads((tmp_path / "stage1" / "stage.json").read_text())["prealign"]
    assert set(prealigned["items"]) == {"image", "audio"} and prealigned["history"][-1]["step"] == 5
