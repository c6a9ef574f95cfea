"""The Uni-MoE demo's --held-out val form (choosing a recipe: the validation split carved from train is scored,
the test split is never read), as a user runs it. Apart from test_mllm_demo.py so that the two demo runs,
the longest tests, run side by side under `make test`'s two workers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TASKS = {"image-what", "image-category", "image-yesno", "speech-what", "sound-what"}


def test_unimoe_demo_quick_on_the_validation_split(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    tasks = TASKS
    val = tmp_path / "val"
    done = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "mllm", "demo", "--quick", "--held-out", "val", "--out", str(val)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    val_records = json.loads((val / "tasks" / "val.json").read_text())
    trained = {r["source_id"] for r in json.loads((val / "tasks" / "stage1.json").read_text())}
    assert val_records and not trained & {r["source_id"] for r in val_records}
    per_task = {t: sum(r["task"] == t for r in val_records) for t in tasks}
    rows = json.loads((val / "results.json").read_text())
    assert all(r["n"] == per_task[r["task"]] for r in rows if r["stage"] == "3")
    assert {c["id"] for c in json.loads((val / "chat.json").read_text())} <= {r["source_id"] for r in val_records}
    assert not (val / "tasks" / "test-eval.json").exists()
    wrong = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "mllm", "demo", "--quick", "--out", str(val)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert wrong.returncode == 2 and "held_out=val" in wrong.stderr and "another output folder" in wrong.stderr
