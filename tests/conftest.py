"""Shared fixtures: the quick demo run (real Tux Paint data, real encoders, trained connectors), made once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``omnimoe demo --quick`` once per test session: (run folder, the finished process)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "omnimoe.cli", "demo", "--quick", "--out", str(out)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
