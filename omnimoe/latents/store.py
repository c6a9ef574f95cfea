"""The latent store: encoder outputs for a manifest, in sharded safetensors files, read memory-mapped.

Layout of a store folder::

    store.json                  index: encoder record + one entry per shard (rebuilt from the shards)
    shard-00000.safetensors     "pooled" (n, D); with tokens also "tokens" (sum of lengths, D), "lengths" (n,)
    ...

Each shard is self-describing: its safetensors metadata holds the encoder record, the ids of its rows in
order, and the samples it skipped with the reason. A shard file appears only once complete (written to a
temporary name, then renamed), so after a crash every shard on disk is whole, ``store.json`` can be
rebuilt from them, and a resumed extraction redoes only the shards that are missing.

Reading checks the encoder: a store extracted with another encoder, or with weights whose hash changed,
is refused (stale latents silently poison training).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnimoe.io import check_file, file_record, read_json, resolve_path, write_json

INDEX = "store.json"
FORMAT_VERSION = 1
_DTYPES = {"F32": np.float32, "I64": np.int64}  # what write_shard writes; anything else is refused


class StoreError(ValueError):
    """A store is missing, damaged, or does not match what the reader expects."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise StoreError(f"{path} is truncated (no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path} has a corrupt safetensors header") from None
    return header, 8 + n


def shard_metadata(path: Path) -> dict[str, Any]:
    header, _ = read_header(path)
    meta = header.get("__metadata__", {})
    try:
        return {
            "encoder": json.loads(meta["encoder"]),
            "ids": json.loads(meta["ids"]),
            "skipped": json.loads(meta.get("skipped", "[]")),
            "index": int(meta["index"]),
        }
    except (KeyError, json.JSONDecodeError):
        raise StoreError(f"{path} is not an omnimoe latent shard (metadata missing)") from None


def memmap_tensor(path: Path, name: str) -> np.ndarray:
    """A read-only memory map of one tensor of a safetensors file (no copy)."""
    header, start = read_header(path)
    if name not in header:
        raise StoreError(f"{path} has no tensor {name!r}")
    info = header[name]
    if info["dtype"] not in _DTYPES:
        raise StoreError(f"{path}: tensor {name!r} has dtype {info['dtype']}; stores hold float32 vectors")
    dtype = _DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if path.stat().st_size < start + end:
        raise StoreError(f"{path} is truncated ({path.stat().st_size} bytes, the header needs {start + end})")
    if end == begin:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)


def encoder_matches(found: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """None when ``found`` (a store's encoder record) matches ``expected``, else why not."""
    for key in ("encoder", "weights_hash", "dim", "dtype", "preprocessing", "field", "tokens"):
        if key in expected and found.get(key) != expected[key]:
            return f"{key} is {found.get(key)!r} in the store, {expected[key]!r} now"
    return None


def write_shard(
    path: Path,
    index: int,
    record: dict[str, Any],
    ids: list[str],
    skipped: list[dict[str, str]],
    tensors: dict[str, torch.Tensor],
) -> None:
    """Atomically write one self-describing shard (see the module docstring)."""
    from safetensors.torch import save_file

    from omnimoe.io import atomic_path

    metadata = {
        "encoder": json.dumps(record, sort_keys=True),
        "ids": json.dumps(ids),
        "skipped": json.dumps(skipped),
        "index": str(index),
    }
    tensors = {k: (v.float() if v.is_floating_point() else v.long()).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def write_store(
    folder: str | Path, ids: list[str], pooled: torch.Tensor, record: dict[str, Any], shard_size: int = 4096
) -> "LatentStore":
    """Write vectors computed elsewhere (``pooled`` (N, D) for ``ids``) as a store. ``record`` describes their
    origin and needs at least ``encoder`` and ``modality``; ``dim`` is filled in."""
    folder = Path(folder)
    if len(ids) != len(pooled) or len(set(ids)) != len(ids):
        raise StoreError(f"write_store: {len(ids)} ids (unique: {len(set(ids))}) for {len(pooled)} vectors")
    if not torch.isfinite(pooled).all():
        raise StoreError("write_store: the vectors contain NaN or inf")
    record = {
        "weights_hash": None,
        "preprocessing": {},
        "field": record.get("modality"),
        "tokens": False,
        **record,
        "dim": int(pooled.shape[1]),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(0, max(1, len(ids)), shard_size):
        write_shard(
            folder / shard_name(i // shard_size),
            i // shard_size,
            record,
            ids[i : i + shard_size],
            [],
            {"pooled": pooled[i : i + shard_size].float()},
        )
    rebuild_index(folder, record, extra={"complete": True, "shard_size": shard_size})
    return LatentStore.open(folder)


def rebuild_index(
    folder: Path, encoder: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Scan the shard files and write ``store.json`` (atomically)."""
    shards = []
    for path in sorted(folder.glob("shard-*.safetensors")):
        meta = shard_metadata(path)
        if encoder is not None and (why := encoder_matches(meta["encoder"], encoder)):
            raise StoreError(
                f"{path} was written by a different encoder: {why}. Use a new --out folder or delete the store."
            )
        encoder = encoder or meta["encoder"]
        shards.append(
            {
                "file": path.name,
                "index": meta["index"],
                "rows": len(meta["ids"]),
                "skipped": meta["skipped"],
                **file_record(path),
            }
        )
    index = {"format": FORMAT_VERSION, **(encoder or {}), **(extra or {}), "shards": shards}
    write_json(folder / INDEX, index)
    return index


@dataclass
class LatentStore:
    """An opened store. ``pooled`` and ``ids`` follow shard order; ``rows_of(ids)`` maps ids to rows."""

    folder: Path
    index: dict[str, Any]
    ids: list[str]
    _shard_rows: list[int]
    _shard_files: list[Path]

    @classmethod
    def open(cls, folder: str | Path, expect: dict[str, Any] | None = None) -> "LatentStore":
        """Open a store; with ``expect`` (e.g. ``{"encoder": "minilm", "weights_hash": h}``) refuse a mismatch."""
        folder = Path(folder)
        if not (folder / INDEX).is_file():
            raise StoreError(f"{folder} is not a latent store (no {INDEX}); create one with `omnimoe extract`")
        try:
            index = read_json(folder / INDEX)
        except ValueError as exc:
            raise StoreError(
                f"{exc}; rebuild it from the shards with `omnimoe extract` (same command, same --out)"
            ) from None
        if not isinstance(index, dict) or index.get("format") != FORMAT_VERSION:
            found = index.get("format") if isinstance(index, dict) else type(index).__name__
            raise StoreError(f"{folder}: store format {found!r} is not supported (expected {FORMAT_VERSION})")
        if expect and (why := encoder_matches(index, expect)):
            raise StoreError(f"{folder} does not match the encoder: {why}. Re-extract the store.")
        ids, rows, files = [], [], []
        for shard in sorted(index["shards"], key=lambda s: s["index"]):
            path = folder / shard["file"]
            if not path.is_file():
                raise StoreError(f"{folder}: shard {shard['file']} listed in {INDEX} is missing")
            if why := check_file(path, shard, full=False):  # the fast path: sizes; `verify` reads every byte
                raise StoreError(f"{why}. Run `omnimoe store verify {folder}`, then re-extract the store.")
            meta = shard_metadata(path)
            if len(meta["ids"]) != shard.get("rows", len(meta["ids"])):
                raise StoreError(
                    f"{path}: {len(meta['ids'])} ids in the shard, {shard['rows']} in {INDEX} (a damaged store: re-extract it)"
                )
            ids.extend(meta["ids"])
            rows.append(len(meta["ids"]))
            files.append(path)
        return cls(folder, index, ids, rows, files)

    @property
    def manifest(self) -> Path | None:
        """The manifest the store was extracted from (recorded relative to the store folder), or None."""
        recorded = self.index.get("manifest")
        return resolve_path(self.folder, recorded) if recorded else None

    @property
    def dim(self) -> int:
        return int(self.index["dim"])

    @property
    def has_tokens(self) -> bool:
        return bool(self.index.get("tokens"))

    def __len__(self) -> int:
        return len(self.ids)

    def shard_pooled(self, i: int) -> np.ndarray:
        """Shard ``i``'s pooled vectors as a read-only memory map (opened on demand: a store of many shards
        holds no file open)."""
        return memmap_tensor(self._shard_files[i], "pooled")

    def verify(self) -> list[str]:
        """Every shard's bytes against the checksum written with it: one line per damaged or changed shard
        (empty when the store is whole)."""
        by_file = {s["file"]: s for s in self.index["shards"]}
        return [why for path in self._shard_files if (why := check_file(path, by_file.get(path.name)))]

    def pooled(self) -> torch.Tensor:
        """All pooled vectors (rows, D) as one float32 tensor in memory. Every shard's checksum is verified
        as it is read, and a row of NaN or inf is refused with its id: damaged bytes never reach training
        or an index."""
        if not self._shard_files:
            return torch.zeros(0, self.dim)
        damaged = self.verify()
        if damaged:
            raise StoreError("; ".join(damaged) + ". Re-extract the store.")
        out = np.empty((len(self.ids), self.dim), np.float32)
        start = 0
        for i, n in enumerate(self._shard_rows):
            shard = self.shard_pooled(i)
            if shard.shape != (n, self.dim):
                raise StoreError(
                    f"{self._shard_files[i]}: vectors of shape {tuple(shard.shape)}, expected ({n}, {self.dim}) (a damaged shard: re-extract the store)"
                )
            out[start : start + n] = shard
            bad = np.flatnonzero(~np.isfinite(out[start : start + n]).all(1))
            if len(bad):
                names = [self.ids[start + int(b)] for b in bad[:5]]
                raise StoreError(
                    f"{self._shard_files[i]}: {len(bad)} row(s) hold NaN or inf, e.g. {names} (a damaged shard: re-extract the store)"
                )
            start += n
        return torch.from_numpy(out)

    def rows_of(self, ids: list[str]) -> list[int]:
        where = {sid: i for i, sid in enumerate(self.ids)}
        missing = [sid for sid in ids if sid not in where]
        if missing:
            raise StoreError(f"{self.folder}: {len(missing)} ids not in the store, e.g. {missing[:3]}")
        return [where[sid] for sid in ids]

    def tokens(self, row: int) -> torch.Tensor:
        """Token states of one row (length, D); the store must have been extracted with tokens."""
        if not self.has_tokens:
            raise StoreError(f"{self.folder} holds pooled vectors only; extract with --tokens")
        if not 0 <= row < len(self.ids):
            raise IndexError(f"row {row} out of range for a store of {len(self.ids)} rows")
        for path, n in zip(self._shard_files, self._shard_rows):
            if row < n:
                lengths = memmap_tensor(path, "lengths")
                start = int(lengths[:row].sum())
                return torch.from_numpy(
                    np.array(memmap_tensor(path, "tokens")[start : start + int(lengths[row])], dtype=np.float32)
                )
            row -= n
        raise AssertionError("unreachable")

    def padded_tokens(self, max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's token states, right-padded: (rows, L, D) float32 and a (rows, L) bool mask.
        ``max_len`` keeps the first tokens of longer rows."""
        if not self.has_tokens:
            raise StoreError(f"{self.folder} holds pooled vectors only; extract with --tokens")
        lengths = [memmap_tensor(path, "lengths") for path in self._shard_files]
        longest = max((int(n.max()) for n in lengths if len(n)), default=1)
        width = min(longest, max_len) if max_len else longest
        out = torch.zeros(len(self.ids), width, self.dim)
        mask = torch.zeros(len(self.ids), width, dtype=torch.bool)
        row = 0
        for path, lens in zip(self._shard_files, lengths):
            tokens = memmap_tensor(path, "tokens")
            start = 0
            for n in lens.tolist():
                keep = min(n, width)
                out[row, :keep] = torch.from_numpy(np.array(tokens[start : start + keep]))
                mask[row, :keep] = True
                start += n
                row += 1
        return out, mask

    def skipped(self) -> list[dict[str, str]]:
        return [s for shard in self.index["shards"] for s in shard["skipped"]]

    def info(self) -> dict[str, Any]:
        return {
            "rows": len(self.ids),
            "unique_ids": len(set(self.ids)),
            "encoder": self.index.get("encoder"),
            "weights_hash": self.index.get("weights_hash"),
            "dim": self.index.get("dim"),
            "shards": len(self.index["shards"]),
            "modality": self.index.get("modality"),
            "field": self.index.get("field"),
            "tokens": self.has_tokens,
            "skipped": len(self.skipped()),
            "skipped_items": [f"{s.get('id')}: {s.get('reason')}" for s in self.skipped()],
            "complete": self.index.get("complete", False),
        }
