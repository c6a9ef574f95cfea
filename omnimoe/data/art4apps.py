"""The Art4Apps word pictures (inside the Debian package ``pysiogame``) as a text/image dataset.

585 colour cartoon pictures (200 x 200 JPEG) of single words in 12 categories (animals, actions, food, jobs,
fruit and vegetables, clothes, body, construction, people, sport, transport, nature), the word being the file
name (``baby_rabbit.jpg``: "baby rabbit"). Art4Apps is by Smart4Kids under CC BY-SA (the package's
CREDITS.txt). Every word is unique, so the split grouped by text is a random one; ``category`` allows a
category-held-out split.

Manifest fields: ``id`` (category/word), ``split``, ``text`` (the word or phrase), ``image``, ``category``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omnimoe.data.adapters import grouped_split, normalise_caption
from omnimoe.data.debian import fetch_deb
from omnimoe.data.manifest import write_manifest

PACKAGE = "pysiogame"
PICTURES = Path("usr/share/games/pysiogame/res/images/art4apps")


def build_art4apps_manifest(
    out: str | Path, cache: str | Path | None = None, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Path, dict[str, Any]]:
    """Fetch (once) and write ``out/manifest.jsonl``; returns its path and counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pictures = fetch_deb(PACKAGE, "art4apps", cache) / PICTURES
    if not pictures.is_dir():
        raise RuntimeError(f"{pictures} is missing: the package layout changed?")
    records = []
    for img in sorted(pictures.glob("*/*.jpg")):
        text = img.stem.replace("_", " ").strip()
        if not text:
            continue
        records.append(
            {
                "id": f"{img.parent.name}/{img.stem}",
                "split": grouped_split(normalise_caption(text), test_fraction, seed=seed),
                "text": text,
                "image": os.path.relpath(img.resolve(), out.resolve()),
                "category": img.parent.name,
            }
        )
    if not records:
        raise RuntimeError(f"no pictures found under {pictures}")
    manifest = out / "manifest.jsonl"
    write_manifest(manifest, records)
    stats = {
        "samples": len(records),
        "unique_texts": len({normalise_caption(r["text"]) for r in records}),
        "categories": len({r["category"] for r in records}),
        "splits": {s: sum(r["split"] == s for r in records) for s in ("train", "test")},
    }
    return manifest, stats
