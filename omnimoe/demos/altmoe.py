"""The main demo: Alt-MoE on the Tux Paint stamps, on the embedded default encoders.

1. fetch the stamps (Debian package) and write the manifest, speaking every caption with espeak-ng when it
   is installed (the recorded English captions are used where they exist);
2. extract mpnet (text), EfficientNet-Lite2 (image), Whisper-tiny (speech; and sound effects);
3. train every method (linear two-tower, MLP with alternation, MoE joint, MoE alternating) with 3 seeds, all
   directions among the modalities in one connector, on stored latents;
4. evaluate on the held-out split (grouped by caption) and print the comparison; write results and plots;
5. build the retrieval index of every direction for the connector validation ranks first (fused with the label
   prior where validation chose it; ``<out>/index/<method>[+prior]``) and run one search of each kind for a
   held-out item drawn at random (fixed seed), ready for ``omnimoe search`` and ``omnimoe serve``.

``quick=True`` runs the same path on a small slice with short training and the smallest towers (MiniLM,
EfficientNet-Lite0): a CI smoke test, about a minute.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from omnimoe.align.pipeline import AlignConfig, markdown_table, run_align, zero_shot_table
from omnimoe.align.config import METHODS, TrainConfig
from omnimoe.align.connector import ConnectorConfig
from omnimoe.data.manifest import media_path, read_manifest, write_manifest
from omnimoe.data.tuxpaint import build_tuxpaint_manifest

ENCODERS = {  # text and image: the pair a sweep on the dev splits of two data sets ranked first (docs/results.md)
    "text": "mpnet",
    "image": "efficientnet-lite2",
    "speech": "whisper-tiny@audio",
    "sound": "whisper-tiny@sound",
}
QUICK_ENCODERS = {**ENCODERS, "text": "minilm", "image": "efficientnet-lite0"}  # the smallest towers, for --quick


def _slice(manifest: Path, every: int) -> Path:
    """Every ``every``-th sample, written beside the full manifest (media paths stay valid)."""
    records = read_manifest(manifest)
    return write_manifest(manifest.with_name("manifest-quick.jsonl"), records[::every])


def comparison(summary: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """Mean R@1 over the given directions per method and head (the connector's contrastive head; the label
    prior alone; the two fused), with the spread over seeds."""
    lines = []
    for head, methods in (("contrastive", METHODS), ("prior", ("label-prior",)), ("contrastive+prior", METHODS)):
        for method in methods:
            rows = [
                s for s in summary if s["method"] == method and s["head"] == head and (s["query"], s["target"]) in pairs
            ]
            if rows:
                mean = statistics.fmean(r["R@1"] for r in rows)
                spread = statistics.fmean(r["R@1_std"] for r in rows)
                lines.append(
                    f"  {method + (' + prior' if head == 'contrastive+prior' else ''):<25} mean R@1 {mean:.3f} (spread over seeds ±{spread:.3f})"
                )
    return "\n".join(lines)


def build_retrieval(out: Path, manifest: Path, method: str | None = None, seed: int = 0) -> dict[str, Any]:
    """Index every direction's targets for ``method`` (default: what the run chose on validation, with the label
    prior where validation chose it) and try a text query and an image query of one held-out item drawn at
    random (``seed``)."""
    from omnimoe.retrieval import Retriever

    retriever = Retriever(out, method=method)
    sizes = retriever.build_all()
    test = [r for r in read_manifest(manifest) if r.get("split") == "test" and r.get("text") and r.get("image")]
    examples = []
    if test:
        sample = random.Random(seed).choice(test)
        for kind, query, target in (
            ("text", sample["text"], "image"),
            ("image", str(media_path(manifest, sample["image"])), "text"),
        ):
            source = retriever.source_for(kind, target)
            retriever.search(source, target, [query], 3)  # the first query loads the encoder; time the second
            hits, ms = retriever.timed_search(source, target, [query], 3)
            examples.append(
                {
                    "query": sample["text"] if kind == "text" else sample["id"] + " (image)",
                    "direction": f"{source}->{target}",
                    "ms": ms,
                    "hits": [(h.id, h.score, (retriever.item(h.id) or {}).get("text")) for h in hits[0]],
                }
            )
    return {
        "method": retriever.method,
        "head": retriever.head,
        "chosen_on_validation": retriever.chosen,
        "served": retriever.served,
        "index": str(retriever.index_root),
        "sizes": sizes,
        "examples": examples,
    }


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, cache: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    out = Path(out)
    manifest, stats = build_tuxpaint_manifest(out / "data", cache, synthesize_speech=True)
    if quick:
        manifest = _slice(manifest, 6)
        train = TrainConfig(
            steps=240,
            eval_every=60,
            warmup_steps=10,
            connector=ConnectorConfig(num_experts=4, num_experts_per_tok=2, hidden_size=64),
        )
        cfg = AlignConfig(
            str(manifest), dict(QUICK_ENCODERS), str(out), methods=["linear", "moe-alternating"], seeds=[0], train=train
        )
    else:
        train = TrainConfig(steps=1800, eval_every=100)
        cfg = AlignConfig(str(manifest), dict(ENCODERS), str(out), methods=list(METHODS), seeds=[0, 1, 2], train=train)
    result = run_align(cfg, progress=progress)
    result["stats"] = stats
    result["retrieval"] = build_retrieval(out, manifest)
    result["text_image"] = comparison(result["summary"], [("text", "image"), ("image", "text")])
    return result


def report(result: dict[str, Any]) -> str:
    text = (
        markdown_table(result["summary"])
        + zero_shot_table(result["zeroshot"])
        + "\ntext <-> image, mean over both directions:\n"
        + result["text_image"]
        + "\nA difference is real only when it exceeds the spread."
    )
    if retrieval := result.get("retrieval"):
        sizes = ", ".join(f"{d} {n}" for d, n in retrieval["sizes"].items())
        served = retrieval.get("served", retrieval["method"])
        text += f"\n\nRetrieval index ({served}): {retrieval['index']}\n  items per direction: {sizes}"
        for ex in retrieval["examples"]:
            text += f"\n  {ex['direction']} for {ex['query']!r} ({ex['ms']:.1f} ms):"
            for sid, score, caption in ex["hits"]:
                text += f"\n    {score:.3f}  {sid}  {caption or ''}"
        text += '\nTry: omnimoe search "a red fire truck" --target image -k 5   |   omnimoe serve  (then open http://127.0.0.1:8000)'
    return text
