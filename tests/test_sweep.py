"""Choosing a recipe on validation (omnimoe.align.sweep): the sweep file is checked before any work, the
candidates merge into the run's recipe, and the ranking reads the validation rows only."""

import json

import pytest

from omnimoe.align.config import TrainConfig
from omnimoe.align.sweep import (
    candidate_encoders,
    check_encoder_names,
    load_sweep,
    markdown,
    rank,
    recipe,
    score_run,
    share_training,
    training_key,
)
from omnimoe.config import ConfigError


def write_rows(folder, split_rows):
    folder.mkdir(parents=True)
    for name, rows in split_rows.items():
        (folder / name).write_text(json.dumps(rows))


def rows(method, head, seed, r1s):
    return [
        {"method": method, "head": head, "seed": seed, "query": q, "target": t, "R@1": v}
        for (q, t), v in zip([("text", "image"), ("image", "text")], r1s)
    ]


def test_recipe_merges_flat_and_nested_connector_keys():
    base = TrainConfig(steps=300)
    got = recipe(base, {"dropout": 0.3, "connector": {"hidden_size": 64}, "linear_path": True, "linear_start": True})
    assert got.steps == 300 and got.linear_start and got.connector.dropout == 0.3
    assert got.connector.hidden_size == 64 and got.connector.linear_path
    assert recipe(base, {}) == base
    with pytest.raises(ConfigError, match="candidate 'bad'.*stepz"):
        recipe(base, {"stepz": 3}, "bad")
    with pytest.raises(ConfigError, match="candidate 'x'.*dropout"):
        recipe(base, {"connector": {"dropout": 1.5}}, "x")


def test_candidates_that_differ_after_training_alone_share_their_runs(tmp_path):
    """The training key leaves out the fields read once training is over, and nothing else; sharing links the
    finished runs into a folder that has none, and never touches one that has its own."""
    base, encoders = TrainConfig(), {"text": "minilm", "image": "efficientnet-lite0"}
    key = training_key(base, encoders)
    assert training_key(recipe(base, {"residual_per_direction": False}), encoders) == key
    assert training_key(recipe(base, {"dropout": 0.3}), encoders) != key
    assert training_key(recipe(base, {"linear_start": False}), encoders) != key
    assert training_key(base, {**encoders, "image": "efficientnet-lite1"}) != key
    done = tmp_path / "a"
    for run in ("linear/seed0", "linear/seed1", "moe-alternating/seed0", "moe-alternating/seed1"):
        (done / "runs" / run).mkdir(parents=True)
        (done / "runs" / run / "best.pt").write_bytes(run.encode())
        if run != "moe-alternating/seed1":  # that one is unfinished: never shared
            (done / "runs" / run / "train.json").write_text("{}")
    later = tmp_path / "b"
    (later / "runs" / "linear" / "seed0").mkdir(parents=True)  # a run of its own: kept
    stale = later / "runs" / "linear" / "seed1.sharing"  # left by a sweep killed while sharing
    stale.mkdir()
    (stale / "half").write_text("")
    assert share_training(done, later) == ["linear/seed1", "moe-alternating/seed0"]
    linked = later / "runs" / "moe-alternating" / "seed0" / "best.pt"
    assert linked.read_bytes() == b"moe-alternating/seed0"
    assert linked.stat().st_ino == (done / "runs" / "moe-alternating" / "seed0" / "best.pt").stat().st_ino
    assert not any((later / "runs" / "linear" / "seed0").iterdir())
    assert not stale.exists() and not (later / "runs" / "linear" / "seed1" / "half").exists()
    assert not (later / "runs" / "moe-alternating" / "seed1").exists()
    assert share_training(done, later) == ["linear/seed1", "moe-alternating/seed0"]  # a resumed sweep: the same


def test_a_candidate_replaces_some_encoders_and_names_a_modality_the_run_lacks():
    base = {"text": "minilm", "image": "efficientnet-lite0"}
    overrides = {"encoders": {"image": "efficientnet-lite2"}, "linear_start": True}
    assert candidate_encoders(base, overrides) == {"text": "minilm", "image": "efficientnet-lite2"}
    assert candidate_encoders(base, {"linear_start": True}) == base
    assert recipe(TrainConfig(), overrides) == recipe(TrainConfig(), {"linear_start": True})  # not a training field
    with pytest.raises(ConfigError, match=r"candidate 'c': encoders for \['speech'\]"):
        candidate_encoders(base, {"encoders": {"speech": "whisper-tiny"}}, "c")
    fields = {"text": "minilm", "sound": "whisper-tiny@sound"}  # an encoder swapped still reads its field
    assert candidate_encoders(fields, {"encoders": {"sound": "hf:my-whisper"}}) == {
        "text": "minilm",
        "sound": "hf:my-whisper@sound",
    }
    assert candidate_encoders(fields, {"encoders": {"sound": "whisper-tiny@audio"}})["sound"] == "whisper-tiny@audio"
    check_encoder_names({"text": "mpnet", "image": "hf-vision:facebook/dinov2-small", "sound": "whisper-tiny@sound"})
    with pytest.raises(ConfigError, match="candidate 'c': unknown encoder 'mpnett' for 'text'"):
        check_encoder_names({"text": "mpnett"}, "c")


@pytest.mark.parametrize(
    "text, match",
    [
        ("candidates: {}", "'candidates' must map"),
        ("candidates: {a: 3}", "candidate 'a' must be a mapping"),
        ("candidates: {a: {}}\ndatasets: [x]", "'datasets' must map"),
        ("candidates: {a: {}}\nextra: 1", "expected the keys"),
        ("candidates: {a: {}}\ndev_fraction: 0.7", "dev_fraction must be a number in"),
        ("candidates: [", "not valid YAML"),
        ("candidates: {a: {encoders: mpnet}}", "candidate 'a': 'encoders' must map modalities"),
        ("candidates: {a: {encoders: {text: ''}}}", "candidate 'a': 'encoders' must map modalities"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, text, match):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_sweep(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_the_ranking_reads_the_choice_split_never_test(tmp_path):
    """Candidate b wins on the choice split (validation.json: dev) on both data sets and loses on test: b is chosen. Scores are the mean
    R@1 over directions per seed, then over seeds, then over data sets."""
    for dataset, shift in (("d1", 0.0), ("d2", 0.1)):
        for cand, val, test in (("a", 0.30, 0.50), ("b", 0.40, 0.20)):
            write_rows(
                tmp_path / dataset / cand,
                {
                    "validation.json": rows("moe-alternating", "contrastive", 0, [val + shift, val + shift])
                    + rows("moe-alternating", "contrastive", 1, [val + shift + 0.02, val + shift - 0.02 + 0.04]),
                    "results.json": rows("moe-alternating", "contrastive", 0, [test, test])
                    + rows("moe-alternating", "contrastive", 1, [test, test]),
                },
            )
    scored = []
    for dataset in ("d1", "d2"):
        for cand in ("a", "b"):
            scored += [{"dataset": dataset, "candidate": cand, **r} for r in score_run(tmp_path / dataset / cand)]
    one = next(r for r in scored if r["dataset"] == "d1" and r["candidate"] == "b")
    assert one["seeds"] == 2 and one["dev"] == pytest.approx((0.40 + 0.42) / 2) and one["test"] == pytest.approx(0.2)
    ranked = rank(scored)
    assert [r["candidate"] for r in ranked] == ["b", "a"]
    assert ranked[0]["dev"] == pytest.approx(((0.40 + 0.42) / 2 + (0.50 + 0.52) / 2) / 2)
    table = markdown(ranked)
    assert table.index("| 1 | b |") < table.index("| 2 | a |") and "d2 test" in table


def test_ties_within_a_standard_error_go_to_the_first_listed_candidate():
    from omnimoe.align.sweep import choose, standard_error

    def row(cand, dev, std):
        return {"candidate": cand, "method": "m", "head": "h", "dev": dev,
                "datasets": {"d1": {"dev": dev, "dev_std": std, "seeds": 4}, "d2": {"dev": dev, "dev_std": std, "seeds": 4}}}  # fmt: skip

    ranked = [row("tokens", 0.300, 0.02), row("safe", 0.295, 0.02), row("other", 0.20, 0.02)]
    assert standard_error(ranked[0]) == pytest.approx((2 * 0.02**2 / 4) ** 0.5 / 2)  # 0.00707
    assert choose(ranked, ["safe", "tokens", "other"])["candidate"] == "safe"  # 0.005 apart: a tie
    assert choose(ranked, ["other", "tokens", "safe"])["candidate"] == "tokens"  # "other" is no tie
    ranked[1]["dev"] = 0.290  # 0.010 apart: more than a standard error
    assert choose(ranked, ["safe", "tokens", "other"])["candidate"] == "tokens"


def test_the_shipped_sweep_file_makes_a_recipe_and_names_known_encoders_for_every_candidate():
    from pathlib import Path

    from omnimoe.encoders.registry import REGISTRY

    spec = load_sweep(Path(__file__).parents[1] / "configs" / "sweep.yaml")
    base = {"text": "minilm", "image": "efficientnet-lite0"}  # the --encoders of the file's command
    for name, overrides in spec.candidates.items():
        recipe(TrainConfig(), overrides, name)
        assert set(candidate_encoders(base, overrides, name).values()) <= set(REGISTRY), name
    assert {"mpnet", "efficientnet-lite2"} <= {
        e for o in spec.candidates.values() for e in o.get("encoders", {}).values()
    }
