"""Extraction: run one frozen encoder once over a manifest field and write a latent store.

The samples that have the field are cut, in manifest order, into shards of ``shard_size``. Shard ``i`` is
written by rank ``i % world`` (torchrun splits the work without talking), atomically, so that:

* a run killed at any moment resumes by redoing only the shards not on disk: no row missing, none twice;
* the store's index is rebuilt from the shard files at the end by rank 0.

Bad items (missing or corrupt files, empty captions, duplicate ids, non-finite encoder output) are named
with their sample id and reason. With ``on_error="skip"`` they are left out and recorded in the store; with
``"fatal"`` the run stops at the first one, keeping every finished shard.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

from omnimoe.data.manifest import MEDIA_FIELDS, media_path, read_manifest
from omnimoe.encoders import BadInput, EncoderOptions, FrozenEncoder, load_encoder
from omnimoe.io import check_file, read_json, relative_path
from omnimoe.threads import ThreadPolicy
from omnimoe.runtime import init_distributed
from omnimoe.latents.store import (
    INDEX,
    StoreError,
    encoder_matches,
    read_header,
    rebuild_index,
    shard_metadata,
    shard_name,
    write_shard,
)

OnError = Literal["skip", "fatal"]


class ExtractionError(RuntimeError):
    """A bad item under on_error='fatal'; finished shards are kept, a rerun resumes."""


@dataclass
class Item:
    sample_id: str
    value: Any  # a caption, or an absolute media path


def _report(message: str) -> None:
    tqdm.write(f"skip: {message}", file=sys.stderr)


def _items(manifest: Path, field: str, on_error: OnError) -> tuple[list[Item], list[dict[str, str]]]:
    records = read_manifest(manifest)
    seen: set[str] = set()
    items, skipped = [], []
    for rec in records:
        sid = rec["id"]
        if sid in seen:
            reason = f"duplicate id (line {rec['_line']})"
            if on_error == "fatal":
                raise ExtractionError(f"sample {sid!r}: {reason}")
            _report(f"{sid}: {reason}")
            skipped.append({"id": sid, "reason": reason})
            continue
        seen.add(sid)
        value = rec.get(field)
        if value is None:
            continue
        items.append(Item(sid, str(media_path(manifest, value)) if field in MEDIA_FIELDS else value))
    return items, skipped


def _load(encoder: FrozenEncoder, batch: list[Item]) -> list[tuple[Item, Any] | tuple[Item, BadInput]]:
    out = []
    for item in batch:
        try:
            out.append((item, encoder.load_item(item.value)))
        except BadInput as exc:
            out.append((item, exc))
    return out


def extract(
    manifest: str | Path,
    encoder: str | FrozenEncoder,
    out: str | Path,
    field: str | None = None,
    tokens: bool = False,
    shard_size: int = 1024,
    on_error: OnError = "skip",
    options: EncoderOptions | None = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Extract ``encoder`` over ``manifest``'s ``field`` (default: the encoder's modality) into store ``out``.

    Under torchrun (WORLD_SIZE > 1) every rank takes its share of shards; rank 0 returns the index.
    """
    manifest, out = Path(manifest), Path(out)
    if on_error not in ("skip", "fatal"):
        raise ValueError(f"on_error must be 'skip' or 'fatal', got {on_error!r}")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    enc = encoder if isinstance(encoder, FrozenEncoder) else load_encoder(encoder, options)
    field = field or enc.modality
    record = {**enc.describe(), "field": field, "tokens": tokens}

    rank, world = init_distributed()
    items, dup_skipped = _items(manifest, field, on_error)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(out, record)
    n_shards = math.ceil(len(items) / shard_size)
    mine = [i for i in range(n_shards) if i % world == rank]
    recorded = _recorded_shards(out)
    todo = [
        i
        for i in mine
        if not _shard_is_current(
            out / shard_name(i), items[i * shard_size : (i + 1) * shard_size], recorded.get(shard_name(i))
        )
    ]
    for i in todo:  # leftovers of a killed run (never renamed into place), or a shard that no longer fits
        for stale in [*out.glob(f".{shard_name(i)}.*.tmp"), out / shard_name(i)]:
            stale.unlink(missing_ok=True)
    if rank == 0:  # shards beyond the current end (the manifest shrank or the shard size changed)
        for path in out.glob("shard-*.safetensors"):
            if int(path.stem.split("-")[1]) >= n_shards:
                path.unlink()

    total = sum(len(items[i * shard_size : (i + 1) * shard_size]) for i in todo)
    bar = tqdm(
        total=total, unit="item", desc=f"extract {enc.name}", disable=not progress or rank != 0, dynamic_ncols=True
    )
    batch_size = enc.options.batch_size
    # reads/decodes the next batch while this one encodes; encoder forwards are large work (omnimoe.threads)
    with ThreadPoolExecutor(max_workers=1) as pool, ThreadPolicy("large") as threads:
        for i in todo:
            chunk = items[i * shard_size : (i + 1) * shard_size]
            batches = [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
            ids, pooled, tok, lengths = [], [], [], []
            skipped = dup_skipped if i == 0 else []
            pending = pool.submit(_load, enc, batches[0]) if batches else None
            for b in range(len(batches)):
                loaded = pending.result()
                pending = pool.submit(_load, enc, batches[b + 1]) if b + 1 < len(batches) else None
                good = []
                for item, value in loaded:
                    if isinstance(value, BadInput):
                        _fail_or_skip(item, str(value), on_error, skipped)
                    else:
                        good.append((item, value))
                if good:
                    threads.tick()
                    result = enc.encode([v for _, v in good])
                    finite = torch.isfinite(result.pooled).all(1)
                    if result.tokens is not None:
                        finite &= torch.isfinite(result.tokens).flatten(1).all(1)
                    for r, (item, _) in enumerate(good):
                        if not finite[r]:
                            _fail_or_skip(item, "the encoder produced non-finite values", on_error, skipped)
                            continue
                        ids.append(item.sample_id)
                        pooled.append(result.pooled[r])
                        if tokens:
                            n = int(result.mask[r].sum())
                            tok.append(result.tokens[r][result.mask[r]])
                            lengths.append(n)
                bar.update(len(loaded))
            tensors = {"pooled": torch.stack(pooled) if pooled else torch.zeros(0, enc.dim)}
            if tokens:
                tensors["tokens"] = torch.cat(tok) if tok else torch.zeros(0, enc.dim)
                tensors["lengths"] = torch.tensor(lengths, dtype=torch.int64)
            write_shard(out / shard_name(i), i, record, ids, skipped, tensors)
    bar.close()

    if world > 1:
        dist.barrier()  # every shard is on disk
    index = None
    if rank == 0:
        complete = all((out / shard_name(i)).is_file() for i in range(n_shards))
        index = rebuild_index(
            out,
            record,
            extra={"manifest": relative_path(manifest, out), "complete": complete, "shard_size": shard_size},
        )
    if world > 1:
        dist.barrier()  # and the index too, before any rank opens the store
    return index


def _recorded_shards(out: Path) -> dict[str, dict[str, Any]]:
    """The shard entries (size, checksum) of an existing ``store.json``; none when it is missing or unreadable
    (it is rebuilt from the shards at the end)."""
    try:
        index = read_json(out / INDEX)
    except (FileNotFoundError, ValueError):
        return {}
    return (
        {s["file"]: s for s in index.get("shards", []) if isinstance(s, dict) and "file" in s}
        if isinstance(index, dict)
        else {}
    )


def _shard_is_current(path: Path, chunk: list[Item], recorded: dict[str, Any] | None = None) -> bool:
    """A shard on disk counts as done only if it holds exactly this chunk: its rows plus its skipped items
    are the chunk's ids, in order, and its bytes match the checksum ``store.json`` recorded for it. A changed
    manifest or shard size, or a damaged file, means redo."""
    if not path.is_file() or check_file(path, recorded):
        return False
    try:
        meta = shard_metadata(path)
        read_header(path)
    except StoreError:
        return False
    skipped = {s["id"] for s in meta["skipped"] if not s["reason"].startswith("duplicate id")}
    expected = [item.sample_id for item in chunk]
    return meta["ids"] == [sid for sid in expected if sid not in skipped] and skipped <= set(expected)


def _fail_or_skip(item: Item, reason: str, on_error: OnError, skipped: list[dict[str, str]]) -> None:
    if on_error == "fatal":
        raise ExtractionError(f"sample {item.sample_id!r}: {reason}")
    _report(f"{item.sample_id}: {reason}")
    skipped.append({"id": item.sample_id, "reason": reason})


def _check_existing(out: Path, record: dict[str, Any]) -> None:
    """Refuse to mix encoders in one folder: an existing store or shard must match this encoder."""
    index = {}
    if (out / INDEX).is_file():
        try:
            index = read_json(out / INDEX)
        except ValueError:  # unreadable: rebuilt from the shards, which are checked below
            index = {}
    if isinstance(index, dict) and index:
        if why := encoder_matches(index, record):
            raise StoreError(f"{out} holds latents of another encoder: {why}. Use a new --out folder or delete it.")
    for path in sorted(out.glob("shard-*.safetensors")):
        try:
            meta = shard_metadata(path)
        except StoreError:
            continue  # a damaged shard is redone
        if why := encoder_matches(meta["encoder"], record):
            raise StoreError(f"{out} holds latents of another encoder: {why}. Use a new --out folder or delete it.")
        break
