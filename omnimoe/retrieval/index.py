"""A vector index over one modality's projected latents: faiss when installed, torch otherwise.

Vectors are L2-normalised on the way in (items and queries), so inner product is cosine similarity.
Kinds:

* ``flat`` (default): exact inner product (faiss ``IndexFlatIP``);
* ``ivf``: inverted lists (``IndexIVFFlat``, ``nlist`` cells, ``nprobe`` searched): approximate, fast on
  large stores, trained on the vectors it is built from;
* ``hnsw``: a graph (``IndexHNSWFlat``): approximate, the fastest search, the slowest build;
* ``torch``: exact, a matmul and top-k in torch (the fallback when faiss is not installed).

A saved index is a folder: ``index.json`` (kind, ids in row order, and a *record* of what the vectors are:
the connector's hash, the direction, the store's version) and ``index.faiss`` or ``vectors.safetensors``.
Loading with ``expect=`` refuses an index whose record differs (another connector, another direction).
Items are added without a rebuild (``add``); ids are unique.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from omnimoe.config import from_dict
from omnimoe.io import atomic_path, check_file, file_record, load_tensors, read_json, save_tensors, write_json

Kind = Literal["flat", "ivf", "hnsw", "torch"]
KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw", "torch")
META = "index.json"
FORMAT_VERSION = 1


class IndexMismatch(ValueError):
    """A saved index was built from other vectors (another connector, direction or store) than asked for."""


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


@dataclass
class IndexSpec:
    kind: Kind = "flat"
    nlist: int = 0  # ivf: cells; 0 = about sqrt(n), at least 39 training vectors per cell
    nprobe: int = 16  # ivf: cells searched per query
    hnsw_m: int = 32  # hnsw: links per node
    ef_search: int = 128  # hnsw: candidate list while searching
    ef_construction: int = 80  # hnsw: candidate list while building

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind {self.kind!r} is not one of {list(KINDS)}")


def normalise(x: torch.Tensor | np.ndarray, what: str = "vectors") -> np.ndarray:
    """float32, contiguous, unit rows; NaN / inf and all-zero rows are refused by row number."""
    a = np.ascontiguousarray(
        x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    )
    if a.ndim != 2:
        raise ValueError(f"{what}: expected a (n, dim) matrix, got shape {a.shape}")
    bad = np.flatnonzero(~np.isfinite(a).all(1))
    if len(bad):
        raise ValueError(f"{what}: row(s) {bad[:5].tolist()} hold NaN or inf")
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    if len(a) and (zero := np.flatnonzero(norms[:, 0] == 0)).size:
        raise ValueError(f"{what}: row(s) {zero[:5].tolist()} are all zeros")
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


@contextmanager
def _faiss_threads(n_queries: int) -> Iterator[None]:
    """One OpenMP thread for a handful of queries: faiss splits a single query's scan across threads, and
    on a small machine the fork/join costs more than it saves (measured: 100k flat, 4.3 ms on 1 thread
    against 11 ms on 2)."""
    import faiss

    before = faiss.omp_get_max_threads()
    if n_queries < 8:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class VectorIndex:
    """``build`` / ``add`` / ``search`` / ``save`` / ``load``. ``record`` says what the vectors are."""

    def __init__(self, dim: int, spec: IndexSpec | None = None, record: dict[str, Any] | None = None) -> None:
        self.dim = dim
        self.spec = spec or IndexSpec()
        self.record: dict[str, Any] = dict(record or {})
        self.ids: list[str] = []
        self._pos: dict[str, int] = {}
        self.backend = "torch" if self.spec.kind == "torch" or not faiss_available() else "faiss"
        if self.backend == "torch" and self.spec.kind != "torch":
            warnings.warn(
                f"faiss is not installed: the {self.spec.kind!r} index falls back to exact torch search", stacklevel=2
            )
        self._faiss: Any = None
        self._vectors = torch.zeros(0, dim)

    # -- building -------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        vectors: torch.Tensor | np.ndarray,
        ids: list[str],
        spec: IndexSpec | None = None,
        record: dict[str, Any] | None = None,
    ) -> "VectorIndex":
        a = normalise(vectors)
        index = cls(a.shape[1], spec, record)
        index._create(a)
        index._append(a, ids)
        return index

    def _create(self, train: np.ndarray) -> None:
        if self.backend != "faiss":
            return
        import faiss

        s, d = self.spec, self.dim
        if s.kind == "flat":
            self._faiss = faiss.IndexFlatIP(d)
        elif s.kind == "hnsw":
            self._faiss = faiss.IndexHNSWFlat(d, s.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._faiss.hnsw.efConstruction = s.ef_construction
            self._faiss.hnsw.efSearch = s.ef_search
        else:  # ivf
            if len(train) == 0:
                raise ValueError(
                    "an ivf index is trained on the vectors it is built from: build it from at least one vector"
                )
            nlist = s.nlist or max(1, min(round(len(train) ** 0.5), len(train) // 39))
            self.spec.nlist = nlist = min(nlist, len(train))
            self._faiss = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            # k-means on at most 64 vectors a cell: enough for the centroids, and 1M items train in seconds
            sample = (
                train
                if len(train) <= 64 * nlist
                else train[np.random.default_rng(0).choice(len(train), 64 * nlist, replace=False)]
            )
            self._faiss.train(sample)
            self._faiss.nprobe = min(s.nprobe, nlist)

    def add(self, vectors: torch.Tensor | np.ndarray, ids: list[str]) -> None:
        """Append items (no rebuild); an id already in the index, or twice in ``ids``, is refused."""
        a = normalise(vectors)
        if a.shape[1] != self.dim:
            raise ValueError(f"vectors of width {a.shape[1]} do not fit an index of width {self.dim}")
        self._append(a, ids)

    def _append(self, a: np.ndarray, ids: list[str]) -> None:
        """``add`` after normalisation (``build`` has normalised already: 1M vectors are 1 GB to copy)."""
        if len(ids) != len(a):
            raise ValueError(f"{len(ids)} ids for {len(a)} vectors")
        dup = [i for i in ids if i in self._pos]
        if dup or len(set(ids)) != len(ids):
            raise ValueError(f"ids already in the index or repeated: {(dup or ids)[:3]}")
        if self.backend == "faiss":
            if self._faiss is None:
                self._create(a)
            self._faiss.add(a)
        else:
            self._vectors = torch.cat([self._vectors, torch.from_numpy(a)])
        for sid in ids:
            self._pos[sid] = len(self.ids)
            self.ids.append(sid)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, sid: str) -> bool:
        return sid in self._pos

    # -- searching ------------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` items per query row: scores (Q, k') (cosine, best first) and their ids, k' = min(k, n)."""
        q = normalise(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries of width {q.shape[1]} do not fit an index of width {self.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, len(self.ids))
        if k == 0:
            return np.zeros((len(q), 0), np.float32), [[] for _ in q]
        if self.backend == "faiss":
            with _faiss_threads(len(q)):
                scores, rows = self._faiss.search(q, k)
        else:
            top = torch.topk(torch.from_numpy(q) @ self._vectors.T, k, dim=1)
            scores, rows = top.values.numpy(), top.indices.numpy()
        hits = [[self.ids[r] for r in row if r >= 0] for row in rows]  # ivf may find fewer than k
        return scores, hits

    # -- persistence ----------------------------------------------------------------------------------
    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.backend == "faiss":
            import faiss

            data = folder / "index.faiss"
            with atomic_path(data) as tmp:
                faiss.write_index(self._faiss if self._faiss is not None else faiss.IndexFlatIP(self.dim), str(tmp))
        else:
            data = folder / "vectors.safetensors"
            save_tensors(data, {"vectors": self._vectors})
        write_json(
            folder / META,
            {
                "format": FORMAT_VERSION,
                "dim": self.dim,
                "backend": self.backend,
                "spec": asdict(self.spec),
                "record": self.record,
                "ids": self.ids,
                "files": {data.name: file_record(data)},
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, expect: dict[str, Any] | None = None) -> "VectorIndex":
        """Open a saved index; every key of ``expect`` must equal the saved record's (else IndexMismatch)."""
        folder = Path(folder)
        if not (folder / META).is_file():
            raise FileNotFoundError(f"{folder} is not a saved index (no {META})")
        meta = read_json(folder / META)
        if meta.get("format") != FORMAT_VERSION:
            raise IndexMismatch(
                f"{folder}: index format {meta.get('format')!r} is not supported (expected {FORMAT_VERSION})"
            )
        for key, want in (expect or {}).items():
            if meta["record"].get(key) != want:
                raise IndexMismatch(
                    f"{folder} was built for {key}={meta['record'].get(key)!r}, not {want!r}: rebuild it"
                )
        for name, record in meta.get("files", {}).items():  # written with the index: any changed byte is refused
            if why := check_file(folder / name, record):
                raise IndexMismatch(f"{why} (a damaged index: rebuild it)")
        index = cls(meta["dim"], from_dict(IndexSpec, meta["spec"]), meta["record"])
        if meta["backend"] == "faiss":
            if not faiss_available():
                raise RuntimeError(f"{folder} is a faiss index and faiss is not installed (pip install faiss-cpu)")
            import faiss

            index.backend, index._faiss = "faiss", faiss.read_index(str(folder / "index.faiss"))
            count = index._faiss.ntotal
        else:
            index.backend = "torch"
            index._vectors = load_tensors(folder / "vectors.safetensors")["vectors"]
            count = len(index._vectors)
        if count != len(meta["ids"]):
            raise IndexMismatch(f"{folder}: {count} vectors but {len(meta['ids'])} ids (a damaged index: rebuild it)")
        for sid in meta["ids"]:
            index._pos[sid] = len(index.ids)
            index.ids.append(sid)
        return index


def ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]
