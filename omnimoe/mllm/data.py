"""Conversation data for the Uni-MoE stages: LLaVA-style JSON, a chat template, label masking, media
features from the latent store, and batches grouped by modality.

A data file is a JSON list of records::

    {"id": "animals/koala", "image": "img/koala.png",            # or "audio"/"voice": path or [chunks],
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},   #  "video": [frame paths]
                       {"from": "gpt", "value": "A koala."}],
     "group": "image"}                                          # optional: the modality group (batches, stage 2)

Media paths are relative to the JSON file's folder. Each media item has exactly one placeholder
(``<image>``, ``<audio>``, ``<video>``) in the human turns; an audio list with one ``<audio>`` is one item
whose chunks are concatenated in time, a video is its frames through the image encoder averaged over time
(Uni-MoE). A record that breaks a rule is reported with its index and reason and left out; the rest train.

Encoders never run in the training loop: every media file is encoded once into a latent store with token
states (``MediaFeatures.build``), and batches read those states memory-mapped.
"""

from __future__ import annotations

import os
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from omnimoe.mllm.model import IGNORE_INDEX, PLACEHOLDERS, MediaBatch

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
MEDIA_KEYS = {"image": "image", "audio": "audio", "voice": "audio", "video": "video"}
ENCODER_OF = {"image": "image", "audio": "audio", "video": "image"}  # which encoder a modality's files go through
_PLACEHOLDER_RE = re.compile("(" + "|".join(re.escape(p) for p in PLACEHOLDERS.values()) + ")")
_MODALITY_OF = {v: k for k, v in PLACEHOLDERS.items()}


class DataError(ValueError):
    """A data file cannot be used at all (missing, not JSON, no usable record)."""


@dataclass
class BadRecord:
    index: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}" + (f" ({self.id})" if self.id else "") + f": {self.reason}"


@dataclass
class Sample:
    index: int
    id: str
    group: str
    turns: list[tuple[str, str]]  # (system|user|assistant, text)
    media: dict[str, list[list[str]]]  # modality -> items in placeholder order -> files (relative to root)
    record: dict[str, Any]  # the raw record (task, answer, choices... for evaluation)


# -- reading --------------------------------------------------------------------------------------------------
def _items(modality: str, value: Any, placeholders: int) -> list[list[str]]:
    if isinstance(value, str):
        return [[value]]
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, list)) for v in value):
        raise ValueError(f"{modality}: expected a path or a non-empty list of paths")
    if modality == "video":
        return (
            [value] if all(isinstance(v, str) for v in value) else [list(v) for v in value]
        )  # frames, or a list of videos
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{modality}: expected a list of paths")
    if modality == "audio" and placeholders == 1:
        return [list(value)]  # chunks of one recording
    return [[v] for v in value]


def parse_record(index: int, rec: Any, root: Path, check_files: bool = True) -> Sample:
    """One validated record; raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {j}: expected {{'from': ..., 'value': str}}")
        role = ROLES.get(str(turn.get("from", "")).lower())
        if role is None:
            raise ValueError(
                f"turn {j}: unknown speaker {turn.get('from')!r} (use human/gpt, user/assistant or system)"
            )
        if role == "assistant" and _PLACEHOLDER_RE.search(turn["value"]):
            raise ValueError(f"turn {j}: a media placeholder in an answer")
        turns.append((role, turn["value"]))
    answers = [t for r, t in turns if r == "assistant"]
    if not answers or not any(a.strip() for a in answers):
        raise ValueError("no non-empty answer (gpt turn) to learn from")
    if turns[-1][0] != "assistant":
        raise ValueError("the conversation must end with an answer (gpt turn)")
    counts = {m: 0 for m in PLACEHOLDERS}
    for role, text in turns:
        for ph in _PLACEHOLDER_RE.findall(text):
            counts[_MODALITY_OF[ph]] += 1
    media: dict[str, list[list[str]]] = {}
    keys = [k for k in MEDIA_KEYS if k in rec and rec[k] not in (None, "", [])]
    if "audio" in keys and "voice" in keys:
        raise ValueError("both 'audio' and 'voice': use one")
    for key in keys:
        modality = MEDIA_KEYS[key]
        media[modality] = _items(modality, rec[key], counts[modality])
    for modality, n in counts.items():
        have = len(media.get(modality, []))
        if n != have:
            raise ValueError(f"{n} {PLACEHOLDERS[modality]} placeholder(s) for {have} {modality} item(s)")
    for modality, items in media.items():
        for files in items:
            for f in files:  # relative to the file's folder (an absolute path also works: root / abs == abs)
                if check_files and not (root / f).is_file():
                    raise ValueError(f"{modality} file {f} does not exist (relative to {root})")
    sid = str(rec.get("id", index))
    group = rec.get("group") or ("+".join(sorted(media)) if media else "text")
    return Sample(index, sid, str(group), turns, media, rec)


def read_conversations(path: str | Path, check_files: bool = True) -> tuple[list[Sample], list[BadRecord]]:
    """Every usable record of a LLaVA-style JSON file, and the bad ones with their reasons."""
    from omnimoe.data.adapters import read_json_list

    path = Path(path)
    records = read_json_list(path, DataError)
    root = path.resolve().parent
    samples, bad = [], []
    for i, rec in enumerate(records):
        try:
            samples.append(parse_record(i, rec, root, check_files))
        except ValueError as exc:
            bad.append(BadRecord(i, rec.get("id") if isinstance(rec, dict) else None, str(exc)))
    if not samples:
        first = f" (first: {bad[0]})" if bad else ""
        raise DataError(f"{path}: no usable record among {len(records)}{first}")
    return samples, bad


def report_bad(path: str | Path, bad: list[BadRecord], limit: int = 5) -> None:
    if not bad:
        return
    print(f"{path}: {len(bad)} bad record(s) left out", file=sys.stderr)
    for b in bad[:limit]:
        print(f"  {b}", file=sys.stderr)
    if len(bad) > limit:
        print(f"  ... and {len(bad) - limit} more", file=sys.stderr)


# -- chat template --------------------------------------------------------------------------------------------
@dataclass
class ChatTemplate:
    """How turns become text. Labels cover each answer and its ``assistant_suffix`` (so the model learns to
    stop); everything else is masked."""

    name: str
    user: str  # "{}" is the user's text
    assistant_prefix: str
    assistant_suffix: str  # "{eos}" is the tokenizer's end-of-sequence token
    system: str = "{}\n\n"
    stop: str = "{eos}"  # what ends generation
    system_in_user: bool = True  # prepend the system text to the first user turn (Gemma has no system role)

    def suffix(self, eos: str) -> str:
        return self.assistant_suffix.replace("{eos}", eos)


TEMPLATES = {
    "gemma": ChatTemplate(
        "gemma",
        "<start_of_turn>user\n{}<end_of_turn>\n",
        "<start_of_turn>model\n",
        "<end_of_turn>\n",
        stop="<end_of_turn>",
    ),
    "chatml": ChatTemplate(
        "chatml",
        "<|im_start|>user\n{}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>\n",
        system="<|im_start|>system\n{}<|im_end|>\n",
        stop="<|im_end|>",
        system_in_user=False,
    ),
    "llama3": ChatTemplate(
        "llama3",
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
        stop="<|eot_id|>",
        system_in_user=False,
    ),
    "vicuna": ChatTemplate("vicuna", "USER: {} ", "ASSISTANT: ", "{eos}", system="{} "),
}


def template_for(tokenizer: Any, name: str = "auto") -> ChatTemplate:
    """A named template, or (``auto``) the tokenizer's own format when it has a chat template (its turn
    markers tell which), else ``vicuna``: plain ``USER:``/``ASSISTANT:`` text whose answers end with the
    tokenizer's end-of-sequence token. A base (not instruction-tuned) LM already predicts ``<eos>`` at the end
    of a text, while it has never learnt to emit turn markers such as Gemma's ``<end_of_turn>`` (loss on
    them swamps the answer's), so a base model gets the plain format even when its vocabulary has markers."""
    if name != "auto":
        if name not in TEMPLATES:
            raise ValueError(f"chat template {name!r}: choose auto or one of {', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if isinstance(own, str) and own.strip():
        for marker, key in (
            ("<start_of_turn>", "gemma"),
            ("<|im_start|>", "chatml"),
            ("<|start_header_id|>", "llama3"),
        ):
            if marker in own:
                return TEMPLATES[key]
    return TEMPLATES["vicuna"]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode_turns(
    turns: list[tuple[str, str]],
    tokenizer: Any,
    template: ChatTemplate,
    placeholder_ids: dict[str, int],
    soft_counts: dict[str, list[int]],
    generation: bool = False,
) -> Encoded:
    """Token ids and labels for a conversation. Each placeholder becomes ``soft_counts[modality][i]`` copies
    of its placeholder id. ``generation``: drop the last answer and end with the assistant prefix."""
    eos = tokenizer.eos_token or ""
    ids: list[int] = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    used = {m: 0 for m in soft_counts}

    def text(s: str, learn: bool) -> None:
        for part in _PLACEHOLDER_RE.split(s):
            if not part:
                continue
            if part in _MODALITY_OF:
                modality = _MODALITY_OF[part]
                counts = soft_counts.get(modality, [])
                if used.get(modality, 0) >= len(counts):
                    raise ValueError(f"more {part} placeholders than {modality} items")
                n = counts[used[modality]]
                used[modality] += 1
                ids.extend([placeholder_ids[modality]] * n)
                labels.extend([IGNORE_INDEX] * n)
            else:
                piece = tokenizer(part, add_special_tokens=False).input_ids
                ids.extend(piece)
                labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))

    turns = list(turns)
    if generation and turns and turns[-1][0] == "assistant":
        turns = turns[:-1]
    system = ""
    for role, value in turns:
        if role == "system":
            if template.system_in_user:
                system += template.system.format(value)
            else:
                text(template.system.format(value), False)
        elif role == "user":
            text(template.user.format(system + value), False)
            system = ""
        else:
            text(template.assistant_prefix, False)
            text(value, True)
            text(template.suffix(eos), True)
    if generation:
        text(template.assistant_prefix, False)
    return Encoded(ids, labels)


# -- media features -------------------------------------------------------------------------------------------
class MediaFeatures:
    """Encoder token states of media files, by path relative to the data root, from latent stores."""

    def __init__(self, stores: dict[str, Any], root: Path) -> None:
        self.stores, self.root = stores, root
        self._rows = {kind: {sid: i for i, sid in enumerate(store.ids)} for kind, store in stores.items()}
        self._skipped = {kind: {s["id"]: s["reason"] for s in store.skipped()} for kind, store in stores.items()}

    @staticmethod
    def key(root: Path, data_root: Path, f: str) -> str:
        return Path(os.path.relpath((data_root / f).resolve(), root.resolve())).as_posix()

    @classmethod
    def build(cls, files: list[Path], encoders: dict[str, str], cache: Path, progress: bool = True) -> "MediaFeatures":
        """Encode (once; later calls reuse the stores) every media file the data files name, per encoder.
        Ids are paths relative to ``cache``'s parent folder, so one cache serves every file of a data folder."""
        from omnimoe.data.manifest import read_manifest, write_manifest
        from omnimoe.latents.extract import extract
        from omnimoe.latents.store import LatentStore

        root = cache.resolve().parent
        wanted: dict[str, set[str]] = {}
        for path in files:
            samples, _ = read_conversations(path, check_files=False)
            data_root = Path(path).resolve().parent
            for s in samples:
                for modality, items in s.media.items():
                    kind = ENCODER_OF[modality]
                    wanted.setdefault(kind, set()).update(
                        cls.key(root, data_root, f) for files_ in items for f in files_
                    )
        stores = {}
        for kind, keys in sorted(wanted.items()):
            if kind not in encoders:
                raise DataError(
                    f"the data has {kind} media but no {kind} encoder is configured (encoders: {sorted(encoders)})"
                )
            name = encoders[kind]
            folder = cache / f"{kind}-{name.replace(':', '_').replace('/', '_')}"
            folder.mkdir(parents=True, exist_ok=True)
            manifest = folder / "manifest.jsonl"
            field_ = "image" if kind == "image" else "audio"
            # Keep the order of what was extracted before and append new files: only the last shards redo.
            before = [r["id"] for r in read_manifest(manifest)] if manifest.is_file() else []
            order = before + sorted(keys - set(before))  # a store only grows: other files of the folder keep theirs
            recs = [{"id": k, field_: os.path.relpath(root / k, folder)} for k in order]
            if order != before:
                write_manifest(manifest, recs)
            extract(manifest, name, folder / "store", field=field_, tokens=True, on_error="skip", progress=progress)
            stores[kind] = LatentStore.open(folder / "store")
        return cls(stores, root)

    def problem(self, modality: str, key: str) -> str | None:
        kind = ENCODER_OF[modality]
        if kind not in self.stores:
            return f"no {kind} features"
        if key in self._rows[kind]:
            return None
        return f"{modality} file {key}: " + self._skipped[kind].get(key, "not in the feature store")

    def item(self, modality: str, keys: list[str]) -> torch.Tensor:
        """(L, D) token states of one item: an image; audio chunks concatenated; video frames averaged."""
        kind = ENCODER_OF[modality]
        states = [self.stores[kind].tokens(self._rows[kind][k]) for k in keys]
        if modality == "audio":
            return torch.cat(states)
        if modality == "video":
            n = min(len(s) for s in states)
            return torch.stack([s[:n] for s in states]).mean(0)
        return states[0]

    def dims(self) -> dict[str, int]:
        return {m: self.stores[ENCODER_OF[m]].dim for m in PLACEHOLDERS if ENCODER_OF[m] in self.stores}


def pad_items(items: list[torch.Tensor]) -> MediaBatch:
    """Right-pad (L_i, D) token states of media items into one :class:`MediaBatch`."""
    longest = max(len(t) for t in items)
    tokens = torch.zeros(len(items), longest, items[0].shape[-1])
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for j, t in enumerate(items):
        tokens[j, : len(t)], mask[j, : len(t)] = t, True
    return MediaBatch(tokens, mask)


# -- datasets and batches -------------------------------------------------------------------------------------
@dataclass
class Example:
    sample: Sample
    input_ids: list[int]
    labels: list[int]
    media: dict[str, list[list[str]]] = field(default_factory=dict)  # modality -> item -> feature keys


class ConversationData:
    """Tokenised samples of one data file, ready for batching; ``bad`` holds what was left out and why."""

    def __init__(
        self,
        path: str | Path,
        features: MediaFeatures,
        tokenizer: Any,
        template: ChatTemplate,
        placeholder_ids: dict[str, int],
        soft_tokens: Callable[[str, int], int],
        max_len: int = 512,
        generation: bool = False,
    ) -> None:
        self.path = Path(path)
        samples, self.bad = read_conversations(self.path)
        data_root = self.path.resolve().parent
        self.features, self.examples = features, []
        for s in samples:
            try:
                keys = {
                    m: [[MediaFeatures.key(features.root, data_root, f) for f in files] for files in items]
                    for m, items in s.media.items()
                }
                for m, items in keys.items():
                    if m not in placeholder_ids:
                        raise ValueError(f"the model has no {m} connector")
                    for item in items:
                        for k in item:
                            problem = features.problem(m, k)
                            if problem:
                                raise ValueError(problem)
                counts = {
                    m: [soft_tokens(m, len(features.item(m, item))) for item in items] for m, items in keys.items()
                }
                enc = encode_turns(s.turns, tokenizer, template, placeholder_ids, counts, generation=generation)
                if len(enc.input_ids) > max_len:
                    raise ValueError(f"{len(enc.input_ids)} tokens with media, over max_len={max_len}")
                self.examples.append(Example(s, enc.input_ids, enc.labels, keys))
            except ValueError as exc:
                self.bad.append(BadRecord(s.index, s.id, str(exc)))
        self.bad.sort(key=lambda b: b.index)
        if not self.examples:
            raise DataError(f"{self.path}: no usable record" + (f" (first: {self.bad[0]})" if self.bad else ""))

    def __len__(self) -> int:
        return len(self.examples)

    def groups(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for i, ex in enumerate(self.examples):
            out.setdefault(ex.sample.group, []).append(i)
        return out

    def batches(
        self, batch_size: int, epoch: int, seed: int = 0, grouped: bool = True, world: int = 1
    ) -> list[list[int]]:
        """One epoch's batches (the same on every rank; rank r takes every world-th). ``grouped``: every
        batch holds one modality group (Uni-MoE's modality-level data parallelism); the order of batches
        is shuffled across groups. The epoch is trimmed to a multiple of ``world`` batches."""
        rng = random.Random(seed * 1_000_003 + epoch)
        pools = list(self.groups().values()) if grouped else [list(range(len(self.examples)))]
        out = []
        for pool in pools:
            pool = list(pool)
            rng.shuffle(pool)
            out.extend(pool[i : i + batch_size] for i in range(0, len(pool), batch_size))
        rng.shuffle(out)
        return out[: len(out) - len(out) % world] if world > 1 else out

    def collate(self, indices: list[int], pad_id: int, left_pad: bool = False) -> dict[str, Any]:
        """Padded ids, attention mask, labels and per-modality :class:`MediaBatch` in reading order."""
        exs = [self.examples[i] for i in indices]
        width = max(len(e.input_ids) for e in exs)
        ids = torch.full((len(exs), width), pad_id, dtype=torch.long)
        labels = torch.full((len(exs), width), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((len(exs), width), dtype=torch.long)
        for r, e in enumerate(exs):
            n = len(e.input_ids)
            sl = slice(width - n, width) if left_pad else slice(0, n)
            ids[r, sl], labels[r, sl], attn[r, sl] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        media: dict[str, MediaBatch] = {}
        for m in PLACEHOLDERS:
            items = [self.features.item(m, item) for e in exs for item in e.media.get(m, [])]
            if items:
                media[m] = pad_items(items)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels, "media": media, "examples": exs}
