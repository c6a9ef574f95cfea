"""Shared fixtures: the quick demo run (real Tux Paint data, real encoders, trained connectors), made once;
the Tux Paint stamps, which a test may skip without only where they cannot be fetched and CI does not
require them (``OMNIMOE_REQUIRE_DATA=1``: a fetch failure fails the test)."""

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
    done = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "demo", "--quick", "--out", out.name],
        capture_output=True,
        text=True,
        cwd=out.parent,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def require_tuxpaint() -> None:
    """Fetch the Tux Paint stamps (cached). Only a fetch failure may skip, and not under OMNIMOE_REQUIRE_DATA."""
    from omnimoe.data.tuxpaint import fetch_tuxpaint

    try:
        fetch_tuxpaint()
    except RuntimeError as exc:  # no cache, and no apt-get/dpkg or no archive
        if os.environ.get("OMNIMOE_REQUIRE_DATA"):
            pytest.fail(f"Tux Paint cannot be fetched and OMNIMOE_REQUIRE_DATA is set: {exc}")
        pytest.skip(f"Tux Paint cannot be fetched here: {exc}")
