"""Atomic file writes and the ``save_pretrained`` / ``from_pretrained`` folder format.

A pretrained folder holds ``config.json`` (the dataclass config plus a ``"model_type"`` tag) and
``model.safetensors`` (the state dict). Writes go to a temporary file in the same folder and are renamed
into place, so a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def cache_dir() -> Path:
    """Where downloaded and converted weights and data stay between runs: ``$OMNIMOE_CACHE``, else
    ``~/.cache/omnimoe``."""
    return Path(os.environ.get("OMNIMOE_CACHE", Path.home() / ".cache" / "omnimoe"))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _non_finite(obj: Any, where: str = "") -> str | None:
    """Where the first NaN or infinity in ``obj`` is, as ``key.path = value`` (None when every number is finite)."""
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return f"{where or '(top level)'} = {obj}"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as JSON. NaN and infinities are refused (they are not JSON, and a result
    that holds one is not a result): the error names the file and the key."""
    bad = _non_finite(obj)
    if bad is not None:
        raise ValueError(f"{path}: {bad} is not a finite number; not written")  # e.g. "rows.1.loss = nan"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def relative_path(path: str | Path, folder: str | Path) -> str:
    """``path`` as a file in ``folder`` records it: relative to ``folder`` (readers resolve it there with
    :func:`resolve_path`, so the folder can be moved or copied with what it points to), absolute when no
    relative path exists (another drive)."""
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(folder).resolve())).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def resolve_path(folder: str | Path, recorded: str) -> Path:
    """A path recorded by :func:`relative_path` (or an absolute one, as older files hold), made usable."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(folder) / path


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file: written beside data files, checked when they are read."""
    return {"bytes": Path(path).stat().st_size, "sha256": file_sha256(path)}


def check_file(path: str | Path, record: dict[str, Any] | None, full: bool = True) -> str | None:
    """Why ``path`` no longer matches its ``record`` (missing, another size, other bytes), or None. ``full=False``
    checks the size only (the fast path on open). A record without a checksum (older files) passes."""
    path = Path(path)
    if not path.is_file():
        return f"{path} is missing"
    if not record:
        return None
    if "bytes" in record and path.stat().st_size != record["bytes"]:
        return f"{path} has {path.stat().st_size} bytes, {record['bytes']} were written"
    if full and "sha256" in record and file_sha256(path) != record["sha256"]:
        return f"{path} does not match its checksum (damaged or changed since it was written)"
    return None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors are made contiguous; shared storage is cloned)."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return load_file(str(path))


def save_pretrained(
    folder: str | Path, model_type: str, config: dict[str, Any], state_dict: dict[str, torch.Tensor]
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_NAME, state_dict, metadata={"format": "pt", "model_type": model_type})
    write_json(folder / CONFIG_NAME, {"model_type": model_type, **config})
    return folder


def load_pretrained(folder: str | Path, model_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a pretrained folder; refuse one written for another model type."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder written by save_pretrained")
    config = read_json(folder / CONFIG_NAME)
    found = config.pop("model_type", None)
    if found != model_type:
        raise ValueError(f"{folder} holds a {found!r} model, not a {model_type!r}")
    return config, load_tensors(folder / WEIGHTS_NAME)
