"""Uni-MoE training and evaluation data from a Tux Paint manifest (LLaVA-style JSON task files).

``build_tuxpaint_tasks(manifest, out)`` writes into ``out/``:

* ``stage1.json``: what the media show, from the train split: alignment pairs (image -> caption, speech ->
  transcription, sound effect -> the stamp's caption; tasks ``caption-image``, ``transcribe-speech``,
  ``caption-sound``) and the instruction questions (category, "what is this", yes/no), shuffled, so the
  connectors learn to carry the content every later question asks about;
* ``stage2-image.json``, ``stage2-speech.json``, ``stage2-sound.json``: the instruction tasks of one
  modality group each (train split);
* ``stage3.json``: every train instruction record of every group, shuffled with the seed;
* ``test.json``: the instruction tasks on the held-out test split (the manifest's split is grouped by
  caption, so no test caption is ever a train answer);
* ``val.json`` (only with ``val_fraction > 0`` or a manifest ``val`` split): the instruction tasks on a
  validation split carved from train, grouped by caption as the test split is, and left out of every training
  file. Recipes are chosen on it; the test split only reports;
* ``tasks.json``: what each task is (:data:`TASKS`), the category choices and the counts.

A record (the data contract)::

    {"id": "image-what/animals/koala", "image": "rel/path.png",          # or "audio": "rel/path.ogg"
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A koala."}],
     "group": "image", "task": "image-what", "answer": "A koala.",
     "choices": [...],                                                   # closed tasks only
     "source_id": "animals/koala", "audio_source": "recorded"}           # provenance (audio_source: speech only)

Media paths are relative to the JSON file's folder; each present media field has its placeholder
(``<image>`` / ``<audio>``) exactly once, in the first human turn. Speech and sound effects both go in
``audio``; ``group`` tells them apart.

Everything is deterministic given the seed: each (split, task) draws from its own ``random.Random``
seeded with a string, so capping one task (``max_per_task``) never shifts another.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from omnimoe.data.adapters import grouped_split, normalise_caption
from omnimoe.data.manifest import read_manifest
from omnimoe.io import write_json

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>"}  # as omnimoe.mllm.model.PLACEHOLDERS
GROUPS = ("image", "speech", "sound")
# manifest field that feeds each group, and the record field it is written to
SOURCE_FIELD = {"image": "image", "speech": "audio", "sound": "sound"}
MEDIA_FIELD = {"image": "image", "speech": "audio", "sound": "audio"}

CATEGORY_PROMPT = "Which category is this: {choices}? Answer with one word."
YESNO_PROMPT = "Is this {phrase}? Answer yes or no."

# name -> description. stage "align" tasks go to stage1.json; "instruct" tasks to stage2-*/stage3/test.
TASKS: dict[str, dict[str, str]] = {
    "caption-image": {
        "group": "image",
        "stage": "align",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "Describe the image.",
    },
    "transcribe-speech": {
        "group": "speech",
        "stage": "align",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "Transcribe the speech.",
    },
    "caption-sound": {
        "group": "sound",
        "stage": "align",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "Describe the sound.",
    },
    "image-what": {
        "group": "image",
        "stage": "instruct",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "What is this?",
    },
    "image-category": {
        "group": "image",
        "stage": "instruct",
        "kind": "closed",
        "metric": "accuracy",
        "prompt": CATEGORY_PROMPT,
    },
    "image-yesno": {
        "group": "image",
        "stage": "instruct",
        "kind": "closed",
        "metric": "accuracy",
        "prompt": YESNO_PROMPT,
    },
    "speech-what": {
        "group": "speech",
        "stage": "instruct",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "What does the speaker say?",
    },
    "sound-what": {
        "group": "sound",
        "stage": "instruct",
        "kind": "open",
        "metric": "token_f1",
        "prompt": "What makes this sound?",
    },
}
ALIGN_TASKS = tuple(t for t, d in TASKS.items() if d["stage"] == "align")
INSTRUCT_TASKS = tuple(t for t, d in TASKS.items() if d["stage"] == "instruct")
YESNO_CHOICES = ["yes", "no"]

# Where a caption's first noun phrase ends: a sentence end, a dash, a bracket or a colon.
_PHRASE_ENDS = (". ", "! ", "? ", "\u2014", "\u2013", " - ", " (", "(", ": ")
_QUOTE_MARKS = re.compile("[\"\u201c\u201d\u201e]|(?<!\\w)['\u2018\u2019]|['\u2018\u2019](?!\\w)")  # not "it's"
_STOP = {
    "a",
    "an",
    "the",
    "some",
    "of",
    "and",
    "or",
    "with",
    "in",
    "on",
    "for",
    "to",
    "is",
    "are",
    "it",
    "its",
    "this",
    "that",
    "our",
    "your",
    "two",
    "three",
    "big",
    "small",
    "little",
    "red",
    "blue",
    "green",
    "yellow",
    "white",
    "black",
    "brown",
    "pink",
    "orange",
    "purple",
}


def _unquote(text: str) -> str:
    return " ".join(_QUOTE_MARKS.sub("", text).split())


def noun_phrase(caption: str) -> str:
    """The caption as a phrase for "Is this ...?": its first clause, no trailing punctuation or quotes, first
    letter lowercased (unless the first word is an acronym). "A koala." -> "a koala"; "Mercury—the planet
    closest to the Sun." -> "mercury"; "A baby sheep (a lamb)." -> "a baby sheep"."""
    text = " ".join(caption.split()).lstrip("-\u2013\u2014 ")
    cut = min((i for i in (text.find(e) for e in _PHRASE_ENDS) if i > 0), default=len(text))
    phrase = _unquote(text[:cut]).rstrip(".!?,;:\u2026").strip()
    if not phrase:  # nothing before the first cut: fall back to the whole caption
        phrase = _unquote(text).rstrip(".!?\u2026").strip() or caption.strip()
    first = phrase.split(" ", 1)[0]
    if not (len(first) > 1 and first[1].isupper()):  # "APC", "UFO" stay as written
        phrase = phrase[:1].lower() + phrase[1:]
    return phrase


def _content_words(text: str) -> set[str]:
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return {w.rstrip("s") for w in words if w not in _STOP and len(w) > 1}


def _record(task: str, item: dict[str, Any], media: str, prompt: str, answer: str, **extra: Any) -> dict[str, Any]:
    group = TASKS[task]["group"]
    field = MEDIA_FIELD[group]
    turns = [{"from": "human", "value": f"{PLACEHOLDERS[field]}\n{prompt}"}, {"from": "gpt", "value": answer}]
    rec: dict[str, Any] = {
        "id": f"{task}/{item['id']}",
        field: media,
        "conversations": turns,
        "group": group,
        "task": task,
        "answer": answer,
        **extra,
        "source_id": item["id"],
    }
    if group == "speech" and item.get("audio_source"):
        rec["audio_source"] = item["audio_source"]
    return rec


def _cap(items: list[dict[str, Any]], limit: int | None, rng: random.Random) -> list[dict[str, Any]]:
    """At most ``limit`` items, a seeded sample kept in manifest order."""
    if limit is None or len(items) <= limit:
        return items
    keep = set(rng.sample(range(len(items)), limit))
    return [it for i, it in enumerate(items) if i in keep]


def _yesno_negative(item: dict[str, Any], pool: list[dict[str, Any]], rng: random.Random) -> dict[str, Any]:
    """Another item whose caption differs: preferably of another category, sharing no content word (so a
    "bunny" is not asked about as "a little rabbit") and short (a thing, not a sentence), falling back
    one preference at a time."""
    mine, words = normalise_caption(item["text"]), _content_words(noun_phrase(item["text"]))
    others = [
        o
        for o in pool
        if normalise_caption(o["text"]) != mine and noun_phrase(o["text"]).lower() != noun_phrase(item["text"]).lower()
    ]
    if not others:
        raise ValueError(f"image-yesno: no item with a caption other than {item['text']!r} to ask about")
    disjoint = [o for o in others if not _content_words(noun_phrase(o["text"])) & words]
    elsewhere = [o for o in disjoint if o.get("category") != item.get("category")]
    short = [o for o in elsewhere if len(noun_phrase(o["text"]).split()) <= 4]  # a thing, not a sentence
    return rng.choice(short or elsewhere or disjoint or others)


def _split_tasks(
    items: list[dict[str, Any]],
    media: dict[str, dict[str, str]],
    split: str,
    tasks: tuple[str, ...],
    categories: list[str],
    seed: int,
    max_per_task: int | None,
) -> dict[str, list[dict[str, Any]]]:
    """The records of each task on one split. ``media[group][id]`` is the item's path relative to ``out``."""
    out: dict[str, list[dict[str, Any]]] = {}
    for task in tasks:
        spec = TASKS[task]
        rng = random.Random(f"{seed}:{split}:{task}")
        eligible = [it for it in items if it["id"] in media[spec["group"]]]
        chosen = _cap(eligible, max_per_task, rng)
        recs = []
        if task == "image-yesno":
            order = list(range(len(chosen)))
            rng.shuffle(order)
            positive = set(order[: (len(chosen) + 1) // 2])  # exactly half (the odd one out says yes)
            for i, it in enumerate(chosen):
                asked = it if i in positive else _yesno_negative(it, eligible, rng)
                prompt = YESNO_PROMPT.format(phrase=noun_phrase(asked["text"]))
                recs.append(
                    _record(
                        task,
                        it,
                        media["image"][it["id"]],
                        prompt,
                        "Yes." if i in positive else "No.",
                        choices=list(YESNO_CHOICES),
                    )
                )
        elif task == "image-category":
            prompt = CATEGORY_PROMPT.format(choices=", ".join(categories))
            recs = [
                _record(task, it, media["image"][it["id"]], prompt, it["category"], choices=list(categories))
                for it in chosen
                if it.get("category")
            ]
        else:
            recs = [_record(task, it, media[spec["group"]][it["id"]], spec["prompt"], it["text"]) for it in chosen]
        out[task] = recs
    return out


def build_tuxpaint_tasks(
    manifest: Path, out: Path, seed: int = 0, max_per_task: int | None = None, val_fraction: float = 0.0
) -> dict[str, Any]:
    """Write the stage-1/2/3 and test task files (see the module docstring); returns the counts.

    Items without a caption are dropped; an item without the media a task needs (no field, or the file is
    missing) is skipped for that task (``no_media`` counts those per split and group). ``max_per_task`` caps
    each task on each split with a seeded sample. ``val_fraction`` moves that share of the train captions
    (grouped, seeded) to a validation split.
    """
    manifest, out = Path(manifest), Path(out)
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be at least 1, got {max_per_task}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = [r for r in read_manifest(manifest) if isinstance(r.get("text"), str) and r["text"].strip()]
    if not records:
        raise ValueError(f"{manifest}: no captioned records")
    out.mkdir(parents=True, exist_ok=True)
    root, base = manifest.resolve().parent, out.resolve()
    media: dict[str, dict[str, str]] = {g: {} for g in GROUPS}
    skipped: Counter[str] = Counter()
    for r in records:
        for group in GROUPS:
            value = r.get(SOURCE_FIELD[group])
            path = (root / value).resolve() if isinstance(value, str) and value else None
            if path is not None and path.is_file():
                media[group][r["id"]] = os.path.relpath(path, base)
            else:
                skipped[f"{r['split']}/{group}"] += 1
    categories = sorted({r["category"] for r in records if r.get("category")})

    def split_of(r: dict[str, Any]) -> str:
        if r["split"] == "train" and val_fraction > 0:
            return grouped_split("val:" + normalise_caption(r["text"]), 0.0, val_fraction, seed=seed)
        return r["split"]

    by_split = {s: [r for r in records if split_of(r) == s] for s in ("train", "val", "test")}
    if not by_split["train"] or not by_split["test"]:
        found = dict(Counter(r["split"] for r in records))
        raise ValueError(f"{manifest}: needs both a train and a test split, found {found}")
    if val_fraction > 0 and not by_split["val"]:
        raise ValueError(f"{manifest}: val_fraction={val_fraction} left no validation item")

    train_align = _split_tasks(by_split["train"], media, "train", ALIGN_TASKS, categories, seed, max_per_task)
    train = _split_tasks(by_split["train"], media, "train", INSTRUCT_TASKS, categories, seed, max_per_task)
    test = _split_tasks(by_split["test"], media, "test", INSTRUCT_TASKS, categories, seed, max_per_task)

    stage1 = [r for t in ALIGN_TASKS for r in train_align[t]] + [r for t in INSTRUCT_TASKS for r in train[t]]
    random.Random(f"{seed}:stage1").shuffle(stage1)
    files: dict[str, list[dict[str, Any]]] = {"stage1.json": stage1}
    for group in GROUPS:
        files[f"stage2-{group}.json"] = [r for t in INSTRUCT_TASKS if TASKS[t]["group"] == group for r in train[t]]
    mixed = [r for t in INSTRUCT_TASKS for r in train[t]]
    random.Random(f"{seed}:stage3").shuffle(mixed)
    files["stage3.json"] = mixed
    files["test.json"] = [r for t in INSTRUCT_TASKS for r in test[t]]
    val: dict[str, list[dict[str, Any]]] = {}
    if by_split["val"]:
        val = _split_tasks(by_split["val"], media, "val", INSTRUCT_TASKS, categories, seed, max_per_task)
        files["val.json"] = [r for t in INSTRUCT_TASKS for r in val[t]]

    counts: dict[str, Any] = {
        "files": {name: len(recs) for name, recs in files.items()},
        "tasks": {
            "train": {t: len(v) for t, v in {**train_align, **train}.items()},
            "test": {t: len(v) for t, v in test.items()},
            **({"val": {t: len(v) for t, v in val.items()}} if val else {}),
        },
        "groups": {name: dict(Counter(r["group"] for r in recs)) for name, recs in files.items()},
        "no_media": dict(sorted(skipped.items())),  # "split/group": items without that group's media
        "categories": categories,
        "speech_sources": {
            s: dict(Counter(r.get("audio_source", "?") for r in recs["speech-what"]))
            for s, recs in (("train", train), ("test", test))
        },
        "seed": seed,
        "max_per_task": max_per_task,
        "val_fraction": val_fraction,
    }
    for name, recs in files.items():
        write_json(out / name, recs)
    choices = {"image-category": categories, "image-yesno": YESNO_CHOICES}
    described = [
        {
            "name": t,
            **d,
            "prompt": d["prompt"].format(choices=", ".join(categories), phrase="<noun phrase>"),
            **({"choices": choices[t]} if t in choices else {}),
        }
        for t, d in TASKS.items()
    ]
    by_file = {n: sorted({r["task"] for r in recs}) for n, recs in files.items()}
    write_json(
        out / "tasks.json",
        {"tasks": described, "files": by_file, "counts": counts, "manifest": os.path.relpath(manifest.resolve(), base)},
    )
    return counts
