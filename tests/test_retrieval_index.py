"""The vector index: exactness, approximate kinds, persistence, adding items, refusals."""

import warnings

import numpy as np
import pytest
import torch

from omnimoe.retrieval import index as index_mod
from omnimoe.retrieval.index import IndexMismatch, IndexSpec, VectorIndex


def clustered(n: int, dim: int = 32, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(qn @ xn.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["flat", "torch"])
def test_exact_kinds_equal_brute_force(kind):
    x, q = clustered(3000), clustered(50, seed=1)
    ids = [f"item{i}" for i in range(len(x))]
    index = VectorIndex.build(torch.from_numpy(x), ids, IndexSpec(kind=kind))
    assert index.backend == ("faiss" if kind == "flat" else "torch")
    scores, hits = index.search(q, 10)
    want = brute_force(x, q, 10)
    assert [[int(h[4:]) for h in row] for row in hits] == want.tolist()
    assert np.all(np.diff(scores, axis=1) <= 1e-6) and np.all(np.abs(scores) <= 1.0001)  # cosine, best first


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_most_true_neighbours(kind):
    x, q = clustered(5000), clustered(100, seed=2)
    index = VectorIndex.build(x, [str(i) for i in range(len(x))], IndexSpec(kind=kind))
    _, hits = index.search(q, 10)
    want = brute_force(x, q, 10)
    recall = np.mean([len({int(h) for h in row} & set(w.tolist())) / 10 for row, w in zip(hits, want)])
    assert recall >= 0.9, recall


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "torch"])
def test_save_load_and_add_without_rebuild(tmp_path, kind):
    x = clustered(1200)
    index = VectorIndex.build(
        x[:1000],
        [f"a{i}" for i in range(1000)],
        IndexSpec(kind=kind),
        record={"connector": "abc", "direction": "text->image"},
    )
    index.save(tmp_path / "ix")
    loaded = VectorIndex.load(tmp_path / "ix", expect={"connector": "abc"})
    assert loaded.ids == index.ids and loaded.spec.kind == kind
    q = clustered(20, seed=3)
    assert loaded.search(q, 5)[1] == index.search(q, 5)[1]
    loaded.add(x[1000:], [f"b{i}" for i in range(200)])
    assert len(loaded) == 1200
    _, hits = loaded.search(x[1000:1010], 1)  # each new item is its own nearest neighbour
    assert [row[0] for row in hits] == [f"b{i}" for i in range(10)]
    loaded.save(tmp_path / "ix")
    assert len(VectorIndex.load(tmp_path / "ix")) == 1200


def test_refusals(tmp_path):
    x = clustered(100)
    index = VectorIndex.build(x, [str(i) for i in range(100)], record={"connector": "abc"})
    index.save(tmp_path / "ix")
    with pytest.raises(IndexMismatch, match="connector"):
        VectorIndex.load(tmp_path / "ix", expect={"connector": "other"})
    with pytest.raises(ValueError, match="already in the index"):
        index.add(x[:1], ["5"])
    bad = x[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold NaN"):
        index.add(bad, ["x", "y", "z"])
    with pytest.raises(ValueError, match="width"):
        index.search(np.ones((1, 7), np.float32))
    with pytest.raises(ValueError, match="all zeros"):
        index.search(np.zeros((1, 32), np.float32))
    with pytest.raises(ValueError, match="index kind"):
        IndexSpec(kind="lsh")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        VectorIndex.load(tmp_path / "nothing")
    assert len(index) == 100  # nothing was lost by the refused adds


def test_torch_fallback_when_faiss_is_absent(monkeypatch):
    monkeypatch.setattr(index_mod, "faiss_available", lambda: False)
    x, q = clustered(500), clustered(5, seed=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = VectorIndex.build(x, [str(i) for i in range(500)], IndexSpec(kind="flat"))
    assert index.backend == "torch" and any("falls back" in str(w.message) for w in caught)
    assert [[int(h) for h in row] for row in index.search(q, 3)[1]] == brute_force(x, q, 3).tolist()


def test_k_larger_than_the_index():
    index = VectorIndex.build(clustered(4), ["a", "b", "c", "d"])
    scores, hits = index.search(clustered(2, seed=5), 10)
    assert scores.shape == (2, 4) and all(sorted(row) == ["a", "b", "c", "d"] for row in hits)
