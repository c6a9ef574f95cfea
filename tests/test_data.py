import json

import numpy as np
import pytest
from PIL import Image

from omnimoe.data.adapters import grouped_split, manifest_from_folder, manifest_from_llava, normalise_caption
from omnimoe.data.manifest import ManifestError, media_path, read_manifest, validate_manifest, write_manifest


def _png(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), color, np.uint8)).save(path)
    return path


def test_manifest_round_trip_and_relative_media(tmp_path):
    _png(tmp_path / "media" / "a.png")
    m = write_manifest(
        tmp_path / "m.jsonl", [{"id": "a", "split": "train", "text": "A cat.", "image": "media/a.png", "_line": 3}]
    )
    recs = read_manifest(m)
    assert recs[0]["image"] == "media/a.png" and recs[0]["_line"] == 1
    assert media_path(m, recs[0]["image"]) == (tmp_path / "media" / "a.png").resolve()
    assert validate_manifest(m).ok


def test_validator_names_every_problem(tmp_path):
    lines = [
        {"id": "a", "split": "train", "text": "ok", "image": "missing.png"},
        {"id": "a", "split": "train", "text": "dup"},
        {"id": "b", "text": "   "},
        {"id": "c", "split": "test"},
        {"id": "d", "split": "test", "text": 5},
    ]
    m = tmp_path / "m.jsonl"
    m.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    report = validate_manifest(m)
    text = report.summary()
    assert not report.ok
    for expected in [
        "line 1 (id 'a'): image: missing file missing.png",
        "line 2 (id 'a'): id: duplicate id (first on line 1)",
        "line 3 (id 'b'): split: missing",
        "line 3 (id 'b'): text: empty caption",
        "line 4 (id 'c'): no content field",
        "line 5 (id 'd'): text: not a string",
    ]:
        assert expected in text, expected
    assert validate_manifest(m, check_files=False).problems != report.problems


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json\n", "line 1: not valid JSON"),
        ('{"text": "x"}\n', "line 1: missing or non-string 'id'"),
        ("[1, 2]\n", "expected a JSON object"),
    ],
)
def test_malformed_manifest_is_fatal_and_named(tmp_path, content, message):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "ok", "split": "train", "text": "x"}\n' + content.replace("line 1", "line 2"))
    with pytest.raises(ManifestError, match=message.replace("line 1", "line 2")):
        read_manifest(m)


def test_grouped_split_keeps_duplicate_captions_together():
    captions = [f"A thing number {i}." for i in range(400)]
    splits = {c: grouped_split(normalise_caption(c)) for c in captions}
    assert splits["A thing number 7."] == grouped_split(normalise_caption("a thing number 7"))  # same group
    share = sum(s == "test" for s in splits.values()) / len(splits)
    assert 0.13 < share < 0.27
    assert grouped_split("x", seed=1) in ("train", "test")


def _cli(*args):
    from typer.testing import CliRunner

    from omnimoe.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_folder_adapter(tmp_path):
    _png(tmp_path / "media" / "red.png")
    _png(tmp_path / "media" / "blue.png", (0, 0, 255))
    (tmp_path / "media" / "dog.ogg").write_bytes(b"x")
    table = tmp_path / "captions.csv"
    table.write_text(
        "file,caption,source\nred.png,A red square.,s1\nred.png,Something red.,s2\nblue.png,A blue square.,s3\ndog.ogg,A dog barks.,s4\n"
    )
    m = manifest_from_folder(tmp_path / "media", table, tmp_path / "out" / "manifest.jsonl")
    recs = read_manifest(m)
    assert [r["id"] for r in recs] == ["red.png#1", "red.png#2", "blue.png", "dog.ogg"]
    assert recs[0]["image"] == "../media/red.png" and recs[3]["audio"] == "../media/dog.ogg"
    assert recs[0]["source"] == "s1" and all(r["split"] in ("train", "test") for r in recs)
    assert validate_manifest(m).ok
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\nnotes.txt,hello\n")
    with pytest.raises(ManifestError, match="neither an image nor an audio"):
        manifest_from_folder(tmp_path / "media", bad, tmp_path / "x.jsonl")
    # the command writes the same manifest, and names the bad table with exit code 2
    code, output = _cli(
        "data",
        "folder",
        "--media",
        str(tmp_path / "media"),
        "--captions",
        str(table),
        "--out",
        str(tmp_path / "cli" / "manifest.jsonl"),
    )
    assert code == 0 and "manifest:" in output
    assert [(r["id"], r["text"], r["split"]) for r in read_manifest(tmp_path / "cli" / "manifest.jsonl")] == [
        (r["id"], r["text"], r["split"]) for r in recs
    ]
    code, output = _cli(
        "data", "folder", "--media", str(tmp_path / "media"), "--captions", str(bad), "--out", str(tmp_path / "y.jsonl")
    )
    assert code == 2 and "neither an image nor an audio" in output and not (tmp_path / "y.jsonl").exists()


def test_llava_adapter(tmp_path):
    _png(tmp_path / "imgs" / "0001.png")
    data = [
        {
            "id": "s1",
            "image": "imgs/0001.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe it."},
                {"from": "gpt", "value": "A red square."},
            ],
        },
        {
            "id": "s2",
            "voice": ["a.mp3"],
            "conversations": [{"from": "human", "value": "<audio>\nWhat is said?"}, {"from": "gpt", "value": "Hello."}],
        },
    ]
    (tmp_path / "llava.json").write_text(json.dumps(data))
    m = manifest_from_llava(tmp_path / "llava.json", tmp_path / "manifest.jsonl")
    recs = read_manifest(m)
    assert recs[0]["text"] == "A red square." and recs[0]["image"] == "imgs/0001.png"
    assert recs[1]["audio"] == "a.mp3" and recs[1]["conversations"][0]["from"] == "human"
    (tmp_path / "broken.json").write_text('[{"id": 1}]')
    with pytest.raises(ManifestError, match="record 0"):
        manifest_from_llava(tmp_path / "broken.json", tmp_path / "m2.jsonl")
    code, output = _cli(
        "data", "llava", str(tmp_path / "llava.json"), "--out", str(tmp_path / "cli.jsonl"), "--split", "test"
    )
    assert code == 0 and [(r["id"], r["text"], r["split"]) for r in read_manifest(tmp_path / "cli.jsonl")] == [
        ("s1", "A red square.", "test"),
        ("s2", "Hello.", "test"),
    ]
    code, output = _cli("data", "llava", str(tmp_path / "broken.json"), "--out", str(tmp_path / "m3.jsonl"))
    assert code == 2 and "record 0" in output


@pytest.mark.slow
def test_tuxpaint_manifest_from_the_real_package(tmp_path):
    """Downloads the Debian package once into the omnimoe cache (161 MB), then builds the demo manifest with
    `omnimoe data tuxpaint`."""
    from typer.testing import CliRunner

    from omnimoe.cli import app

    result = CliRunner().invoke(app, ["data", "tuxpaint", "--out", str(tmp_path / "tux"), "--no-synthesize-speech"])
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "tux" / "manifest.jsonl"
    stats = json.loads(result.stdout[: result.stdout.rindex("manifest:")])
    assert result.stdout.strip().endswith(f"manifest: {manifest}")
    report = validate_manifest(manifest)
    assert report.ok, report.summary()
    recs = read_manifest(manifest)
    assert stats["samples"] == len(recs) > 600 and stats["unique_captions"] > 550
    by_split = {s: {normalise_caption(r["text"]) for r in recs if r["split"] == s} for s in ("train", "test")}
    assert not by_split["train"] & by_split["test"]  # duplicate captions never straddle the split
    assert 0.12 < len(by_split["test"]) / stats["unique_captions"] < 0.28
    assert {r["category"] for r in recs} >= {"animals", "food", "vehicles"} and "symbols" not in {
        r["category"] for r in recs
    }
    assert (
        any(r["image"].endswith(".svg") for r in recs)
        and sum("audio" in r for r in recs) >= 60
        and stats["sound"] >= 100
    )
    koala = next(r for r in recs if r["text"] == "A koala.")
    assert media_path(manifest, koala["image"]).is_file()


@pytest.mark.slow
def test_art4apps_manifest_from_the_real_package(tmp_path):
    """`omnimoe data art4apps`: the Debian package pysiogame (16 MB, cached), 585 word pictures in 12
    categories, the word from the file name, every picture readable, a seeded split that repeats."""
    from PIL import Image
    from typer.testing import CliRunner

    from omnimoe.cli import app

    result = CliRunner().invoke(app, ["data", "art4apps", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "a" / "manifest.jsonl"
    stats = json.loads(result.stdout[: result.stdout.rindex("manifest:")])
    report = validate_manifest(manifest)
    assert report.ok, report.summary()
    recs = read_manifest(manifest)
    assert stats["samples"] == len(recs) == 585 and stats["unique_texts"] == 585 and stats["categories"] == 12
    assert {r["category"] for r in recs} >= {"animals", "actions", "food", "transport"}
    rabbit = next(r for r in recs if r["id"] == "animals/baby_rabbit")
    assert rabbit["text"] == "baby rabbit" and rabbit["category"] == "animals"
    assert Image.open(media_path(manifest, rabbit["image"])).size == (200, 200)
    assert 0.12 < stats["splits"]["test"] / len(recs) < 0.28 and sum(stats["splits"].values()) == len(recs)
    again = CliRunner().invoke(app, ["data", "art4apps", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0 and [r["split"] for r in read_manifest(tmp_path / "b" / "manifest.jsonl")] == [
        r["split"] for r in recs
    ]


def test_unquoted_comma_in_csv_caption_is_named(tmp_path):
    _png(tmp_path / "media" / "a.png")
    table = tmp_path / "c.csv"
    table.write_text("file,caption\na.png,a cat, sitting\n")
    with pytest.raises(ManifestError, match="row 1: more fields than the header; quote captions"):
        manifest_from_folder(tmp_path / "media", table, tmp_path / "m.jsonl")


def _small_set(folder, name, n, with_val):
    folder.mkdir(parents=True)
    (folder / "media").mkdir()
    records = []
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), i * 7 % 255, np.uint8)).save(folder / "media" / f"{i}.png")
        split = "test" if i % 5 == 0 else ("val" if with_val and i % 5 == 1 else "train")
        records.append({"id": str(i), "split": split, "text": f"{name} thing number {i}.", "image": f"media/{i}.png"})
    return write_manifest(folder / "manifest.jsonl", records)


def test_merge_manifests_prefixes_ids_keeps_media_and_carves_val_as_align_would(tmp_path):
    """Two data sets -> one manifest: ids prefixed, media reachable from the new folder, a val split carved in
    the set that had none exactly as training on that set alone carves it; --test-from sets the other set's
    test records aside; bad calls are refused, naming the culprit."""
    from omnimoe.align.data import AlignmentData

    a = _small_set(tmp_path / "a", "alpha", 40, with_val=True)
    b = _small_set(tmp_path / "sets" / "b", "beta", 60, with_val=False)
    out = tmp_path / "union" / "manifest.jsonl"
    code, output = _cli("data", "merge", f"tux={a}", str(b), "--out", str(out), "--test-from", "tux")
    assert code == 0, output
    merged = {r["id"]: r for r in read_manifest(out)}
    assert len(merged) == 100 and {r["dataset"] for r in merged.values()} == {"tux", "b"}
    assert validate_manifest(out).ok  # every media path resolves from the new folder
    assert media_path(out, merged["b/3"]["image"]).resolve() == (tmp_path / "sets" / "b" / "media" / "3.png").resolve()
    alone = AlignmentData(b, {}).split  # what training on b alone uses (val carved from its train captions)
    assert {sid: merged[f"b/{sid}"]["split"] for sid in alone} == {
        sid: ("heldout" if s == "test" else s) for sid, s in alone.items()
    }
    assert any(s == "val" for s in alone.values())
    assert all(merged[f"tux/{r['id']}"]["split"] == r["split"] for r in read_manifest(a))  # had val: kept
    assert AlignmentData(out, {}).split == {sid: r["split"] for sid, r in merged.items()}  # not carved again

    for args, message in [
        ([f"x={a}", "--out", str(out)], "at least two"),
        ([f"x={a}", f"x={b}", "--out", str(out)], "'x' given twice"),
        ([f"x={a}", f"y={b}", "--out", str(out), "--test-from", "z"], "--test-from z: not one of"),
        ([f"x={a}", f"y={tmp_path / 'none.jsonl'}", "--out", str(out)], "none.jsonl does not exist"),
        ([f"x={a}", f"y={b}", "--out", str(b)], "is the manifest of 'y'"),
    ]:
        code, output = _cli("data", "merge", *args)
        assert code != 0 and message in output, (args, output)


def test_merge_takes_bare_paths_with_an_equals_sign_and_nests_merged_sets(tmp_path):
    """A bare path may hold '=' (its folder names the set); merging a merged manifest again nests the names."""
    a = _small_set(tmp_path / "run=1", "alpha", 10, with_val=True)
    b = _small_set(tmp_path / "b", "beta", 10, with_val=True)
    first = tmp_path / "ab" / "manifest.jsonl"
    code, output = _cli("data", "merge", str(a), str(b), "--out", str(first))
    assert code == 0, output
    assert {r["dataset"] for r in read_manifest(first)} == {"run=1", "b"}
    c = _small_set(tmp_path / "c", "gamma", 10, with_val=True)
    again = tmp_path / "abc" / "manifest.jsonl"
    code, output = _cli("data", "merge", f"ab={first}", f"c={c}", "--out", str(again))
    assert code == 0, output
    records = read_manifest(again)
    assert {r["dataset"] for r in records} == {"ab/run=1", "ab/b", "c"}
    assert "ab/run=1/3" in {r["id"] for r in records} and validate_manifest(again).ok
