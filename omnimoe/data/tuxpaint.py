"""The Tux Paint stamps (Debian package ``tuxpaint-stamps-default``, GPL-2) as an image/text/audio dataset.

Each stamp has an image (PNG or SVG), a caption file (first line English, then ``xx.utf8=`` translations),
and often a sound effect (``<name>.ogg``) and spoken captions (``<name>_desc_<lang>.ogg``). The package is
fetched with ``apt-get download`` and unpacked with ``dpkg -x`` into a cache folder (nothing is installed).

Manifest fields: ``id`` (category/name), ``split`` (grouped by normalised caption, so duplicate captions
never straddle train and test), ``text``, ``image``, ``audio`` (English spoken caption: the recording
where one exists, else espeak-ng speech when asked; ``audio_source`` says which), ``sound`` (the effect),
``category``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tqdm import tqdm

from omnimoe.data.adapters import grouped_split, normalise_caption
from omnimoe.data.debian import fetch_deb
from omnimoe.data.manifest import write_manifest

PACKAGE = "tuxpaint-stamps-default"
STAMPS = Path("usr/share/tuxpaint/stamps")
IMAGE_EXTS = (".png", ".svg")


def fetch_tuxpaint(cache: str | Path | None = None) -> Path:
    """Download and unpack the package once; returns the stamps folder."""
    return fetch_deb(PACKAGE, "tuxpaint", cache) / STAMPS


def english_caption(txt: Path) -> str | None:
    """The English caption: the first line that is not an ``xx.utf8=`` translation."""
    try:
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        line = line.strip()
        if line and "utf8=" not in line.split(" ")[0]:
            return line
    return None


def _spoken(folder: Path, name: str) -> Path | None:
    for candidate in (f"{name}_desc_en.ogg", f"{name}_desc_en_US.ogg", f"{name}_desc_en_GB.ogg", f"{name}_desc.ogg"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _espeak(text: str, path: Path) -> bool:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(path), text], capture_output=True)
    return done.returncode == 0 and path.is_file() and path.stat().st_size > 1000


def build_tuxpaint_manifest(
    out: str | Path,
    cache: str | Path | None = None,
    include_symbols: bool = False,
    synthesize_speech: bool = True,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Fetch (once) and write ``out/manifest.jsonl``; returns its path and counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    stamps = fetch_tuxpaint(cache)
    if not stamps.is_dir():
        raise RuntimeError(f"{stamps} is missing: the package layout changed?")
    records, stats = (
        [],
        {"images": 0, "no_caption": 0, "spoken_en": 0, "spoken_synth": 0, "sound": 0, "symbols_dropped": 0},
    )
    espeak_ok = synthesize_speech and (shutil.which("espeak-ng") or shutil.which("espeak")) is not None
    # One image per stamp: a stamp drawn both as PNG and SVG keeps the PNG; "_mirror" files are flipped copies.
    by_stem: dict[Path, Path] = {}
    for p in sorted(stamps.rglob("*")):
        if p.suffix.lower() in IMAGE_EXTS and not p.stem.endswith(("_mirror", "_thumb")):
            stem = p.with_suffix("")
            if stem not in by_stem or p.suffix.lower() == ".png":
                by_stem[stem] = p
    images = sorted(by_stem.values())
    for img in tqdm(images, desc="tuxpaint", unit="stamp"):
        category = img.relative_to(stamps).parts[0]
        if category == "symbols" and not include_symbols:
            stats["symbols_dropped"] += 1
            continue
        stats["images"] += 1
        caption = english_caption(img.with_suffix(".txt"))
        if not caption:
            stats["no_caption"] += 1
            continue
        sid = str(img.relative_to(stamps).with_suffix("")).replace(os.sep, "/")
        rec: dict[str, Any] = {
            "id": sid,
            "split": grouped_split(normalise_caption(caption), test_fraction, seed=seed),
            "text": caption,
            "image": os.path.relpath(img, out.resolve()),
            "category": category,
        }
        spoken = _spoken(img.parent, img.stem)
        if spoken is not None:
            rec["audio"], rec["audio_source"] = os.path.relpath(spoken, out.resolve()), "recorded"
            stats["spoken_en"] += 1
        elif espeak_ok:
            wav = out / "speech" / (sid.replace("/", "__") + ".wav")
            if wav.is_file() or _espeak(caption, wav):
                rec["audio"], rec["audio_source"] = os.path.relpath(wav, out), "espeak-ng"
                stats["spoken_synth"] += 1
        effect = img.with_suffix(".ogg")
        if effect.is_file():
            rec["sound"] = os.path.relpath(effect, out.resolve())
            stats["sound"] += 1
        records.append(rec)
    if not records:
        raise RuntimeError(f"no captioned stamps found under {stamps}")
    stats["samples"] = len(records)
    stats["unique_captions"] = len({normalise_caption(r["text"]) for r in records})
    stats["splits"] = {s: sum(r["split"] == s for r in records) for s in ("train", "test")}
    write_manifest(manifest, records)
    return manifest, stats
