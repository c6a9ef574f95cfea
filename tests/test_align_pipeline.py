"""`omnimoe align` end to end on real encoders (MiniLM + EfficientNet-Lite0) over generated shape images."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from omnimoe.data.adapters import grouped_split, normalise_caption
from omnimoe.data.manifest import write_manifest

pytestmark = pytest.mark.slow
# the small pair (the command's default is the larger pair the sweep chose: mpnet + EfficientNet-Lite2)
ENCODERS = ["--encoders", "text=minilm,image=efficientnet-lite0"]
COLORS = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "black": (10, 10, 10),
}
SHAPES = ("square", "circle", "triangle")


def shapes_manifest(folder: Path, split_seed: int = 0) -> Path:
    """60 images of 15 captions (colour x shape, 4 drawings each), split by caption (``split_seed`` seeds the
    grouped split: seed 0 holds out 2 captions, seed 18 holds out 5 whose colours and shapes all occur in train)."""
    rng = np.random.default_rng(0)
    recs = []
    for color, rgb in COLORS.items():
        for shape in SHAPES:
            caption = f"A {color} {shape}."
            for v in range(4):
                img = Image.new("RGB", (96, 96), "white")
                d = ImageDraw.Draw(img)
                x, y, r = (int(t) for t in rng.integers(20, 40, 3))
                box = (x, y, x + r + 20, y + r + 20)
                {"square": d.rectangle, "circle": d.ellipse}.get(
                    shape,
                    lambda b, fill: d.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill),
                )(box, fill=rgb)
                name = f"{color}_{shape}_{v}.png"
                img.save(folder / name)
                recs.append(
                    {
                        "id": name,
                        "split": grouped_split(normalise_caption(caption), 0.3, seed=split_seed),
                        "text": caption,
                        "image": name,
                        "category": shape,
                    }
                )
    return write_manifest(folder / "manifest.jsonl", recs)


def chance_r1(manifest: Path) -> float:
    """R@1 of a random ranking on the test split: a query of caption group g hits with probability |g| / N (every
    test item is a target; same-caption targets count as hits), averaged over the N queries."""
    from collections import Counter

    from omnimoe.data.manifest import read_manifest

    groups = Counter(normalise_caption(r["text"]) for r in read_manifest(manifest) if r["split"] == "test")
    n = sum(groups.values())
    return sum(s * s for s in groups.values()) / (n * n)


def well_above(chance: float) -> float:
    """What a trained connector must reach: twice chance, capped halfway between chance and perfect."""
    return min(2 * chance, (1 + chance) / 2)


def test_align_end_to_end(tmp_path):
    manifest = shapes_manifest(tmp_path, split_seed=18)  # 5 held-out captions: chance R@1 = 0.2
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "align",
        *ENCODERS,
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--methods",
        "linear,moe-alternating",
        "--seeds",
        "0,1",
        "--set",
        "steps=60",
        "--set",
        "eval_every=20",
        "--set",
        "hidden_size=64",
        "--set",
        "num_experts=4",
        "--set",
        "num_experts_per_tok=2",
        "--set",
        "warmup_steps=5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())
    assert {tuple(sorted(r)) for r in rows} == {
        tuple(sorted(["method", "seed", "query", "target", "head", "R@1", "R@5", "R@10", "n"]))
    }
    assert {(r["method"], r["seed"]) for r in rows} == {
        (m, s) for m in ("linear", "moe-alternating", "label-prior") for s in (0, 1)
    }
    heads = {(r["method"], r["head"]) for r in rows}
    assert heads == {
        ("linear", "contrastive"),
        ("linear", "contrastive+prior"),
        ("moe-alternating", "contrastive"),
        ("moe-alternating", "regression"),
        ("moe-alternating", "contrastive+prior"),
        ("label-prior", "prior"),
    }
    prior = json.loads((out / "prior.json").read_text())
    assert prior["modalities"] == {"image": "text"} and set(prior["beta"]) == {
        f"{m}/seed{s}" for m in ("linear", "moe-alternating") for s in (0, 1)
    }
    assert all(
        set(b) == {"text->image", "image->text"} and all(v >= 0 for v in b.values()) for b in prior["beta"].values()
    )
    assert {(r["query"], r["target"]) for r in rows} == {("text", "image"), ("image", "text")}
    assert all(0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1 for r in rows)
    # the connectors learned: held-out captions (never seen in training) retrieved well above a random ranking
    chance = chance_r1(manifest)
    assert 0 < chance <= 0.25 and all(r["n"] == 20 for r in rows), chance  # 5 captions x 4 drawings held out
    for method in ("linear", "moe-alternating"):
        r1 = {(r["seed"], r["query"]): r["R@1"] for r in rows if r["method"] == method and r["head"] == "contrastive"}
        assert len(r1) == 4 and all(v > chance for v in r1.values()), (method, chance, r1)
        assert sum(r1.values()) / len(r1) >= well_above(chance), (method, chance, r1)
    assert "| linear | text->image | contrastive |" in (out / "results.md").read_text()
    zs = json.loads((out / "zeroshot.json").read_text())
    assert {(r["method"], r["seed"], r["query"]) for r in zs} == {
        (m, s, "image") for m in ("linear", "moe-alternating") for s in (0, 1)
    }
    assert all(0 <= r["accuracy"] <= 1 and r["classes"] == 3 and r["n"] > 0 for r in zs)
    # zero-shot by category name ("A drawing of circle.") on held-out images: above 1 / classes for every run
    for method in ("linear", "moe-alternating"):
        acc = [r["accuracy"] for r in zs if r["method"] == method]
        chance = 1 / zs[0]["classes"]
        assert all(a > chance for a in acc) and sum(acc) / len(acc) >= well_above(chance), (method, acc)
    assert "Zero-shot classification by category name" in (out / "results.md").read_text()
    for name in ("recall.png", "recall_with_prior.png", "training_curves.png", "expert_load_moe-alternating.png"):
        assert (out / name).stat().st_size > 5000, name
    assert (out / "connectors" / "moe-alternating" / "model.safetensors").is_file()
    stores = sorted((out / "stores").iterdir())
    assert [s.name for s in stores] == ["image-efficientnet-lite0", "text-minilm"]
    # residual_per_direction (the default): each direction's choice is recorded
    residuals = json.loads((out / "residuals.json").read_text())
    assert set(residuals) == {"moe-alternating/seed0", "moe-alternating/seed1"}  # linear has no residual
    assert all(set(k) == {"text->image", "image->text"} for k in residuals.values())
    # a second call reuses the stores (extraction resumes: nothing to redo) and the finished runs; without
    # residual_per_direction (chosen at load, not a training setting: the runs resume) no choice is recorded
    inode = (stores[0] / "shard-00000.safetensors").stat().st_ino
    again = subprocess.run(cmd + ["--set", "residual_per_direction=false"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (stores[0] / "shard-00000.safetensors").stat().st_ino == inode
    assert not (out / "residuals.json").exists()
    bad = subprocess.run(cmd[:-2] + ["--set", "stepz=3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "stepz" in bad.stderr


def test_align_with_token_inputs(tmp_path):
    """token_inputs: stores extracted with tokens, the MoE routes every token, masked mean afterwards."""
    manifest = shapes_manifest(tmp_path)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "align",
        *ENCODERS,
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--methods",
        "moe-alternating,linear",
        "--seeds",
        "0",
        "--set",
        "token_inputs=true",
        "--set",
        "steps=40",
        "--set",
        "eval_every=20",
        "--set",
        "hidden_size=64",
        "--set",
        "num_experts=4",
        "--set",
        "num_experts_per_tok=2",
        "--set",
        "warmup_steps=5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (out / "stores").iterdir()) == [
        "image-efficientnet-lite0-tokens",
        "text-minilm-tokens",
    ]
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"moe-alternating", "linear", "label-prior"} and all(
        0 <= r["R@1"] <= 1 for r in rows
    )
    from omnimoe.latents import LatentStore

    tokens, mask = LatentStore.open(out / "stores" / "image-efficientnet-lite0-tokens").padded_tokens()
    assert tokens.shape[1:] == (49, 1280) and mask.all()
    text_mask = LatentStore.open(out / "stores" / "text-minilm-tokens").padded_tokens()[1]
    assert text_mask.shape == (60, 6) and text_mask.all()  # "A <colour> <shape>." is 6 tokens with CLS and SEP
    # pool_tokens=4: trained on at most 4 tokens per item (49 image tokens in runs of 12-13), and a live query
    # through the retriever is pooled the same way: its vector is the connector's on the stored tokens, pooled
    import torch
    import torch.nn.functional as F

    from omnimoe.align.data import pool_tokens
    from omnimoe.retrieval import Retriever

    pooled_run = tmp_path / "pooled"
    (pooled_run / "stores").mkdir(parents=True)
    for store in (out / "stores").iterdir():
        (pooled_run / "stores" / store.name).symlink_to(store)
    at = cmd.index("--out") + 1
    again = cmd[:at] + [str(pooled_run)] + cmd[at + 1 :] + ["--set", "pool_tokens=4"]
    done = subprocess.run(again, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((pooled_run / "summary.json").read_text())["train_config"]["pool_tokens"] == 4
    retriever = Retriever(pooled_run, method="moe-alternating")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    image = str(manifest.parent / records[0]["image"])
    live = retriever.embed("image", "text", [image])
    stored = LatentStore.open(out / "stores" / "image-efficientnet-lite0-tokens")
    row = stored.ids.index(records[0]["id"])
    expect = retriever.connector("image->text", *pool_tokens(tokens[row : row + 1], mask[row : row + 1], 4)).contrastive
    assert torch.allclose(live, F.normalize(expect, dim=-1), atol=1e-4)
    unpooled = retriever.connector("image->text", tokens[row : row + 1], mask[row : row + 1]).contrastive
    assert not torch.allclose(live, F.normalize(unpooled, dim=-1), atol=1e-3)


def test_trained_on_the_prior_and_served_with_it(tmp_path):
    """prior_weight=1: training and evaluation use cos(learned) + cos(prior); the retrieval index serves exactly
    that sum (index vectors [key, prior side], queries [query, w * prior side])."""
    import torch
    import torch.nn.functional as F

    from omnimoe.align.prior import build_label_priors
    from omnimoe.encoders import load_encoder
    from omnimoe.latents import LatentStore
    from omnimoe.retrieval import Retriever

    manifest = shapes_manifest(tmp_path)
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "omnimoe.cli",
        "align",
        *ENCODERS,
        "--manifest",
        str(manifest),
        "--out",
        "run",
        "--methods",
        "linear",
        "--seeds",
        "0",
        "--set",
        "prior_weight=1.0",
        "--set",
        "steps=40",
        "--set",
        "eval_every=20",
        "--set",
        "warmup_steps=5",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path
    )  # a relative --out, as `make demo` gives
    assert done.returncode == 0, done.stderr[-3000:]
    stores = json.loads((out / "summary.json").read_text())["stores"]
    assert stores == {
        "text": "stores/text-minilm",
        "image": "stores/image-efficientnet-lite0",
    }  # relative to the run folder
    assert done.returncode == 0, done.stderr[-3000:]
    prior_file = json.loads((out / "prior.json").read_text())
    assert prior_file["prior_weight"] == 1.0 and prior_file["beta"] == {
        "linear/seed0": {"text->image": 1.0, "image->text": 1.0}
    }
    retriever = Retriever(out, method="linear")
    assert retriever.prior_weight == 1.0 and retriever.prior("text->image") is not None
    query = "A red circle."
    hits = retriever.search("text", "image", [query], k=5)[0]
    # brute force: the connector's cosine plus the prior's, over every stored image
    text_enc, image_store = load_encoder("minilm"), LatentStore.open(out / "stores" / "image-efficientnet-lite0")
    settings = prior_file["settings"]["image"]  # the bridge's settings, chosen on the train split
    assert set(settings) == {"prompt", "temperature", "top_k"}
    prior = build_label_priors({"text": "minilm", "image": "efficientnet-lite0"}, prompt=settings["prompt"])["image"]
    prior = dataclasses.replace(prior, temperature=settings["temperature"], top_k=settings["top_k"])
    pooled_q = text_enc.encode([text_enc.load_item(query)]).pooled
    with torch.no_grad():
        q = F.normalize(
            retriever.connector("text->image", pooled_q, tasks=("contrastive",)).contrastive.float(), dim=-1
        )
        keys = F.normalize(retriever.connector.embed_target("text->image", image_store.pooled()).float(), dim=-1)
    expected = (q @ keys.t() + prior.pair_scores("text->image", pooled_q, image_store.pooled()))[0]
    top = expected.topk(5).indices.tolist()
    assert [h.id for h in hits] == [image_store.ids[i] for i in top]
    assert retriever.index("text->image").record["prior_weight"] == 1.0


def test_sweep_chooses_on_a_dev_split_across_data_sets(tmp_path):
    """`omnimoe align --sweep`: every candidate on every data set, ranked by mean R@1 on a dev split (train
    captions held out from training and early stopping; averaged over seeds and data sets); chosen.json is the
    first of that ranking, recomputed here from the runs' validation.json alone."""
    import yaml

    sets = {}
    for name, split_seed in (("a", 0), ("b", 18)):
        (tmp_path / name).mkdir()
        manifest = shapes_manifest(tmp_path / name, split_seed=split_seed)
        recs = [json.loads(line) for line in manifest.read_text().splitlines()]
        held = sorted({r["text"] for r in recs if r["split"] == "train"})[::3]  # a validation split of whole captions
        write_manifest(manifest, [{**r, "split": "val" if r["text"] in held else r["split"]} for r in recs])
        sets[name] = str(manifest)
    spec = tmp_path / "sweep.yaml"
    candidates = {
        "moe-alone": {"linear_path": False, "linear_start": False},
        "linear-start": {"linear_path": True, "linear_start": True},
        "lite1": {"linear_path": True, "linear_start": True, "encoders": {"image": "efficientnet-lite1"}},
        # linear-start but for a field read after training: trained once, its runs shared
        "all-residuals": {"linear_path": True, "linear_start": True, "residual_per_direction": False},
    }
    spec.write_text(yaml.safe_dump({"candidates": candidates, "datasets": sets, "dev_fraction": 0.3}, sort_keys=False))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "omnimoe.cli", "align", "--sweep", str(spec), *ENCODERS, "--manifest", sets["a"],
           "--out", str(out), "--methods", "linear,moe-alternating", "--seeds", "0",
           "--set", "steps=40", "--set", "eval_every=20", "--set", "hidden_size=64", "--set", "num_experts=4",
           "--set", "num_experts_per_tok=2", "--set", "warmup_steps=5"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = {}
    for dataset in sets:
        assert (out / dataset / "stores").is_dir()
        for cand in candidates:
            for r in json.loads((out / dataset / cand / "validation.json").read_text()):
                assert r["split"] == "dev"
                if r["head"] == "regression":
                    continue  # retrieval is the contrastive head's (alone or fused with the prior)
                key = (cand, r["method"], r["head"])
                scores.setdefault(key, {}).setdefault(dataset, []).append(r["R@1"])
    assert {k[2] for k in scores} == {"contrastive", "contrastive+prior"}
    mean = {k: sum(sum(v) / len(v) for v in d.values()) / len(d) for k, d in scores.items()}
    top = max(mean.values())
    chosen = json.loads((out / "chosen.json").read_text())
    picked = (chosen["candidate"], chosen["method"], chosen["head"])
    assert abs(mean[picked] - top) < 1e-9 and abs(chosen["dev_mean_r1"] - top) < 1e-9  # the first (ties: any)
    assert chosen["overrides"] == candidates[picked[0]]
    lite1 = {"text": "minilm", "image": "efficientnet-lite1"}
    assert chosen["encoders"] == (lite1 if picked[0] == "lite1" else {"text": "minilm", "image": "efficientnet-lite0"})
    for dataset in sets:  # a candidate's towers: its own stores, beside the run's in the data set's folder
        assert json.loads((out / dataset / "lite1" / "summary.json").read_text())["encoders"] == lite1
        assert {p.name for p in (out / dataset / "stores").iterdir()} >= {
            "image-efficientnet-lite0",
            "image-efficientnet-lite1",
        }
    from omnimoe.align.data import AlignmentData

    for dataset, manifest in sets.items():  # dev: captions of neither train nor val
        run = out / dataset / "linear-start"
        stores = {m: run / p for m, p in json.loads((run / "summary.json").read_text())["stores"].items()}
        data = AlignmentData(manifest, stores, dev_fraction=0.3)
        splits = {s: {g for g in data.pairs("text->image", s).groups} for s in ("train", "val", "dev")}
        assert splits["dev"] and not splits["dev"] & (splits["train"] | splits["val"])
        assert json.loads((run / "run.json").read_text())["dev_fraction"] == 0.3
    assert "chosen on the dev split" in done.stdout and (out / "sweep.md").read_text() in done.stdout
    # the candidate that differs from linear-start after training alone: the same runs, linked, not retrained
    assert json.loads((out / "sweep.json").read_text())["shared_training"] == {
        f"{d}/all-residuals": {"from": f"{d}/linear-start", "runs": ["linear/seed0", "moe-alternating/seed0"]}
        for d in sets
    }
    for dataset in sets:
        first, second = out / dataset / "linear-start", out / dataset / "all-residuals"
        for method in ("linear", "moe-alternating"):
            a, b = first / "runs" / method / "seed0", second / "runs" / method / "seed0"
            for name in ("best.pt", "state.pt"):  # linked, and left as trained (a resumed run rewrites neither)
                assert (a / name).stat().st_ino == (b / name).stat().st_ino
            # rewritten when the shared run was resumed: replaced by a new file, never edited through the link
            assert (a / "train.json").read_text() == (b / "train.json").read_text()
            assert (a / "train.json").stat().st_ino != (b / "train.json").stat().st_ino
        assert (first / "residuals.json").is_file() and not (second / "residuals.json").exists()
        assert json.loads((second / "summary.json").read_text())["train_config"]["residual_per_direction"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"candidates": {"typo": {"dropuot": 0.1}}}))
    refused = subprocess.run(cmd[:5] + [str(bad)] + cmd[6:], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "candidate 'typo'" in refused.stderr and "dropuot" in refused.stderr
