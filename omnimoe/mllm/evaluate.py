"""Held-out evaluation of a Uni-MoE model: greedy answers to every record of a task file, scored by task
(accuracy for closed questions, token F1 for open ones; :mod:`omnimoe.mllm.metrics`), summarised per task
and group with the spread across tasks; and expert load per modality group per MoE layer.

Telling seeing from guessing: every record is also answered with its media swapped for another record's of
the same task (:func:`swap_media`, a fixed derangement). A model that uses its media loses score under the
swap; one that guesses from the question does not. Each task's summary carries ``swapped`` (the score on
the swapped records) and ``seeing_gain`` (score - swapped), and closed tasks carry ``replies``: the share of
answers naming each choice (``None``: no choice named), so a constant answer shows.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from omnimoe.mllm.data import ConversationData, MediaBatch, template_for
from omnimoe.mllm.metrics import resolve_choice, score, summarise, task_kind
from omnimoe.mllm.model import MultimodalLLM, causal_lm
from omnimoe.mllm.moe_llm import expert_load, set_token_mask
from omnimoe.threads import ThreadPolicy, work_of


def stop_ids(tokenizer: Any, template_name: str = "auto") -> list[int]:
    template = template_for(tokenizer, template_name)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template.stop != "{eos}":
        stop = tokenizer.convert_tokens_to_ids(template.stop)
        if stop is not None and stop != tokenizer.unk_token_id:
            ids.append(stop)
    return ids


def _media(batch: dict[str, Any], device: torch.device) -> dict[str, MediaBatch]:
    return {m: MediaBatch(b.tokens.to(device), b.mask.to(device)) for m, b in batch["media"].items()}


@torch.no_grad()
def answer(
    model: MultimodalLLM,
    tokenizer: Any,
    data: ConversationData,
    batch_size: int = 16,
    max_new_tokens: int = 24,
    limit: int = 0,
    template: str = "auto",
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Greedy answers for the (generation-encoded) records: ``{"id", "task", "group", "prediction", "score"}``.
    ``dtype``: autocast dtype of the forward passes (None: float32; the trainers pass their training dtype)."""
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype not in (None, torch.float32))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = list(range(len(data)))[: limit or None]
    rows = []
    with ThreadPolicy(work_of(model)) as threads:
        for start in tqdm(range(0, len(order), batch_size), desc="evaluate", disable=not progress, dynamic_ncols=True):
            threads.tick()
            indices = order[start : start + batch_size]
            rows += _answer_batch(model, tokenizer, data, indices, pad, autocast, device, max_new_tokens, template)
    return rows


def _answer_batch(
    model: MultimodalLLM,
    tokenizer: Any,
    data: ConversationData,
    indices: list[int],
    pad: int,
    autocast: Any,
    device: torch.device,
    max_new_tokens: int,
    template: str,
) -> list[dict[str, Any]]:
    """Greedy answers for one left-padded batch of records (``indices`` into ``data``)."""
    batch = data.collate(indices, pad, left_pad=True)
    with autocast:
        out = model.generate(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            _media(batch, device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=stop_ids(tokenizer, template),
        )
    rows = []
    for ex, ids in zip(batch["examples"], out):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        rec = ex.sample.record
        row = {"id": ex.sample.id, "task": rec.get("task", "chat"), "group": ex.sample.group, "prediction": text}
        if "answer" in rec:
            row["score"] = score(rec, text)
        rows.append(row)
    return rows


MEDIA_FIELDS = ("image", "audio", "voice", "video")


def swap_media(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """The records with their media swapped: within each task, in a seeded order, record i takes the media of
    record i+1 (a cyclic shift: nobody keeps its own, the modality stays the same). Questions and answers
    stay; ``swapped_from`` names the record whose media it now holds. A task with one record cannot be
    swapped and is left out."""
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_task.setdefault(str(r.get("task", "")), []).append(i)
    out: list[dict[str, Any] | None] = [None] * len(records)
    for task, idx in sorted(by_task.items()):
        if len(idx) < 2:
            continue
        order = list(idx)
        random.Random(f"{seed}:swap:{task}").shuffle(order)
        for a, b in zip(order, order[1:] + order[:1]):
            rec, donor = dict(records[a]), records[b]
            fields = [f for f in MEDIA_FIELDS if f in rec or f in donor]
            for f in fields:
                rec.pop(f, None)
                if f in donor:
                    rec[f] = donor[f]
            rec["swapped_from"] = donor.get("id", b)
            out[a] = rec
    return [r for r in out if r is not None]


def reply_shares(rows: list[dict[str, Any]], records: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per closed task: the share of predictions naming each choice (``"none"``: no single choice named)."""
    counts: dict[str, Counter] = {}
    for row in rows:
        rec = records.get(row["id"])
        if rec is None or task_kind(rec) != "closed" or not rec.get("choices"):
            continue
        chosen = resolve_choice(row["prediction"], rec["choices"])
        counts.setdefault(row["task"], Counter())[chosen if chosen is not None else "none"] += 1
    return {t: {k: v / sum(c.values()) for k, v in sorted(c.items())} for t, c in sorted(counts.items())}


def evaluate(
    model: MultimodalLLM, tokenizer: Any, data: ConversationData, swapped: ConversationData | None = None, **kwargs: Any
) -> dict[str, Any]:
    """``{"summary": per task / group means and spreads, "rows": per record}``. With ``swapped`` (the same
    records with their media swapped, :func:`swap_media`), every task also gets ``swapped`` and
    ``seeing_gain``, and each row its ``swapped_score`` and ``swapped_prediction``."""
    rows = answer(model, tokenizer, data, **kwargs)
    scored = [r for r in rows if "score" in r]
    summary = summarise(scored) if scored else {}
    records = {ex.sample.id: ex.sample.record for ex in data.examples}
    for task, shares in reply_shares(rows, records).items():
        summary["tasks"][task]["replies"] = shares
    if swapped is not None and scored:
        control = {r["id"]: r for r in answer(model, tokenizer, swapped, **kwargs) if "score" in r}
        for row in rows:
            if row["id"] in control:
                row["swapped_score"], row["swapped_prediction"] = (
                    control[row["id"]]["score"],
                    control[row["id"]]["prediction"],
                )
        for task, info in summary["tasks"].items():
            pairs = [(r["score"], r["swapped_score"]) for r in scored if r["task"] == task and "swapped_score" in r]
            if pairs:  # the same record set for both numbers
                info["swapped"] = sum(b for _, b in pairs) / len(pairs)
                info["seeing_gain"] = sum(a - b for a, b in pairs) / len(pairs)
                info["n_swapped"] = len(pairs)
    return {"summary": summary, "rows": rows}


@torch.no_grad()
def expert_load_by_group(
    model: MultimodalLLM, data: ConversationData, batch_size: int = 16, limit: int = 64
) -> dict[str, dict[int, list[float]]]:
    """Fraction of routed tokens per expert, per MoE layer, for each modality group (teacher-forced
    forward passes over up to ``limit`` records of each group)."""
    device = next(model.parameters()).device
    pad = 0
    result: dict[str, dict[int, list[float]]] = {}
    for group, idx in sorted(data.groups().items()):
        totals: dict[int, torch.Tensor] = {}
        idx = idx[:limit]
        for start in range(0, len(idx), batch_size):
            batch = data.collate(idx[start : start + batch_size], pad)
            attn = batch["attention_mask"].to(device)
            set_token_mask(model.llm, attn)
            causal_lm(model.llm).get_decoder()(
                inputs_embeds=model.embed(batch["input_ids"].to(device), _media(batch, device)), attention_mask=attn
            )
            set_token_mask(model.llm, None)
            for layer, counts in expert_load(model.llm).items():
                totals[layer] = totals.get(layer, 0) + counts.float().cpu()
        result[group] = {layer: (c / c.sum().clamp_min(1)).tolist() for layer, c in totals.items()}
    return result


def evaluate_folder(
    model: MultimodalLLM, tokenizer: Any, cfg: Any, out: str | Path, progress: bool = True, control: bool = True
) -> dict[str, Any]:
    """Score ``cfg.eval_data`` (a recipe's held-out file) and write ``out/eval.json``; returns the summary.
    ``control``: also score the media-swap control (written beside the data as ``<name>-swapped.json``)."""
    from omnimoe.io import write_json
    from omnimoe.mllm.train import dataset_for, features_for

    path = Path(cfg.eval_data)
    files = [path]
    swap_path = path.with_name(path.stem + "-swapped.json")
    if control:
        records = json.loads(path.read_text())
        if cfg.eval_limit:
            records = records[: cfg.eval_limit]
        write_json(swap_path, swap_media(records, cfg.seed))
        files.append(swap_path)
    settings = {
        "batch_size": cfg.eval_batch_size,
        "max_new_tokens": cfg.eval_max_new_tokens,
        "limit": cfg.eval_limit,
        "template": cfg.template,
        "dtype": cfg.dtype,
        "max_len": cfg.max_len,
        "control": control,
    }
    key = evaluation_key(model, files, settings)
    done = Path(out) / "eval.json"
    if done.is_file():  # a resumed run: the same model on the same records scores the same
        before = json.loads(done.read_text())
        if before.get("key") == key:
            if progress:
                print(f"{done}: this model on these records is scored already; reusing it")
            return before["summary"]
    features = features_for(cfg, files, progress)
    data = dataset_for(cfg, path, features, model, tokenizer, generation=True)  # bad records reported
    swapped = (
        dataset_for(cfg, swap_path, features, model, tokenizer, generation=True, report=False) if control else None
    )
    from omnimoe.runtime import autocast_dtype

    dtype = autocast_dtype(cfg.dtype, next(model.parameters()).device)  # the recipe's dtype: bf16 where it is fast
    result = evaluate(
        model,
        tokenizer,
        data,
        swapped,
        batch_size=cfg.eval_batch_size,
        max_new_tokens=cfg.eval_max_new_tokens,
        limit=cfg.eval_limit,
        template=cfg.template,
        progress=progress,
        dtype=dtype,
    )
    write_json(done, {**result, "key": key})
    return result["summary"]


def evaluation_key(model: torch.nn.Module, files: list[Path], settings: dict[str, Any]) -> str:
    """What decides an evaluation's result: every weight of the model (bytes), the record files and the
    settings. Equal keys, equal scores: a resumed run reuses the ``eval.json`` that carries its key."""
    import hashlib

    from omnimoe.encoders.base import hash_state_dict

    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(Path(f).read_bytes())
    h.update(hash_state_dict(model.state_dict()).encode())
    return h.hexdigest()
