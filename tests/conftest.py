"""Shared fixtures: the quick demo run (real Tux Paint data, real encoders, trained connectors) and the Tux
Paint manifest, each made once per session; the Tux Paint stamps, which a test may skip without only where
they cannot be fetched and CI does not require them (``OMNIMOE_REQUIRE_DATA=1``: a fetch failure fails the
test); and the one tiny causal-LM shape the unit tests build (no download)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """``omnimoe demo --quick`` once per ``make test``: (this session's copy of the run folder, the finished process).

    The run is made once for all pytest-xdist workers (in the folder their temporary folders share, under a file
    lock); each session gets a private copy, so tests that write into the run cannot meet another worker's."""
    from filelock import FileLock

    # The run's manifest points at the cached stamps by a relative path, so the shared run and the copies sit at
    # the same depth: <base>/demo-shared/demo and <base>/demo0/demo, where under xdist <base> is the worker's
    # temporary folder, and the shared run goes into the folder the workers' folders share.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent / "demo-shared" / "run" if os.environ.get("PYTEST_XDIST_WORKER") else base / "demo-shared"
    record = shared / "process.json"
    shared.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        if not record.exists():
            shutil.rmtree(shared / "demo", ignore_errors=True)  # what an interrupted earlier attempt left
            shared.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            # a relative --out from another working directory, as `make demo` runs it (paths in the run must not
            # depend on it)
            args = [sys.executable, "-m", "omnimoe.cli", "demo", "--quick", "--out", "demo"]
            try:
                done = subprocess.run(args, capture_output=True, text=True, cwd=shared, env=env, timeout=840)
            except BaseException as exc:  # timed out or interrupted: the other workers fail at once, not again
                record.write_text(json.dumps({"args": args, "returncode": -1, "stdout": "", "stderr": repr(exc)}))
                raise
            fields = {"args": done.args, "returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}
            record.write_text(json.dumps(fields))
    done = subprocess.CompletedProcess(**json.loads(record.read_text()))
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path_factory.mktemp("demo") / "demo"
    shutil.copytree(shared / "demo", out)
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


@pytest.fixture(scope="session")
def tuxpaint_manifest(tmp_path_factory):
    """The Tux Paint manifest (images, captions, sound effects, and spoken captions where espeak-ng is here),
    built once per session: ``(manifest path, stats)``."""
    from omnimoe.data.tuxpaint import build_tuxpaint_manifest

    require_tuxpaint()
    espeak = shutil.which("espeak-ng") is not None
    return build_tuxpaint_manifest(tmp_path_factory.mktemp("tux") / "tux", synthesize_speech=espeak)


# The tests' tiny causal LM: the library's own tiny config (omnimoe.mllm.llm.tiny_config) at this size.
TINY_LLM = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "layers": 4}


def tiny_llm(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``family`` causal LM (llama, qwen2, mistral, gemma3) of :data:`TINY_LLM`'s size."""
    from transformers import AutoModelForCausalLM

    from omnimoe.mllm.llm import tiny_config

    torch.manual_seed(seed)
    config = tiny_config(family, TINY_LLM["vocab_size"], TINY_LLM["hidden_size"], TINY_LLM["layers"])
    assert config.intermediate_size == TINY_LLM["intermediate_size"]
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


# The tests' Uni-MoE recipe: that tiny LM family through the training stages, a few float32 steps
# (MLLMTrainConfig fields; tests override what they vary).
TINY_RECIPE = dict(
    llm="tiny:llama",
    tiny_layers=2,
    steps=4,
    batch_size=3,
    warmup_steps=1,
    save_every=2,
    log_every=2,
    dtype="float32",
    eval_max_new_tokens=4,
    connectors={
        "image": {"kind": "mlp", "max_tokens": 8},
        "audio": {"kind": "qformer", "num_queries": 4, "num_heads": 4},
    },
)


# Run first: the longest test files (the Uni-MoE demo on the real models, minutes each) start one on each
# worker, then both work through the rest (make test runs two pytest-xdist workers, a file per worker at a
# time).
FIRST = ("test_mllm_demo.py", "test_mllm_demo_val.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest keep their order
