"""Uni-MoE evaluation pieces that need no LLM: probe ceilings and the aggregation of demo runs over seeds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnimoe.demos.unimoe import BLIND, PROBE, aggregate_seeds, grade_chat
from omnimoe.mllm.probe import category_probe, yesno_probe

ROOT = Path(__file__).resolve().parents[1]


def _clusters(n, classes, dim, seed, noise=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, dim, generator=g), [f"c{i}" for i in y.tolist()]


def test_category_probe_reads_what_the_features_hold():
    xtr, ytr = _clusters(300, 5, 16, 0)
    xte, yte = _clusters(100, 5, 16, 1)
    groups = [str(i) for i in range(300)]
    res = category_probe(xtr, ytr, xte, yte, groups)
    assert res["score"] > 0.9 and res["n"] == 100 and res["weight_decay"] > 0
    shuffled = xte[torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    with_control = category_probe(xtr, ytr, xte, yte, groups, control_x=shuffled)
    assert with_control["control"] < 0.45  # features of other rows: near chance (0.2)
    assert {k: v for k, v in with_control.items() if k != "control"} == res  # seeded; the control changes nothing else


def test_yesno_probe_learns_a_match_between_media_and_phrase():
    """ "Is this <phrase>?" is yes when the phrase names the item's class: a bilinear probe learns the match
    for phrases it never saw; a linear one on media alone could not beat chance."""
    g = torch.Generator().manual_seed(0)
    names = torch.randn(40, 12, generator=g)  # 40 phrase embeddings; test phrases are classes 30-39

    def make(classes, n, seed):
        gen = torch.Generator().manual_seed(seed)
        c = torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)]
        asked = torch.where(
            torch.rand(n, generator=gen) < 0.5,
            c,
            torch.tensor(classes)[torch.randint(0, len(classes), (n,), generator=gen)],
        )
        x = names[c] @ torch.randn(12, 20, generator=torch.Generator().manual_seed(7)) + 0.1 * torch.randn(
            n, 20, generator=gen
        )
        return x, names[asked] + 0.05 * torch.randn(n, 12, generator=gen), (c == asked).tolist()

    xtr, ttr, ytr = make(list(range(30)), 600, 1)
    xte, tte, yte = make(list(range(30, 40)), 200, 2)
    res = yesno_probe(xtr, ttr, ytr, xte, tte, yte, [str(i) for i in range(600)])
    assert res["score"] > 0.75, res
    majority = max(sum(yte), len(yte) - sum(yte)) / len(yte)
    assert res["score"] > majority + 0.1


def _write_run(folder, seed, category, swapped):
    rows = [
        {
            "model": BLIND,
            "stage": "-",
            "task": "image-category",
            "group": "image",
            "score": 0.2,
            "n": 10,
            "swapped": 0.2,
            "seed": seed,
        },
        {
            "model": PROBE,
            "stage": "-",
            "task": "image-category",
            "group": "image",
            "score": 0.8,
            "n": 10,
            "swapped": 0.1,
            "seed": seed,
        },
        {
            "model": PROBE,
            "stage": "-",
            "task": "image-yesno",
            "group": "image",
            "score": 0.5,
            "n": 10,
            "swapped": 0.5,
            "seed": seed,
        },
        {
            "model": "stage3 moe",
            "stage": "3",
            "task": "image-category",
            "group": "image",
            "score": category,
            "n": 10,
            "swapped": swapped,
            "seed": seed,
        },
        {
            "model": "stage3 moe",
            "stage": "3",
            "task": "image-yesno",
            "group": "image",
            "score": 0.5,
            "n": 10,
            "swapped": 0.5,
            "seed": seed,
            "replies": {"yes": 0.6, "no": 0.4},
        },
        {
            "model": "stage3 moe",
            "stage": "3",
            "task": "speech-what",
            "group": "speech",
            "score": 0.1,
            "n": 10,
            "swapped": 0.0,
            "seed": seed,
        },
    ]
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(rows))
    return folder


def test_seeds_aggregate_mean_spread_and_ceiling_relative_spread(tmp_path):
    runs = [_write_run(tmp_path / "s0", 0, 0.6, 0.1), _write_run(tmp_path / "s1", 1, 0.4, 0.3)]
    agg = aggregate_seeds(runs)
    cell = agg["cells"]["stage3 moe | image-category"]
    assert (
        cell["score"]["mean"] == pytest.approx(0.5)
        and cell["score"]["std"] == pytest.approx(0.1)
        and cell["seeds"] == [0, 1]
    )
    assert cell["swapped"]["mean"] == pytest.approx(0.2)
    assert agg["cells"]["stage3 moe | image-yesno"]["yes_share"]["mean"] == pytest.approx(0.6)
    spread = agg["spread"]["stage3 moe"]
    assert spread["max_min"] == pytest.approx(0.5 - 0.1)
    # relative to the ceiling: category 0.5 / 0.8 = 0.625, yes/no 0.5 / 0.5 = 1.0 (speech has no ceiling)
    assert spread["relative_to_ceiling"]["max_min"] == pytest.approx(0.375)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "omnimoe.cli",
            "mllm",
            "seeds",
            str(runs[0]),
            str(runs[1]),
            "--out",
            str(tmp_path / "agg.json"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "| stage3 moe | 2 | 0.500 ± 0.100 (0.200)" in done.stdout and "[yes 0.60]" in done.stdout
    assert json.loads((tmp_path / "agg.json").read_text())["spread"]["stage3 moe"]["max_min"] == pytest.approx(0.4)
    bad = subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", "mllm", "seeds", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode != 0 and "nowhere" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr


def _task_records(split_items, train_items):
    """image-what and image-category records for (source_id, caption, category) triples."""

    def recs(items):
        return [
            r
            for sid, cap, cat in items
            for r in (
                {"task": "image-what", "source_id": sid, "answer": cap},
                {"task": "image-category", "source_id": sid, "answer": cat},
            )
        ]

    return recs(split_items), recs(train_items)


def test_chat_grading_names_object_and_its_category(tmp_path):
    held, train = _task_records(
        [("v/bus", "A bus.", "vehicles"), ("h/pen", "A pencil.", "household")],
        [("v/truck", "A truck.", "vehicles"), ("a/cat", "A big red cat.", "animals")],
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "test.json").write_text(json.dumps(held))
    (tasks / "stage3.json").write_text(json.dumps(train))
    rows = [
        {"answer": "a TRUCK", "caption": "A bus.", "category": "vehicles"},  # another object of its category
        {"answer": "A bus!", "caption": "A bus.", "category": "vehicles"},  # its own caption, normalised
        {"answer": "A big red cat.", "caption": "A pencil.", "category": "household"},  # a known object, wrong category
        {"answer": "A shiny thing.", "caption": "A pencil.", "category": "household"},
    ]  # names nothing known
    g = grade_chat(rows, tasks, "test")
    assert [(r["named"], r["named_category"]) for r in g] == [
        ("A truck.", "vehicles"),
        ("A bus.", "vehicles"),
        ("A big red cat.", "animals"),
        (None, None),
    ]
    assert [r["right_object"] for r in g] == [False, True, False, False]
    assert [r["right_category"] for r in g] == [True, True, False, False]
    # the seeds aggregate counts them per run
    run = _write_run(tmp_path / "s0", 0, 0.6, 0.1)
    (run / "tasks").mkdir()
    for name in ("test.json", "stage3.json"):
        (run / "tasks" / name).write_text((tasks / name).read_text())
    (run / "chat.json").write_text(json.dumps(rows))
    (run / "summary.json").write_text(json.dumps({"seed": 0, "held_out": "test"}))
    assert aggregate_seeds([run])["chat"] == [
        {"run": str(run), "seed": 0, "n": 4, "right_object": 1, "right_category": 2}
    ]
