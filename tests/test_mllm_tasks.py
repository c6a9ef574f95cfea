"""Uni-MoE task files from the real Tux Paint manifest (omnimoe.mllm.tasks), and the task metrics."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from omnimoe.data.adapters import normalise_caption
from omnimoe.data.manifest import read_manifest
from omnimoe.mllm.metrics import closed_correct, normalise_answer, resolve_choice, score, summarise, token_f1
from omnimoe.mllm.model import PLACEHOLDERS as MODEL_PLACEHOLDERS
from omnimoe.mllm.tasks import (
    ALIGN_TASKS,
    GROUPS,
    INSTRUCT_TASKS,
    PLACEHOLDERS,
    TASKS,
    build_tuxpaint_tasks,
    noun_phrase,
)

FILES = ("stage1.json", "stage2-image.json", "stage2-speech.json", "stage2-sound.json", "stage3.json", "test.json")
TRAIN_FILES = FILES[:-1]


@pytest.fixture(scope="module")
def manifest(tuxpaint_manifest):
    """The session's Tux Paint manifest (spoken captions synthesised when espeak-ng is here)."""
    return tuxpaint_manifest


@pytest.fixture(scope="module")
def built(manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("tasks") / "tasks"
    counts = build_tuxpaint_tasks(manifest[0], out, seed=0)
    return out, counts, {name: json.loads((out / name).read_text()) for name in FILES}


def _media(rec):
    return [f for f in PLACEHOLDERS if f in rec]


def test_files_and_counts(manifest, built):
    out, counts, files = built
    assert PLACEHOLDERS == {k: MODEL_PLACEHOLDERS[k] for k in PLACEHOLDERS}
    for name in FILES:
        assert counts["files"][name] == len(files[name]) > 0, name
    described = json.loads((out / "tasks.json").read_text())
    assert {t["name"] for t in described["tasks"]} == set(TASKS)
    assert all({"name", "group", "kind", "metric"} <= set(t) for t in described["tasks"])
    # stage 1 teaches what the media show: the alignment pairs and every train instruction record, mixed
    assert {r["task"] for r in files["stage1.json"]} == set(ALIGN_TASKS) | set(INSTRUCT_TASKS)
    assert {r["id"] for r in files["stage1.json"]} >= {r["id"] for r in files["stage3.json"]}
    assert [r["task"] for r in files["stage1.json"][:50]] != sorted(r["task"] for r in files["stage1.json"][:50])
    assert {r["task"] for r in files["test.json"]} == {r["task"] for r in files["stage3.json"]} == set(INSTRUCT_TASKS)
    for group in GROUPS:
        recs = files[f"stage2-{group}.json"]
        assert {r["group"] for r in recs} == {group}
        assert {r["task"] for r in recs} == {t for t in INSTRUCT_TASKS if TASKS[t]["group"] == group}
    # stage 3 is exactly the stage-2 files mixed: same records, another order
    stage2 = [r for g in GROUPS for r in files[f"stage2-{g}.json"]]
    assert sorted(r["id"] for r in files["stage3.json"]) == sorted(r["id"] for r in stage2)
    assert [r["id"] for r in files["stage3.json"]] != [r["id"] for r in stage2]
    assert sum(counts["tasks"]["train"].values()) == counts["files"]["stage1.json"]
    # the real data: every stamp has an image, speech for all when espeak-ng ran, ~100 sound effects
    recs = read_manifest(manifest[0])
    n_train = sum(r["split"] == "train" for r in recs)
    assert counts["tasks"]["train"]["image-what"] == counts["tasks"]["train"]["caption-image"] == n_train > 400
    assert counts["tasks"]["train"]["sound-what"] == sum(r["split"] == "train" and "sound" in r for r in recs) > 50
    assert counts["tasks"]["test"]["sound-what"] > 5 and counts["tasks"]["test"]["speech-what"] > 5
    assert counts["speech_sources"]["train"].get("recorded", 0) > 20


def test_records_follow_the_contract(built):
    out, _, files = built
    for name, recs in files.items():
        assert len({r["id"] for r in recs}) == len(recs), f"{name}: duplicate ids"
        for r in recs:
            spec = TASKS[r["task"]]
            assert r["group"] == spec["group"] in GROUPS
            media = _media(r)
            assert media == (["image"] if r["group"] == "image" else ["audio"]), r["id"]
            for f in media:
                assert not Path(r[f]).is_absolute() and (out / r[f]).is_file(), (name, r["id"], r[f])
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt" and gpt["value"] == r["answer"]
            for f, ph in PLACEHOLDERS.items():
                assert human["value"].count(ph) == (1 if f in r else 0), (r["id"], human["value"])
                assert ph not in gpt["value"]
            if spec["kind"] == "closed":
                assert any(normalise_answer(c) == normalise_answer(r["answer"]) for c in r["choices"]), r["id"]
            else:
                assert "choices" not in r
    sounds = [r for r in files["stage2-sound.json"]]
    assert all(r["audio"].endswith(".ogg") and "_desc" not in r["audio"] for r in sounds)  # the effect, not speech
    speech = {r["source_id"]: r["audio"] for r in files["stage2-speech.json"]}
    assert all(speech.get(r["source_id"]) != r["audio"] for r in sounds)


def test_no_test_caption_is_a_train_answer(built):
    _, _, files = built

    def open_answers(recs):
        return {normalise_caption(r["answer"]) for r in recs if TASKS[r["task"]]["kind"] == "open"}

    test = open_answers(files["test.json"])
    assert len(test) > 50
    for name in TRAIN_FILES:
        assert not test & open_answers(files[name]), name
        assert not {r["source_id"] for r in files["test.json"]} & {r["source_id"] for r in files[name]}


def test_yesno_balanced_and_categories_closed(manifest, built):
    _, counts, files = built
    for name in ("stage2-image.json", "test.json"):
        yesno = [r for r in files[name] if r["task"] == "image-yesno"]
        answers = Counter(r["answer"] for r in yesno)
        assert set(answers) == {"Yes.", "No."} and abs(answers["Yes."] - answers["No."]) <= 1, answers
        for r in yesno:
            assert r["choices"] == ["yes", "no"]
            caption = next(
                x["answer"] for x in files[name] if x["task"] == "image-what" and x["source_id"] == r["source_id"]
            )
            asks_own = f"Is this {noun_phrase(caption)}?" in r["conversations"][0]["value"]
            assert asks_own == (r["answer"] == "Yes."), r
    categories = sorted({r["category"] for r in read_manifest(manifest[0])})
    assert counts["categories"] == categories and {"animals", "food", "vehicles"} <= set(categories)
    for name in ("stage2-image.json", "test.json"):
        cat = [r for r in files[name] if r["task"] == "image-category"]
        assert cat and all(r["choices"] == categories and r["answer"] in categories for r in cat)
        assert all(", ".join(categories) in r["conversations"][0]["value"] for r in cat)
    assert len({r["answer"] for r in files["test.json"] if r["task"] == "image-category"}) >= 5


def test_deterministic_seeded_and_capped(manifest, built, tmp_path):
    out, counts, files = built
    again = build_tuxpaint_tasks(manifest[0], tmp_path / "again", seed=0)
    assert again == counts
    for name in (*FILES, "tasks.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    other = build_tuxpaint_tasks(manifest[0], tmp_path / "seed1", seed=1)
    assert other["files"] == counts["files"]
    stage3 = json.loads((tmp_path / "seed1" / "stage3.json").read_text())
    assert [r["id"] for r in stage3] != [r["id"] for r in files["stage3.json"]]
    capped = build_tuxpaint_tasks(manifest[0], tmp_path / "capped", seed=0, max_per_task=10)
    for split in ("train", "test"):
        assert all(0 < n <= 10 for n in capped["tasks"][split].values()), capped["tasks"]
    assert capped["tasks"]["train"]["image-what"] == 10
    small = {name: json.loads((tmp_path / "capped" / name).read_text()) for name in FILES}
    full_ids = {r["id"] for r in files["stage3.json"]}
    assert {r["id"] for r in small["stage3.json"]} <= full_ids
    yesno = Counter(r["answer"] for r in small["test.json"] if r["task"] == "image-yesno")
    assert yesno == Counter({"Yes.": 5, "No.": 5})
    assert build_tuxpaint_tasks(manifest[0], tmp_path / "capped2", seed=0, max_per_task=10) == capped
    assert (tmp_path / "capped2" / "test.json").read_bytes() == (tmp_path / "capped" / "test.json").read_bytes()


def test_validation_split(manifest, built, tmp_path):
    """val.json: a grouped share of the train captions, asked the test questions, and in no training file."""
    _, counts, files = built
    assert "val.json" not in counts["files"] and not (built[0] / "val.json").exists()
    out = tmp_path / "val"
    with_val = build_tuxpaint_tasks(manifest[0], out, seed=0, val_fraction=0.2)
    val = json.loads((out / "val.json").read_text())
    assert with_val["files"]["val.json"] == len(val) > 0
    assert {r["task"] for r in val} == set(INSTRUCT_TASKS)
    val_items = {r["source_id"] for r in val}
    captions = {normalise_caption(r["answer"]) for r in val if r["task"] == "image-what"}
    for name in TRAIN_FILES:
        train = json.loads((out / name).read_text())
        assert not val_items & {r["source_id"] for r in train}, name
        assert not captions & {
            normalise_caption(r["answer"]) for r in train if r["task"] in ("image-what", "caption-image")
        }
    # carved from train only: the test split is untouched; train + val = the train split without val
    assert (out / "test.json").read_bytes() == (built[0] / "test.json").read_bytes()
    n_train = {r["source_id"] for r in files["stage3.json"]}
    assert {r["source_id"] for r in json.loads((out / "stage3.json").read_text())} | val_items == n_train
    share = with_val["tasks"]["val"]["image-category"] / counts["tasks"]["train"]["image-category"]
    assert 0.12 < share < 0.28, share
    assert build_tuxpaint_tasks(manifest[0], tmp_path / "again", seed=0, val_fraction=0.2) == with_val
    with pytest.raises(ValueError, match="val_fraction"):
        build_tuxpaint_tasks(manifest[0], tmp_path / "bad", val_fraction=1.0)


def test_noun_phrase():
    assert noun_phrase("A koala.") == "a koala"
    assert noun_phrase("An owl.") == "an owl"
    assert noun_phrase("A baby sheep (a lamb).") == "a baby sheep"
    assert noun_phrase("Mercury—the planet closest to the Sun.") == "mercury"
    assert noun_phrase("A camera.  Say Cheese!") == "a camera"
    assert noun_phrase("A “Stop” sign. Stop here.") == "a Stop sign"
    assert noun_phrase("It's a cep!") == "it's a cep"
    assert noun_phrase("APC tank.") == "APC tank"


# ---- metrics -------------------------------------------------------------------------------------------


def test_normalise_and_token_f1():
    assert normalise_answer("The Koala's!  ") == "koalas"
    assert normalise_answer("A  big,  red   ball.") == "big red ball"
    assert normalise_answer("An “apple”—theory") == "apple theory"  # a dash separates; "the" only as a word
    assert normalise_answer("Grandma’s T-shirt/hat") == "grandmas t shirt hat"
    assert token_f1("A koala.", "a koala") == 1.0
    assert token_f1("a red koala", "A koala.") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert token_f1("koala bear sleeping", "the sleeping koala") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("koala koala", "koala") == pytest.approx(2 / 3)  # a repeated token counts once
    assert token_f1("a dog", "a koala") == 0.0
    assert token_f1("", "A koala.") == 0.0 and token_f1("The.", "a") == 1.0  # both normalise to nothing


def test_closed_correct():
    yn = ["yes", "no"]
    assert closed_correct("Yes, it is.", "Yes.", yn)
    assert closed_correct("yes", "Yes.", yn) and not closed_correct("No.", "Yes.", yn)
    assert closed_correct("No, it is not a koala.", "No.", yn)
    assert closed_correct("I think the answer is no", "No.", yn)
    assert not closed_correct("yes or no", "Yes.", yn) and not closed_correct("Yes/no.", "Yes.", yn)  # hedges
    assert closed_correct("No, no.", "No.", yn)
    assert not closed_correct("maybe", "No.", yn) and not closed_correct("", "No.", yn)
    cats = ["animals", "clothes", "food"]
    assert closed_correct("Animals.", "animals", cats) and closed_correct("It belongs to food.", "food", cats)
    assert not closed_correct("It is food, not clothes.", "food", cats)  # two choices named: ambiguous
    assert not closed_correct("animal", "animals", cats)
    assert resolve_choice("I like ice cream", ["cream", "ice cream"]) == "ice cream"  # the longer mention wins
    assert resolve_choice("Cream pie", ["cream", "ice cream"]) == "cream"
    assert resolve_choice("Not ice cream but cream", ["cream", "ice cream"]) is None


def test_score_by_task_kind():
    open_rec = {"id": "x", "task": "image-what", "group": "image", "answer": "A koala."}
    assert score(open_rec, "a red koala") == pytest.approx(2 / 3)
    closed = {"id": "y", "task": "image-yesno", "group": "image", "answer": "No.", "choices": ["yes", "no"]}
    assert score(closed, "No, it isn't.") == 1.0 and score(closed, "Yes.") == 0.0
    with pytest.raises(ValueError, match="without choices"):
        score({**closed, "choices": []}, "no")
    unknown = {"id": "z", "task": "new-task", "group": "image", "answer": "b", "choices": ["a", "b"]}
    assert score(unknown, "b") == 1.0  # closed: it has choices
    assert score({**unknown, "choices": None, "answer": "koala bear"}, "koala") == pytest.approx(2 / 3)  # open


def test_summarise_spread():
    rows = [{"task": "a", "group": "image", "score": s} for s in (1, 0, 1, 0)]
    rows += [{"task": "b", "group": "image", "score": 1.0}] * 2 + [{"task": "c", "group": "speech", "score": 0.2}]
    s = summarise(rows)
    assert s["tasks"]["a"] == {"mean": 0.5, "n": 4, "group": "image"} and s["tasks"]["c"]["mean"] == pytest.approx(0.2)
    assert s["groups"]["image"]["mean"] == pytest.approx(0.75) and s["groups"]["image"]["n"] == 6  # macro over a, b
    assert s["overall"] == pytest.approx(1.7 / 3) and s["n"] == 7
    assert s["spread"]["max_min"] == pytest.approx(0.8)
    mu = 1.7 / 3
    assert s["spread"]["std"] == pytest.approx(math.sqrt(((0.5 - mu) ** 2 + (1 - mu) ** 2 + (0.2 - mu) ** 2) / 3))
    assert s["group_spread"] == {"max_min": pytest.approx(0.55), "std": pytest.approx(0.275)}
    with pytest.raises(ValueError, match="groups"):
        summarise([{"task": "a", "group": "image", "score": 1}, {"task": "a", "group": "sound", "score": 1}])
    assert summarise([])["overall"] is None
