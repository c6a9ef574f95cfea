"""Retrieval over the quick demo run: the live query path against the stored latents, index reuse and
refusal, adding items without a rebuild, and the `omnimoe search` CLI."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omnimoe.align.connector import load_connector
from omnimoe.data.manifest import media_path, read_manifest, write_manifest
from omnimoe.latents import extract
from omnimoe.latents.store import LatentStore
from omnimoe.retrieval import IndexMismatch, QueryError, Retriever

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def copy_run(run: Path, dst: Path) -> Path:
    """A private copy of a run (without its training checkpoints): every path inside a run is relative to it,
    so the copy reads its own stores and manifest."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("runs"))
    return dst


def stored_ranking(retriever: Retriever, source: str, target: str, sid: str, k: int) -> tuple[torch.Tensor, list[str]]:
    """The query vector and top-k computed from the *stored* latents (what evaluation measures)."""
    d = f"{source}->{target}"
    src, tgt = retriever.stores[source], retriever.stores[target]
    with torch.no_grad():
        q = F.normalize(retriever.connector(d, src.pooled()[src.rows_of([sid])]).contrastive.float(), dim=-1)
        keys = F.normalize(retriever.connector.embed_target(d, tgt.pooled()).float(), dim=-1)
    top = (q @ keys.T)[0].topk(k).indices.tolist()
    return q[0], [tgt.ids[i] for i in top]


def test_live_queries_match_the_stored_latents(demo_run):
    """Encoding a raw query now gives the vector that was stored at extraction, so search agrees with the
    ranking computed from the store, for a text, an image and an audio query."""
    run, _ = demo_run
    retriever = Retriever(run, method="moe-alternating", label_prior=False)  # the connector's score alone
    manifest = retriever.stores["image"].manifest
    sample = next(
        r
        for r in read_manifest(manifest)
        if r["id"] in retriever.stores["image"].ids and r["id"] in retriever.stores["speech"].ids
    )
    cases = [
        ("text", "image", sample["text"]),
        ("image", "text", str(media_path(manifest, sample["image"]))),
        ("speech", "text", str(media_path(manifest, sample["audio"]))),
    ]
    for source, target, query in cases:
        live = retriever.embed(source, target, [query])[0]
        stored, top = stored_ranking(retriever, source, target, sample["id"], 5)
        assert float(live @ stored) > 0.99, (source, float(live @ stored))
        hits = retriever.search(source, target, [query], 5)[0]
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        assert hits[0].id == top[0] and len(set(h.id for h in hits) & set(top)) >= 4, (source, hits, top)
    # batched: the same answers as one at a time
    texts = [r["text"] for r in read_manifest(manifest)[:6]]
    batch = retriever.search("text", "image", texts, 3)
    assert [[h.id for h in row] for row in batch] == [
        [h.id for h in retriever.search("text", "image", [t], 3)[0]] for t in texts
    ]


def test_query_errors_name_the_problem(demo_run, tmp_path):
    retriever = Retriever(demo_run[0])
    with pytest.raises(QueryError, match="empty text"):
        retriever.search("text", "image", ["   "])
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(QueryError, match="broken.png"):
        retriever.search("image", "text", [str(corrupt)])
    with pytest.raises(QueryError, match="unknown target 'video'"):
        retriever.source_for("text", "video")
    with pytest.raises(QueryError, match="reads audio input, not image"):
        retriever.source_for("image", "text", source="speech")
    with pytest.raises(FileNotFoundError, match="no trained connector for method 'nope'"):
        Retriever(demo_run[0], method="nope")


def test_index_is_reused_refused_for_another_connector_and_rebuilt(demo_run, tmp_path):
    run = copy_run(demo_run[0], tmp_path / "run")
    served = Retriever(run)  # what the demo indexed: the run's choice on validation
    folder = served.index_root / "text-to-image"
    before = (folder / "index.faiss").stat().st_mtime_ns
    first = Retriever(run).search("text", "image", ["A frog."], 5)[0]
    assert (folder / "index.faiss").stat().st_mtime_ns == before  # loaded, not rebuilt
    # retrain (here: perturb) the connector in place: the saved index no longer matches it
    connector = load_connector(run / "connectors" / served.method)
    with torch.no_grad():
        for p in connector.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    connector.save_pretrained(run / "connectors" / served.method)
    with pytest.raises(IndexMismatch, match="connector"):
        Retriever(run).index("text->image")
    rebuilt = Retriever(run, rebuild=True).search("text", "image", ["A frog."], 5)[0]
    assert [h.id for h in rebuilt] != [h.id for h in first] or [h.score for h in rebuilt] != pytest.approx(
        [h.score for h in first]
    )
    assert Retriever(run).search("text", "image", ["A frog."], 5)[0] == rebuilt  # the rebuilt index is kept


def test_new_items_are_added_without_a_rebuild(demo_run, tmp_path):
    run = copy_run(demo_run[0], tmp_path / "run")
    retriever = Retriever(run, method="moe-alternating", label_prior=False)
    index = retriever.index("text->image")
    n = len(index)
    store = retriever.stores["image"]
    manifest = store.manifest
    records = read_manifest(manifest)
    extra = [{**r, "id": r["id"] + "-copy", "split": "test"} for r in records if r.get("image")][:2]
    grown = write_manifest(
        tmp_path / "grown.jsonl",
        [{**r, "image": str(media_path(manifest, r["image"]))} if r.get("image") else r for r in records + extra],
    )
    extract(grown, store.index["encoder"], store.folder, field="image", progress=False)
    added = retriever.update()
    assert added["text->image"] == 2 and len(index) == n + 2
    assert (run / "index" / "moe-alternating" / "text-to-image" / "index.json").read_text().count("-copy") == 2  # saved
    reopened = LatentStore.open(store.folder)
    for r in extra:
        key = retriever.connector.embed_target("text->image", reopened.pooled()[reopened.rows_of([r["id"]])]).detach()
        assert index.search(key, 1)[1][0][0] in (r["id"], r["id"].removesuffix("-copy"))  # the copy or its twin
    assert Retriever(run, method="moe-alternating", label_prior=False).index("text->image").ids[-2:] == [
        r["id"] for r in extra
    ]


def omnimoe(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "omnimoe.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def test_search_cli(demo_run, tmp_path):
    run = demo_run[0]
    out = omnimoe("search", "A frog.", "--target", "image", "-k", "3", "--run", str(run), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["direction"] == "text->image" and [r["rank"] for r in data["results"]] == [1, 2, 3]
    assert all(r["id"] and "text" in r for r in data["results"])
    assert (
        data["results"]
        == json.loads(omnimoe("search", "A frog.", "--target", "image", "-k", "3", "--run", str(run), "--json").stdout)[
            "results"
        ]
    )
    manifest = run / json.loads((run / "summary.json").read_text())["manifest"]
    rec = next(r for r in read_manifest(manifest) if r.get("image") and r.get("audio"))
    image = omnimoe("search", "--image", str(media_path(manifest, rec["image"])), "--target", "text", "--run", str(run))
    assert image.returncode == 0 and image.stdout.startswith("image -> text: top 5"), image.stderr[-2000:]
    audio = omnimoe(
        "search", "--audio", str(media_path(manifest, rec["audio"])), "--target", "image", "--run", str(run), "--json"
    )
    assert audio.returncode == 0 and json.loads(audio.stdout)["direction"] == "speech->image", audio.stderr[-2000:]
    chosen = json.loads((run / "summary.json").read_text())["chosen"]
    assert data["method"] == chosen["method"] and data["head"] == chosen["head"] and data["chosen_on_validation"]
    said = chosen["method"] + (" + label prior" if chosen["head"] == "contrastive+prior" else "")
    assert f"serving {said} (chosen on validation)" in out.stderr
    linear = omnimoe(
        "search", "A frog.", "--target", "image", "--run", str(run), "--method", "linear", "--no-label-prior",
        "--index", "ivf",
    )  # fmt: skip
    assert "serving linear\n" in linear.stderr
    assert linear.returncode == 0 and (run / "index" / "linear" / "text-to-image.ivf" / "index.json").is_file(), (
        linear.stderr[-2000:]
    )
    for args, message in [
        ((), "exactly one query"),
        (("x", "--target", "video"), "unknown target 'video'"),
        (("x", "--run", str(tmp_path)), "not an alignment run"),
    ]:
        bad = omnimoe("search", *args, "--run", str(run)) if "--run" not in args else omnimoe("search", *args)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_batcher_coalesces_and_isolates_errors(demo_run):
    """Concurrent searches come back as if run alone; a bad query in a coalesced batch fails by itself."""
    from concurrent.futures import ThreadPoolExecutor

    from omnimoe.retrieval.retriever import Batcher

    retriever = Retriever(demo_run[0])
    batcher = Batcher(retriever, max_items=8)
    texts = ["A frog.", "a red fire truck", "a bird", "   ", "a violin", "a tree", "a boat", "a cake"] * 3
    want = {t: [h.id for h in retriever.search("text", "image", [t], 3)[0]] for t in set(texts) if t.strip()}

    def one(t):
        try:
            return [h.id for h in batcher.submit("text", "image", [t], 3)[0]]
        except QueryError as exc:
            return str(exc)

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, texts))
    for t, g in zip(texts, got):
        assert g == (want[t] if t.strip() else "query 0: empty text"), t


def test_index_cli_builds_every_direction_with_every_stored_item(demo_run, tmp_path):
    run = copy_run(demo_run[0], tmp_path / "run")
    built = omnimoe("index", "--run", str(run), "--method", "linear", "--no-label-prior", "--index", "torch")
    assert built.returncode == 0, built.stderr[-2000:]
    retriever = Retriever(run, method="linear", label_prior=False)
    lines = dict(line.split(None, 1) for line in built.stdout.splitlines() if "->" in line.split(None, 1)[0])
    assert set(lines) == set(retriever.directions())
    for direction, text in lines.items():
        target = direction.split("->")[1]
        assert text.strip() == f"{len(retriever.stores[target])} items", (direction, text)
        assert (run / "index" / "linear" / f"{direction.replace('->', '-to-')}.torch" / "index.json").is_file()
    again = omnimoe(
        "index", "--run", str(run), "--method", "linear", "--no-label-prior", "--index", "torch", "--rebuild"
    )
    assert again.returncode == 0 and again.stdout == built.stdout
    bad = omnimoe("index", "--run", str(run), "--method", "nope")
    assert bad.returncode == 2 and "no trained connector for method 'nope'" in bad.stderr


def test_fused_with_the_prior_the_search_ranks_as_the_validated_fusion(demo_run, tmp_path):
    """``label_prior``: one index over [key, prior side] and a query [query, w * prior side] rank the targets by
    cos(learned) + w * cos(prior), with w of prior.json: the fusion validation picked (beta), rescaled by the
    two scores' spreads on validation (omnimoe.align.evaluate.serving_weights). Without it: the connector alone."""
    run, _ = demo_run
    fused = Retriever(run, method="moe-alternating", label_prior=True)
    plain = Retriever(run, method="moe-alternating", label_prior=False)
    assert fused.head == "contrastive+prior" and plain.head == "contrastive" and fused.index_root != plain.index_root
    w = json.loads((run / "prior.json").read_text())["serve"]["moe-alternating"]["text->image"]
    assert w > 0 and fused.weight("text->image") == w and plain.weight("text->image") == 0
    text, image = fused.stores["text"], fused.stores["image"]
    records = {r["id"]: r for r in read_manifest(text.manifest)}
    prior = fused.prior("text->image")
    for sid in [i for i in text.ids if i in image.ids][:4]:
        live = fused.search("text", "image", [records[sid]["text"]], 5)[0]
        with torch.no_grad():
            q = F.normalize(fused.connector("text->image", text.pooled()[text.rows_of([sid])]).contrastive, dim=-1)
            k = F.normalize(fused.connector.embed_target("text->image", image.pooled()), dim=-1)
        p = prior.side("text", text.pooled()[text.rows_of([sid])]) @ prior.side("image", image.pooled()).T
        want = [image.ids[i] for i in (q @ k.T + w * p)[0].topk(5).indices.tolist()]
        assert live[0].id == want[0] and len({h.id for h in live} & set(want)) >= 4, (sid, live, want)
        alone = [image.ids[i] for i in (q @ k.T)[0].topk(5).indices.tolist()]
        assert [h.id for h in plain.search("text", "image", [records[sid]["text"]], 5)[0]][0] == alone[0]
    copy = copy_run(run, tmp_path / "run")
    info = json.loads((copy / "prior.json").read_text())
    assert prior.settings == info["settings"]["image"]  # the bridge the run calibrated and scored
    other = {"prompt": "{}", "temperature": 2.0, "top_k": 7}  # a bridge no calibration picks
    info["settings"]["image"] = other
    (copy / "prior.json").write_text(json.dumps(info))
    changed = Retriever(copy, method="moe-alternating", label_prior=True)
    assert changed.prior("text->image").settings == other
    with pytest.raises(IndexMismatch, match="prior_bridge"):  # the stored prior sides were bridged otherwise
        changed.search("text", "image", ["A cat."], 3)
    rebuilt = Retriever(copy, method="moe-alternating", label_prior=True, rebuild=True)
    assert rebuilt.index("text->image").record["prior_bridge"] == other
    info["serve"].pop("linear")
    (copy / "prior.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="no label-prior weights for 'linear'"):
        Retriever(copy, method="linear", label_prior=True)
