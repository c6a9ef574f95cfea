"""The CLI through real subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

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
    dense, moe = result["rows"][0], result["rows"][1]
    assert moe["test_mse"] < dense["test_mse"] and moe["routing_purity"] > 0.9  # even after 40 steps


@pytest.mark.slow
def test_moe_example_backs_the_readme_claim(tmp_path):
    """The README says: at equal compute per token the MoE nearly halves the dense MLP's error, and each
    cluster gets its own expert unsupervised. The default run (about a minute) must show it."""
    out = omnimoe("moe", "example", "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    dense, moe, upcycled = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert moe["test_mse"] < 0.7 * dense["test_mse"], (moe["test_mse"], dense["test_mse"])
    assert moe["routing_purity"] > 0.95 and upcycled["test_mse"] < dense["test_mse"]


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
    # recall values: text->image through the label prior, alone and fused with each connector, far above the
    # chance of the held-out split (its size; captions are unique there). At this size (240 steps on a slice)
    # the connectors alone are near chance; test_trainer and test_align_pipeline check that training learns.
    t2i = {(r["method"], r["head"]): r for r in rows if (r["query"], r["target"]) == ("text", "image")}
    chance = 1 / t2i[("label-prior", "prior")]["n"]
    assert t2i[("label-prior", "prior")]["R@1"] > 5 * chance
    for method in ("linear", "moe-alternating"):
        assert t2i[(method, "contrastive+prior")]["R@1"] > 5 * chance, t2i[(method, "contrastive+prior")]
        assert t2i[(method, "contrastive")]["R@10"] >= 10 * chance, t2i[(method, "contrastive")]
    assert "text <-> image" in out.stdout and "mean R@1" in out.stdout and "moe-alternating + prior" in out.stdout
    for name in ("recall.png", "training_curves.png", "expert_load_moe-alternating.png"):
        assert (run / name).is_file()
    # the index is built for what validation chose (method and head), and the report says which
    chosen = json.loads((run / "summary.json").read_text())["chosen"]
    fused = chosen["head"] == "contrastive+prior"
    served = chosen["method"] + (" + label prior" if fused else "")
    assert f"Retrieval index ({served} (chosen on validation))" in out.stdout and "text->image for" in out.stdout
    folder = chosen["method"] + ("+prior" if fused else "")
    assert (run / "index" / folder / "text-to-image" / "index.faiss").is_file()
    # the example queries: one held-out item drawn at random with a fixed seed (not the first one)
    import random

    from omnimoe.data.manifest import read_manifest

    manifest = run / json.loads((run / "summary.json").read_text())["manifest"]
    test = [r for r in read_manifest(manifest) if r.get("split") == "test" and r.get("text") and r.get("image")]
    assert f"text->image for {random.Random(0).choice(test)['text']!r}" in out.stdout
    assert {p.name for p in (run / "connectors").iterdir()} == {"linear", "moe-alternating"}
    from omnimoe.demos.altmoe import QUICK_ENCODERS

    assert json.loads((run / "summary.json").read_text())["encoders"] == QUICK_ENCODERS  # the smallest towers


@pytest.mark.slow
def test_mllm_tasks_writes_capped_disjoint_task_files(tmp_path):
    """`omnimoe mllm tasks` as a user runs it: no --manifest, so it writes the Tux Paint manifest beside --out (the
    stamps fetched into the cache; speech synthesised where espeak-ng is), then the task files. It prints each
    file's record count; the files hold those records, in the record contract, capped per task, on disjoint
    splits, and are the files the library writes."""
    from collections import Counter

    from conftest import require_tuxpaint

    from omnimoe.data.adapters import normalise_caption
    from omnimoe.data.manifest import read_manifest
    from omnimoe.demos.unimoe import eval_subset
    from omnimoe.mllm.tasks import ALIGN_TASKS, INSTRUCT_TASKS, PLACEHOLDERS, TASKS, build_tuxpaint_tasks

    require_tuxpaint()  # only a fetch failure may skip, and not under OMNIMOE_REQUIRE_DATA
    out = tmp_path / "unimoe" / "tasks"
    cap, per_eval, seed = 6, 2, 3
    args = ["--max-per-task", str(cap), "--eval-per-task", str(per_eval), "--val-fraction", "0.2", "--seed", str(seed)]
    done = omnimoe("mllm", "tasks", "--out", str(out), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    names = ["stage1.json", "stage2-image.json", "stage2-speech.json", "stage2-sound.json", "stage3.json", "test.json"]
    assert sorted(printed) == sorted([*names, "val.json"])
    files = {name: json.loads((out / name).read_text()) for name in printed}
    assert {name: len(recs) for name, recs in files.items()} == printed and all(printed.values())
    manifest = tmp_path / "unimoe" / "data" / "manifest.jsonl"
    split_of = {r["id"]: r["split"] for r in read_manifest(manifest)}
    described = json.loads((out / "tasks.json").read_text())
    assert (out / described["manifest"]).resolve() == manifest.resolve()
    counts = described["counts"]
    assert counts["files"] == printed
    assert [counts["seed"], counts["max_per_task"], counts["val_fraction"]] == [seed, cap, 0.2]

    # every record: a known task of its group, its media file there, one placeholder, the answer as the reply
    for name, recs in files.items():
        assert len({r["id"] for r in recs}) == len(recs), name
        for r in recs:
            spec = TASKS[r["task"]]
            assert r["group"] == spec["group"] and (spec["stage"] == "align") == (r["task"] in ALIGN_TASKS)
            (field,) = [f for f in PLACEHOLDERS if f in r]
            assert (out / r[field]).is_file() and field == ("image" if r["group"] == "image" else "audio"), r
            human, gpt = r["conversations"]
            assert human["value"].startswith(PLACEHOLDERS[field] + "\n"), r
            assert {f: human["value"].count(p) for f, p in PLACEHOLDERS.items()} == {
                f: f == field for f in PLACEHOLDERS
            }
            assert gpt == {"from": "gpt", "value": r["answer"]} and r["source_id"] in split_of
            assert ("choices" in r) == (spec["kind"] == "closed")
    # capped per task and split; stage 1 = the alignment pairs + every instruction record of stage 3 = stage 2
    train = files["stage1.json"]
    for name in ("stage1.json", "test.json", "val.json"):
        per_task = Counter(r["task"] for r in files[name])
        assert set(per_task) == set(INSTRUCT_TASKS) | (set(ALIGN_TASKS) if name == "stage1.json" else set())
        assert max(per_task.values()) <= cap and per_task["image-what"] == cap, (name, per_task)
    yes_no = Counter(r["answer"] for r in files["test.json"] if r["task"] == "image-yesno")
    assert yes_no == {"Yes.": cap // 2, "No.": cap // 2}
    stage2 = [r for g in ("image", "speech", "sound") for r in files[f"stage2-{g}.json"]]
    assert sorted(r["id"] for r in files["stage3.json"]) == sorted(r["id"] for r in stage2)
    assert {r["id"] for r in train if r["task"] in INSTRUCT_TASKS} == {r["id"] for r in stage2}
    # disjoint splits: test items from the manifest's test split, val and train items from its train split, no
    # item and no caption in two of them
    items = {name: {r["source_id"] for r in files[name]} for name in ("stage1.json", "val.json", "test.json")}
    assert {split_of[i] for i in items["test.json"]} == {"test"}
    assert {split_of[i] for i in items["stage1.json"] | items["val.json"]} == {"train"}
    assert not items["stage1.json"] & items["val.json"] and not items["stage1.json"] & items["test.json"]
    assert not items["val.json"] & items["test.json"]
    captions = {
        name: {normalise_caption(r["answer"]) for r in files[name] if r["task"] in ("image-what", "caption-image")}
        for name in items
    }
    assert not captions["stage1.json"] & (captions["val.json"] | captions["test.json"])
    # test-eval.json: at most --eval-per-task records of each test task, taken from test.json unchanged
    subset = json.loads((out / "test-eval.json").read_text())
    assert Counter(r["task"] for r in subset) == {t: per_eval for t in INSTRUCT_TASKS}
    assert all(r in files["test.json"] for r in subset)

    # the command writes what the library writes from that manifest
    lib = out.parent / "lib"  # beside --out: the same relative media paths
    assert build_tuxpaint_tasks(manifest, lib, seed=seed, max_per_task=cap, val_fraction=0.2) == counts
    eval_subset(lib, per_eval, seed)
    for name in [*printed, "test-eval.json"]:
        assert (lib / name).read_text() == (out / name).read_text(), name

    bad = omnimoe("mllm", "tasks", "--out", str(tmp_path / "bad"), "--manifest", str(manifest), "--val-fraction", "1")
    assert bad.returncode == 2 and "val_fraction" in bad.stderr


def test_mllm_tasks_names_a_bad_manifest(tmp_path):
    from omnimoe.cli import app

    result = CliRunner().invoke(
        app, ["mllm", "tasks", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "none.jsonl does not exist" in result.output, result.output
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    result = CliRunner().invoke(
        app, ["mllm", "tasks", "--manifest", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "t")]
    )
    assert result.exit_code == 2 and "bad.jsonl" in result.output and "Traceback" not in result.output, result.output
