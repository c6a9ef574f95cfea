"""Real-time retrieval over an alignment run (``omnimoe align`` / ``omnimoe demo`` output).

The target side is done once: each target modality's stored latents go through the connector's target
projection for the direction ``source->target`` and into a :class:`VectorIndex` (saved under
``<run>/index/<method>/<source>-to-<target>[.<kind>]``). A query runs only its own encoder and the small connector:

    raw text / image file / audio file -> frozen encoder -> connector (direction) -> index search

Indexes are built on first use and reused after; one built with another connector, or from a store whose
encoder changed, is refused (``rebuild=True`` replaces it). Items extracted into a store after the index
was built are added without a rebuild (``update``).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from omnimoe.align.connector import AltMoEConnector, direction_name, load_connector
from omnimoe.align.data import pool_tokens
from omnimoe.align.query import MAX_ROWS as QUERY_PATH_MAX_ROWS
from omnimoe.align.query import QueryPath
from omnimoe.data.manifest import MEDIA_FIELDS, media_path, read_manifest
from omnimoe.encoders.base import hash_state_dict
from omnimoe.io import read_json, resolve_path
from omnimoe.latents.store import LatentStore
from omnimoe.align.prior import PLAIN_BRIDGE
from omnimoe.retrieval.index import IndexMismatch, IndexSpec, VectorIndex, ids_digest

DEFAULT_METHOD = "moe-alternating"


class QueryError(ValueError):
    """A query cannot be answered (unknown modality or target, empty text, unreadable file); the message says why."""


@dataclass
class Hit:
    id: str
    score: float
    rank: int


class Retriever:
    """Search the stored items of one modality with a query of another, through a trained connector."""

    def __init__(
        self,
        run: str | Path,
        method: str | None = None,
        spec: IndexSpec | None = None,
        index_root: str | Path | None = None,
        rebuild: bool = False,
        batch_size: int = 1024,
        label_prior: bool | None = None,
    ) -> None:
        """``method``: which trained connector of the run; None serves the one the run chose on validation
        (``summary.json`` ``chosen``; runs written before that: ``moe-alternating``). ``label_prior``: fuse
        the connector's score with the label prior; None does so where validation chose it for the method.
        A connector trained on top of the prior is always served with it."""
        self.run = Path(run)
        summary_path = self.run / "summary.json"
        if not summary_path.is_file():
            raise FileNotFoundError(
                f"{self.run} is not an alignment run (no summary.json): run `omnimoe demo` or `omnimoe align` first"
            )
        summary = read_json(summary_path)
        chosen = summary.get("chosen") or {}
        self.chosen = method is None and bool(chosen)  # serving what validation chose
        method = method or chosen.get("method") or DEFAULT_METHOD
        folder = self.run / "connectors" / method
        if not folder.is_dir():
            have = (
                sorted(p.name for p in (self.run / "connectors").glob("*"))
                if (self.run / "connectors").is_dir()
                else []
            )
            raise FileNotFoundError(f"{self.run} has no trained connector for method {method!r} (have {have})")
        self.method = method
        self.connector = load_connector(folder)
        self.connector_hash = hash_state_dict(self.connector.state_dict())
        self.token_inputs = bool(summary.get("train_config", {}).get("token_inputs")) and method != "linear"
        self.pool_tokens = int(summary.get("train_config", {}).get("pool_tokens") or 0)  # as the connector trained
        given = [m for m in summary.get("modalities", []) if m in summary["stores"]]
        order = given + sorted(set(summary["stores"]) - set(given))
        self.stores = {
            m: LatentStore.open(resolve_path(self.run, summary["stores"][m])) for m in order
        }  # the run's modality order
        self.spec = spec or IndexSpec()
        # The label prior beside the connector's score: one inner product over [key, prior side] and [query,
        # w * prior side] gives cos(learned) + w * cos(prior), w per direction. A connector trained on top of
        # the prior (prior_weight > 0) is scored so as trained; one fused after training with the weights
        # that reproduce its validation-picked fusion (omnimoe.align.evaluate.serving_weights).
        prior = read_json(self.run / "prior.json") if (self.run / "prior.json").is_file() else {}
        self.prior_weight = float(prior.get("prior_weight") or 0.0)
        self.prior_modalities: dict[str, str] = dict(prior.get("modalities") or {})  # modality -> its text modality
        self.prior_prompt = prior.get("prompt")
        self.prior_settings = prior.get("settings", {})  # per modality (runs before calibration: the plain bridge)
        self._priors: dict[str, Any] | None = None
        wanted = label_prior if label_prior is not None else chosen.get("heads", {}).get(method) == "contrastive+prior"
        weights = (prior.get("serve") or {}).get(method) or {}
        if label_prior and not self.prior_weight and not weights:
            raise ValueError(
                f"{self.run}: no label-prior weights for {method!r} (prior.json has none: a run without the "
                "label prior, or written before fused serving); serve it without the prior"
            )
        self.prior_weights = {d: float(w) for d, w in weights.items()} if wanted and not self.prior_weight else {}
        self.head = "contrastive+prior" if self.prior_weight or self.prior_weights else "contrastive"
        fused_after = "+prior" if self.prior_weights else ""  # its own index, beside the connector-alone one
        self.index_root = Path(index_root) if index_root else self.run / "index" / (method + fused_after)
        self.rebuild = rebuild
        self.batch_size = batch_size
        self._indexes: dict[str, VectorIndex] = {}
        self._encoders: dict[str, Any] = {}
        self._records: dict[str, dict[str, Any]] | None = None
        self._ids: set[str] | None = None
        self._query_paths: dict[str, QueryPath | None] = {}
        self._lock = threading.RLock()  # one model call at a time: torch already uses every core per call

    # -- what is here ---------------------------------------------------------------------------------
    @property
    def served(self) -> str:
        """What this retriever serves, in words: ``"moe-alternating + label prior (chosen on validation)"``."""
        prior = " + label prior" if self.head == "contrastive+prior" else ""
        return self.method + prior + (" (chosen on validation)" if self.chosen else "")

    @property
    def modalities(self) -> list[str]:
        return list(self.stores)

    def encoder_kind(self, modality: str) -> str:
        """What a query of ``modality`` is: "text", "image" or "audio" (the encoder's input type)."""
        return str(self.stores[modality].index.get("modality"))

    def directions(self) -> list[str]:
        cfg = getattr(self.connector, "config", None)
        if cfg is not None:
            return [d for d in cfg.directions if all(m in self.stores for m in d.split("->"))]
        return [direction_name(a, b) for a in self.stores for b in self.stores if a != b]

    def source_for(self, kind: str, target: str, source: str | None = None) -> str:
        """The query modality for an input of ``kind`` (text / image / audio) searching ``target``: ``source``
        if given, else the first modality whose encoder reads that kind and has a direction to ``target``."""
        if target not in self.stores:
            raise QueryError(f"unknown target {target!r}: this run indexes {self.modalities}")
        if source is not None:
            if source not in self.stores:
                raise QueryError(f"unknown source modality {source!r}: this run has {self.modalities}")
            if self.encoder_kind(source) != kind:
                raise QueryError(f"source {source!r} reads {self.encoder_kind(source)} input, not {kind}")
            candidates = [source]
        else:
            candidates = [m for m in self.stores if self.encoder_kind(m) == kind]
        for m in candidates:
            if direction_name(m, target) in self.directions():
                return m
        raise QueryError(
            f"no direction from a {kind} query to {target!r} in this run (directions: {self.directions()})"
        )

    # -- indexes --------------------------------------------------------------------------------------
    def weight(self, direction: str) -> float:
        """The weight of the label prior's side in ``direction``'s search (0: the connector's score alone)."""
        if not any({m, t} == set(direction.split("->")) for m, t in self.prior_modalities.items()):
            return 0.0
        return self.prior_weight or self.prior_weights.get(direction, 0.0)

    def prior(self, direction: str) -> Any:
        """The label prior served beside the connector for ``direction``, or None."""
        if not self.weight(direction):
            return None
        with self._lock:
            if self._priors is None:
                from omnimoe.align.prior import LABEL_PROMPT, label_priors

                needed = {m for pair in self.prior_modalities.items() for m in pair if m in self.stores}
                by_text: dict[str, Any] = {}
                for modality, text in self.prior_modalities.items():
                    if {modality, text} <= needed:
                        settings = {
                            "prompt": self.prior_prompt or LABEL_PROMPT,
                            **self.prior_settings.get(modality, {}),
                        }
                        by_text.update(
                            label_priors({modality: self.encoder(modality), text: self.encoder(text)}, text, **settings)
                        )
                self._priors = by_text
            from omnimoe.align.prior import prior_for

            return prior_for(self._priors, direction)

    def _record(self, direction: str) -> dict[str, Any]:
        store = self.stores[direction.split("->")[1]]
        record = {
            "method": self.method,
            "connector": self.connector_hash,
            "direction": direction,
            "encoder": store.index.get("encoder"),
            "weights_hash": store.index.get("weights_hash"),
            "prior_weight": self.weight(direction),
        }
        prior = self.prior(direction)
        if (
            prior is not None and prior.settings != PLAIN_BRIDGE
        ):  # omnimoe.align.prior  # the prior side's vectors depend on them
            record["prior_bridge"] = prior.settings  # (left out for the plain bridge: indexes built before match)
        return record

    def index_folder(self, direction: str) -> Path:
        """``<index_root>/<src>-to-<tgt>`` for the exact flat index, ``...-to-<tgt>.<kind>`` for the others
        (so an ivf index can sit beside the flat one)."""
        name = direction.replace("->", "-to-")
        return self.index_root / (name if self.spec.kind == "flat" else f"{name}.{self.spec.kind}")

    @torch.no_grad()
    def _target_vectors(self, direction: str, rows: list[int] | None = None) -> torch.Tensor:
        store = self.stores[direction.split("->")[1]]
        pooled = store.pooled()
        if rows is not None:
            pooled = pooled[rows]
        parts = [
            self.connector.embed_target(direction, pooled[i : i + self.batch_size]).float()
            for i in range(0, len(pooled), self.batch_size)
        ]
        keys = torch.cat(parts) if parts else torch.zeros(0, 1)
        if (prior := self.prior(direction)) is not None and len(keys):
            keys = torch.cat([F.normalize(keys, dim=-1), prior.side(direction.split("->")[1], pooled)], dim=1)
        return keys

    def index(self, direction: str) -> VectorIndex:
        """The index of ``direction``'s target side: loaded, built, or extended with new store items."""
        with self._lock:
            if direction in self._indexes:
                return self._indexes[direction]
            if direction not in self.directions():
                raise QueryError(f"direction {direction!r} is not one of this connector's {self.directions()}")
            folder = self.index_folder(direction)
            record = self._record(direction)
            index = None
            if (folder / "index.json").is_file() and not self.rebuild:
                index = VectorIndex.load(folder, expect=record)  # another connector / encoder: IndexMismatch
            store = self.stores[direction.split("->")[1]]
            if index is None:
                index = VectorIndex.build(self._target_vectors(direction), list(store.ids), self.spec, record)
                index.record.update(
                    store=str(store.folder.resolve()), store_rows=len(store), store_ids=ids_digest(store.ids)
                )
                index.save(folder)
            elif index.record.get("store_ids") != ids_digest(store.ids):
                self._update(index, direction, folder)
            self._indexes[direction] = index
            return index

    def _update(self, index: VectorIndex, direction: str, folder: Path) -> int:
        store = self.stores[direction.split("->")[1]]
        new = [i for i, sid in enumerate(store.ids) if sid not in index]
        if new:
            index.add(self._target_vectors(direction, new), [store.ids[i] for i in new])
        index.record.update(store=str(store.folder.resolve()), store_rows=len(store), store_ids=ids_digest(store.ids))
        index.save(folder)
        return len(new)

    def update(self) -> dict[str, int]:
        """Reopen the stores and add items extracted since the indexes were built (no rebuild). Items that
        left a store stay in its index until a rebuild (faiss flat / hnsw indexes cannot drop rows)."""
        with self._lock:
            self.stores = {m: LatentStore.open(s.folder) for m, s in self.stores.items()}
            self._records, self._ids = None, None
            added = {}
            for direction, index in self._indexes.items():
                added[direction] = self._update(index, direction, self.index_folder(direction))
            return added

    def build_all(self) -> dict[str, int]:
        """Build (or load) the index of every direction; returns items per direction."""
        return {d: len(self.index(d)) for d in self.directions()}

    # -- queries --------------------------------------------------------------------------------------
    def encoder(self, modality: str) -> Any:
        with self._lock:
            if modality not in self._encoders:
                from omnimoe.encoders import load_encoder

                name = self.stores[modality].index["encoder"]
                encoder = load_encoder(name)
                if encoder.weights_hash != self.stores[modality].index.get("weights_hash"):
                    raise IndexMismatch(
                        f"encoder {name!r} now has weights {encoder.weights_hash}, but the {modality} store was "
                        f"extracted with {self.stores[modality].index.get('weights_hash')}: re-extract and retrain"
                    )
                self._encoders[modality] = encoder
            return self._encoders[modality]

    def _query_path(self, direction: str) -> QueryPath | None:
        """The NumPy query path of an Alt-MoE connector's ``direction`` (built once), or None where it does
        not apply (the linear two-tower, whose query is one projection, or MoE options it does not cover)."""
        if direction not in self._query_paths:
            path = None
            if isinstance(self.connector, AltMoEConnector):
                try:
                    path = QueryPath(self.connector, direction)
                except ValueError:
                    path = None
            self._query_paths[direction] = path
        return self._query_paths[direction]

    @torch.no_grad()
    def embed(self, source: str, target: str, items: list[Any]) -> torch.Tensor:
        """Queries (texts or file paths) -> unit vectors in the ``source->target`` contrastive space (with the
        label prior's side appended, weighted, when the connector was trained on top of it)."""
        from omnimoe.encoders.base import BadInput

        direction = direction_name(source, target)
        encoder = self.encoder(source)
        loaded = []
        for n, item in enumerate(items):
            if isinstance(item, str) and self.encoder_kind(source) == "text" and not item.strip():
                raise QueryError(f"query {n}: empty text")
            try:
                loaded.append(encoder.load_item(item))
            except (BadInput, OSError) as exc:
                raise QueryError(f"query {n}: {exc}") from None
        with self._lock:
            out = encoder.encode(loaded)
            if self.token_inputs and out.tokens is not None:
                q = self.connector(
                    direction, *pool_tokens(out.tokens, out.mask, self.pool_tokens), tasks=("contrastive",)
                ).contrastive
            elif (path := self._query_path(direction)) is not None and len(out.pooled) <= QUERY_PATH_MAX_ROWS:
                q = path(out.pooled)  # a handful of queries: the lean NumPy path (omnimoe.align.query)
            else:
                q = self.connector(direction, out.pooled, tasks=("contrastive",)).contrastive
            q = F.normalize(q.float(), dim=-1)
            if (prior := self.prior(direction)) is not None:
                q = torch.cat([q, self.weight(direction) * prior.side(source, out.pooled)], dim=1)
        return F.normalize(q, dim=-1)

    def search(self, source: str, target: str, items: list[Any], k: int = 5) -> list[list[Hit]]:
        """Top-``k`` stored ``target`` items for each query (a batch of texts or paths of ``source``)."""
        if not items:
            return []
        index = self.index(direction_name(source, target))
        scores, ids = index.search(self.embed(source, target, items), k)
        return [
            [Hit(sid, float(s), r + 1) for r, (sid, s) in enumerate(zip(row_ids, row))]
            for row_ids, row in zip(ids, scores)
        ]

    def timed_search(self, source: str, target: str, items: list[Any], k: int = 5) -> tuple[list[list[Hit]], float]:
        t = time.perf_counter()
        hits = self.search(source, target, items, k)
        return hits, (time.perf_counter() - t) * 1e3

    # -- items ----------------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """What this run cannot show, said at start (``omnimoe serve`` prints it): a manifest that is not where
        a store says (a run moved or copied without its data), and stored items whose media files are missing.
        Search still works without them; captions, media and thumbnails do not."""
        found = []
        for m, store in self.stores.items():
            if store.manifest is None or not store.manifest.is_file():
                found.append(
                    f"the {m} store's manifest {store.manifest} is missing: results will carry ids only, no captions or media "
                    "(copy or move the data with the run)"
                )
        records = self._manifest_records()
        missing = [
            (sid, f)
            for sid, rec in records.items()
            if self.indexed(sid)
            for f in MEDIA_FIELDS
            if isinstance(rec.get(f), str) and not media_path(rec["_manifest"], rec[f]).is_file()
        ]
        if missing:
            found.append(
                f"{len(missing)} media file(s) of stored items are missing, e.g. "
                + ", ".join(f"{sid} ({f})" for sid, f in missing[:3])
            )
        return found

    def _manifest_records(self) -> dict[str, dict[str, Any]]:
        if self._records is None:
            records: dict[str, dict[str, Any]] = {}
            manifests = dict.fromkeys(s.manifest for s in self.stores.values())  # each once, in store order
            for manifest in manifests:
                if manifest and manifest.is_file():
                    for r in read_manifest(manifest):
                        records.setdefault(r["id"], {**r, "_manifest": manifest})
            self._records = records
        return self._records

    def indexed(self, sid: str) -> bool:
        if self._ids is None:
            self._ids = {sid for s in self.stores.values() for sid in s.ids}
        return sid in self._ids

    def item(self, sid: str) -> dict[str, Any] | None:
        """The manifest record of a stored item (None when no store holds ``sid``): id, text, category, and
        which media fields it has."""
        if not self.indexed(sid):
            return None
        rec = self._manifest_records().get(sid, {"id": sid})
        media = sorted(f for f in MEDIA_FIELDS if isinstance(rec.get(f), str))
        out = {"id": sid, "text": rec.get("text"), "media": media}
        if isinstance(rec.get("category"), str):
            out["category"] = rec["category"]
        return out

    def media(self, sid: str, field: str) -> Path | None:
        """The file behind a stored item's media field, or None. Only files the manifest names for an id that a
        store holds are ever served: the request picks an id and a field name, never a path."""
        if field not in MEDIA_FIELDS or not self.indexed(sid):
            return None
        rec = self._manifest_records().get(sid)
        if rec is None or not isinstance(rec.get(field), str):
            return None
        path = media_path(rec["_manifest"], rec[field])
        return path if path.is_file() else None


class Batcher:
    """Coalesces concurrent searches of the same direction into one encoder and connector call.

    Under load a service answers many small queries at once; encoding 16 captions in one batch costs a
    fraction of 16 single calls. Request threads ``submit`` and wait; one worker thread takes the oldest
    request plus every waiting one of the same direction (up to ``max_items`` queries), runs them as one
    batch, and hands each caller its rows. If the batch fails, its requests are rerun one by one, so a bad
    query fails alone, with its own error.
    """

    def __init__(self, retriever: Retriever, max_items: int = 64) -> None:
        self.retriever, self.max_items = retriever, max_items
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._loop, name="omnimoe-batcher", daemon=True)
        self._worker.start()

    def submit(self, source: str, target: str, items: list[Any], k: int) -> list[list[Hit]]:
        future: Future = Future()
        self._queue.put((source, target, list(items), k, future))
        return future.result()

    def _loop(self) -> None:
        waiting: list[tuple] = []
        while True:
            if not waiting:
                waiting.append(self._queue.get())
            while True:  # drain whatever arrived meanwhile
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            head = waiting[0]
            batch, rest, size = [], [], 0
            for req in waiting:
                if req[:2] == head[:2] and (not batch or size + len(req[2]) <= self.max_items):
                    batch.append(req)
                    size += len(req[2])
                else:
                    rest.append(req)
            waiting = rest
            self._run(batch)

    def _run(self, batch: list[tuple]) -> None:
        source, target = batch[0][:2]
        try:
            rows = self.retriever.search(
                source, target, [item for req in batch for item in req[2]], max(req[3] for req in batch)
            )
        except Exception:  # noqa: BLE001 - rerun alone, so that each caller gets its own result or error
            if len(batch) == 1:
                _settle(batch[0][4], lambda: self.retriever.search(*batch[0][:4]))
            else:
                for req in batch:
                    _settle(req[4], lambda req=req: self.retriever.search(*req[:4]))
            return
        start = 0
        for _, _, items, k, future in batch:
            future.set_result([row[:k] for row in rows[start : start + len(items)]])
            start += len(items)


def _settle(future: Future, fn: Any) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
        future.set_exception(exc)
