"""Held-out evaluation of a Uni-MoE model: greedy answers to every record of a task file, scored by task
(accuracy for closed questions, token F1 for open ones; :mod:`omnimoe.mllm.metrics`), summarised per task
and group with the spread across tasks; and expert load per modality group per MoE layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from omnimoe.mllm.data import ConversationData, MediaBatch, template_for
from omnimoe.mllm.metrics import score, summarise
from omnimoe.mllm.model import MultimodalLLM, causal_lm
from omnimoe.mllm.moe_llm import expert_load, set_token_mask


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
def answer(model: MultimodalLLM, tokenizer: Any, data: ConversationData, batch_size: int = 16, max_new_tokens: int = 24,
           limit: int = 0, template: str = "auto", progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy answers for the (generation-encoded) records: ``{"id", "task", "group", "prediction", "score"}``."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = list(range(len(data)))[: limit or None]
    rows = []
    for start in tqdm(range(0, len(order), batch_size), desc="evaluate", disable=not progress, dynamic_ncols=True):
        batch = data.collate(order[start : start + batch_size], pad, left_pad=True)
        out = model.generate(batch["input_ids"].to(device), batch["attention_mask"].to(device), _media(batch, device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=stop_ids(tokenizer, template))  # fmt: skip
        for ex, ids in zip(batch["examples"], out):
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            rec = ex.sample.record
            row = {"id": ex.sample.id, "task": rec.get("task", "chat"), "group": ex.sample.group, "prediction": text}
            if "answer" in rec:
                row["score"] = score(rec, text)
            rows.append(row)
    return rows


def evaluate(model: MultimodalLLM, tokenizer: Any, data: ConversationData, **kwargs: Any) -> dict[str, Any]:
    """``{"summary": per task / group means and spreads, "rows": per record}``."""
    rows = answer(model, tokenizer, data, **kwargs)
    scored = [r for r in rows if "score" in r]
    return {"summary": summarise(scored) if scored else {}, "rows": rows}


@torch.no_grad()
def expert_load_by_group(model: MultimodalLLM, data: ConversationData, batch_size: int = 16, limit: int = 64) -> dict[str, dict[int, list[float]]]:
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
            causal_lm(model.llm).get_decoder()(inputs_embeds=model.embed(batch["input_ids"].to(device), _media(batch, device)), attention_mask=attn)
            set_token_mask(model.llm, None)
            for layer, counts in expert_load(model.llm).items():
                totals[layer] = totals.get(layer, 0) + counts.float().cpu()
        result[group] = {layer: (c / c.sum().clamp_min(1)).tolist() for layer, c in totals.items()}
    return result


def evaluate_folder(model: MultimodalLLM, tokenizer: Any, cfg: Any, out: str | Path, progress: bool = True) -> dict[str, Any]:
    """Score ``cfg.eval_data`` (a recipe's held-out file) and write ``out/eval.json``; returns the summary."""
    from omnimoe.io import write_json
    from omnimoe.mllm.data import report_bad
    from omnimoe.mllm.train import features_for

    features = features_for(cfg, [Path(cfg.eval_data)], progress)
    data = ConversationData(Path(cfg.eval_data), features, tokenizer, template_for(tokenizer, cfg.template), model.config.placeholder_ids,
                            lambda m, n: model.connectors[m].num_tokens(n), cfg.max_len, generation=True)  # fmt: skip
    report_bad(cfg.eval_data, data.bad)
    result = evaluate(model, tokenizer, data, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.eval_max_new_tokens, limit=cfg.eval_limit,
                      template=cfg.template, progress=progress)  # fmt: skip
    write_json(Path(out) / "eval.json", result)
    return result["summary"]
