"""Adapters that write manifests from common dataset layouts: a folder of media with a CSV or JSONL of
captions, and LLaVA-style instruction JSON. (Tux Paint has its own module, :mod:`omnimoe.data.tuxpaint`.)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from omnimoe.data.manifest import ManifestError, write_manifest

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg", ".tif", ".tiff"}
AUDIO_EXTS = {".wav", ".mp3", ".ogg", ".flac", ".m4a", ".opus", ".aac"}


def normalise_caption(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".!?").split())


def grouped_split(key: str, test_fraction: float = 0.2, val_fraction: float = 0.0, seed: int = 0) -> str:
    """Deterministic split from a group key (e.g. the caption): equal keys always land in the same split."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def carved_as_val(group: str, val_fraction: float = 0.1, seed: int = 0) -> bool:
    """Whether a train caption group becomes ``val`` where a manifest has no val split: the rule training uses
    (``omnimoe.align.data.AlignmentData``) and ``omnimoe data merge`` reproduces."""
    return grouped_split(group, val_fraction, seed=seed + 1) == "test"


def _relative(path: Path, manifest: Path) -> str:
    return os.path.relpath(path.resolve(), manifest.resolve().parent)


def _read_caption_table(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ManifestError(f"captions file {path} does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{path} line {n}: not valid JSON ({exc.msg})") from None
        return rows
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def manifest_from_folder(
    media_dir: str | Path, captions: str | Path, out: str | Path, test_fraction: float = 0.2, seed: int = 0
) -> Path:
    """A folder of images and/or audio plus a caption table (CSV with a header, or JSONL).

    Columns: ``file`` (path relative to ``media_dir``; also accepted: ``image``, ``audio``, ``path``),
    ``caption`` (or ``text``); optional ``id`` (default: the file path) and ``split`` (default: a split
    grouped by caption). Other columns are kept. Several rows may share a file (several captions).
    """
    media_dir, out = Path(media_dir), Path(out)
    if not media_dir.is_dir():
        raise ManifestError(f"media folder {media_dir} does not exist")
    records = []
    for n, row in enumerate(_read_caption_table(Path(captions)), 1):
        if None in row:  # csv.DictReader puts surplus fields under None
            raise ManifestError(f"{captions} row {n}: more fields than the header; quote captions that contain commas")
        file = next((row[k] for k in ("file", "image", "audio", "path") if row.get(k)), None)
        text = row.get("caption", row.get("text"))
        if not file:
            raise ManifestError(f"{captions} row {n}: no file/image/audio/path column")
        path = media_dir / file
        ext = path.suffix.lower()
        kind = "image" if ext in IMAGE_EXTS else "audio" if ext in AUDIO_EXTS else None
        if kind is None:
            raise ManifestError(f"{captions} row {n}: {file} is neither an image nor an audio file by its extension")
        rec = {k: v for k, v in row.items() if k not in ("file", "image", "audio", "path", "caption", "text")}
        rec.update(id=str(row.get("id") or file), text=text, **{kind: _relative(path, out)})
        rec["split"] = row.get("split") or grouped_split(normalise_caption(text or file), test_fraction, seed=seed)
        records.append(rec)
    _dedupe_ids(records)
    return write_manifest(out, records)


def _dedupe_ids(records: list[dict[str, Any]]) -> None:
    """Several captions of one file share its path as id: suffix them #1, #2, ..."""
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["id"]] = counts.get(rec["id"], 0) + 1
    seen: dict[str, int] = {}
    for rec in records:
        if counts[rec["id"]] > 1:
            seen[rec["id"]] = seen.get(rec["id"], 0) + 1
            rec["id"] = f"{rec['id']}#{seen[rec['id']]}"


PLACEHOLDERS = ("<image>", "<audio>", "<video>", "<speech>")


def read_json_list(path: Path, error: type[ValueError] = ManifestError) -> list[Any]:
    """The records of a LLaVA-style JSON file (a list); ``error`` names the file and what is wrong."""
    if not path.is_file():
        raise error(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(data, list):
        raise error(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _strip_placeholders(text: str) -> str:
    for p in PLACEHOLDERS:
        text = text.replace(p, "")
    return " ".join(text.split())


def manifest_from_llava(
    json_path: str | Path, out: str | Path, media_root: str | Path | None = None, split: str = "train"
) -> Path:
    """LLaVA-style JSON (a list of records with ``image``, ``voice``/``audio``, ``video``, ``conversations``).

    Media paths are taken relative to ``media_root`` (default: the JSON's folder). ``text`` becomes the first
    answer (``from: gpt``), which in caption-style data (LLaVA-Pretrain) is the caption; the whole
    conversation is kept in ``conversations``.
    """
    json_path, out = Path(json_path), Path(out)
    data = read_json_list(json_path)
    root = Path(media_root) if media_root else json_path.parent
    records = []
    for n, rec in enumerate(data):
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise ManifestError(f"{json_path} record {n}: expected an object with a 'conversations' list")
        turns = rec["conversations"]
        answer = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
        out_rec: dict[str, Any] = {
            "id": str(rec.get("id", n)),
            "split": split,
            "text": _strip_placeholders(answer) if answer else None,
        }
        for src, dst in (("image", "image"), ("voice", "audio"), ("audio", "audio")):
            value = rec.get(src)
            if isinstance(value, list):
                value = value[0] if value else None
            if value:
                out_rec[dst] = _relative(root / value, out)
        if rec.get("video"):
            out_rec["video"] = [_relative(root / v, out) for v in _as_list(rec["video"])]
        out_rec["conversations"] = turns
        records.append(out_rec)
    _dedupe_ids(records)
    return write_manifest(out, records)


def _as_list(value: Any) -> Iterable[str]:
    return value if isinstance(value, list) else [value]


def merge_manifests(
    sources: dict[str, str | Path],
    out: str | Path,
    test_from: list[str] | None = None,
    val_fraction: float = 0.1,
) -> tuple[Path, dict[str, Any]]:
    """Several manifests -> one, to train on several data sets together: ``sources`` maps a short name to
    each manifest. Every id becomes ``<name>/<id>``, every record gains ``dataset: <name>``, and media paths
    are rewritten relative to ``out``'s folder (absolute ones kept), so the sources stay where they are.

    Splits are kept, with two exceptions:
    - a source without a ``val`` split gets one carved from its train captions, exactly as ``omnimoe align``
      carves it for that source alone (a share ``val_fraction`` of caption groups), because a merged
      manifest in which any source has ``val`` is not carved again, and early stopping would then see that
      source only;
    - ``test_from``: only these sources keep a ``test`` split; the test records of the others are set aside
      as ``heldout`` (never trained on, never scored), so that the scores are those of one data set.

    Returns the manifest's path and per-source counts by split."""
    from omnimoe.data.manifest import MEDIA_FIELDS, read_manifest

    if len(sources) < 2:
        raise ManifestError(f"merge needs at least two manifests, got {len(sources)}")
    for name in sources:
        if not name or "/" in name or name != name.strip():
            raise ManifestError(f"data set name {name!r}: expected a short name without '/' or spaces at the ends")
    unknown = sorted(set(test_from or []) - set(sources))
    if unknown:
        raise ManifestError(f"--test-from {', '.join(unknown)}: not one of the merged sets ({', '.join(sources)})")
    out = Path(out)
    for name, path in sources.items():
        if Path(path).resolve() == out.resolve():
            raise ManifestError(f"--out {out} is the manifest of {name!r}: write the merge elsewhere")
    merged: list[dict[str, Any]] = []
    stats: dict[str, Any] = {}
    for name, path in sources.items():
        path = Path(path)
        records = read_manifest(path)
        carve = val_fraction > 0 and not any(r.get("split") == "val" for r in records)
        counts: dict[str, int] = {}
        for rec in records:
            rec = {k: v for k, v in rec.items() if not k.startswith("_")}
            split = rec.get("split", "train")
            if split == "train" and carve:
                text = rec.get("text")
                group = normalise_caption(text) if isinstance(text, str) and text.strip() else rec["id"]
                split = "val" if carved_as_val(group, val_fraction) else "train"
            if split == "test" and test_from and name not in test_from:
                split = "heldout"
            for field in MEDIA_FIELDS:
                value = rec.get(field)
                if isinstance(value, str) and value and not Path(value).is_absolute():
                    media = path.resolve().parent / value
                    try:
                        rec[field] = os.path.relpath(media, out.resolve().parent)
                    except ValueError:  # another drive (Windows): no relative path exists
                        rec[field] = str(media)
            dataset = f"{name}/{rec['dataset']}" if isinstance(rec.get("dataset"), str) else name  # merged before
            rec.update(id=f"{name}/{rec['id']}", split=split, dataset=dataset)
            counts[split] = counts.get(split, 0) + 1
            merged.append(rec)
        stats[name] = {"manifest": str(path), "val_carved": carve, "splits": counts}
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(out, merged), stats
