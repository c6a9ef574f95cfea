"""Shared fixtures: the quick demo run (real Tux Paint data, real encoders, trained connectors), made once."""

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``omnimoe demo --quick`` once per test session: (run folder, the finished process)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # a relative --out from another working directory, as `make demo` runs it (paths in the run must not depend on it)
    done = subprocess.run([sys.executable, "-m", "omnimoe.cli", "demo", "--quick", "--out", out.name], capture_output=True,
                          text=True, cwd=out.parent, env=env, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done
