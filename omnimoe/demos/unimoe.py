"""The Uni-MoE demo on the embedded defaults: Gemma-3-270M + EfficientNet-Lite0 + Whisper-tiny on Tux Paint
tasks (image questions, spoken captions, sound effects).

Stage 1 aligns the connectors; stage 2 trains one dense FFN per modality group (image, speech, sound);
stage 3 builds the MoE from the base FFN plus those three (4 experts, top-2, every 2nd layer: a Uni-MoE
variant) with LoRA, and, as the comparison, a dense model with the same active parameters trained the same
way. Every held-out task is scored after every stage; the table shows per-task scores and the spread across
tasks (Uni-MoE's claim: less performance bias across modalities); plots show the scores and the expert load
per modality group per MoE layer.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from omnimoe.io import write_json
from omnimoe.mllm.train import MLLMTrainConfig, features_for, load_stage, run_stage

FULL = {"steps1": 300, "steps2": 30, "steps3": 80, "eval_per_task": 24, "max_per_task": 0}
QUICK = {"steps1": 2, "steps2": 2, "steps3": 2, "eval_per_task": 2, "max_per_task": 4}


def _recipe(stage: int, tasks: Path, **extra: Any) -> dict[str, Any]:
    return {"stage": stage, "llm": "gemma3-270m", "batch_size": 8, "warmup_steps": 5, "save_every": 10, "log_every": 5,
            "connectors": {"image": {"kind": "mlp", "max_tokens": 16}, "audio": {"kind": "mlp", "max_tokens": 16}},
            "moe": {"layers": "every:2", "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01},
            "eval_data": str(tasks / "test-eval.json"), "eval_max_new_tokens": 12, "eval_batch_size": 8, **extra}  # fmt: skip


def _config(data: dict[str, Any], overrides: list[str]) -> MLLMTrainConfig:
    from omnimoe.config import apply_overrides, from_dict

    return from_dict(MLLMTrainConfig, apply_overrides(data, overrides))


def eval_subset(tasks: Path, per_task: int, seed: int = 0) -> Path:
    """At most ``per_task`` held-out records of each task (generation on a CPU is the slow part)."""
    records = json.loads((tasks / "test.json").read_text())
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    picked = [r for _, rs in sorted(by_task.items()) for r in sorted(rng.sample(rs, min(per_task, len(rs))), key=lambda r: r["id"])]
    path = tasks / "test-eval.json"
    write_json(path, picked)
    return path


def blind_rows(tasks: Path) -> list[dict[str, Any]]:
    """The media-blind reference: every held-out record answered with its task's most frequent training
    answer. A model that scores no better has not learned to use the image or the audio."""
    from collections import Counter

    from omnimoe.mllm.metrics import score, summarise

    answers: dict[str, Counter] = {}
    for name in ("stage1.json", "stage3.json"):
        if (tasks / name).is_file():
            for r in json.loads((tasks / name).read_text()):
                answers.setdefault(r["task"], Counter())[r["answer"]] += 1
    scored = [{"task": r["task"], "group": r["group"], "score": score(r, answers[r["task"]].most_common(1)[0][0])}
              for r in json.loads((tasks / "test-eval.json").read_text()) if r["task"] in answers]  # fmt: skip
    return _rows("-", "blind (most frequent answer)", summarise(scored))


def _rows(stage: str, model: str, summary: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"stage": stage, "model": model, "task": t, "group": v["group"], "score": v["mean"], "n": v["n"]} for t, v in summary.get("tasks", {}).items()]


def run_unimoe_demo(out: str | Path, quick: bool = False, overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    from omnimoe.data.tuxpaint import build_tuxpaint_manifest
    from omnimoe.mllm.evaluate import evaluate_folder, expert_load_by_group
    from omnimoe.mllm.tasks import build_tuxpaint_tasks

    out = Path(out)
    size = QUICK if quick else FULL
    overrides = list(overrides or [])
    manifest, _ = build_tuxpaint_manifest(out / "data")
    tasks = out / "tasks"
    counts = build_tuxpaint_tasks(manifest, tasks, max_per_task=size["max_per_task"] or None)
    eval_subset(tasks, size["eval_per_task"])
    rows: list[dict[str, Any]] = blind_rows(tasks)
    summaries: dict[str, Any] = {}

    s1 = _config(_recipe(1, tasks, data=str(tasks / "stage1.json"), steps=size["steps1"]), overrides)
    r1 = run_stage(s1, out / "stage1", progress)
    summaries["stage1"] = evaluate_folder(r1["model"], r1["tokenizer"], s1, out / "stage1", progress)
    rows += _rows("1", "stage1 (connectors)", summaries["stage1"])
    del r1

    s2 = _config(_recipe(2, tasks, data=str(tasks / "stage3.json"), init=str(out / "stage1"), steps=size["steps2"]), overrides)
    r2 = run_stage(s2, out / "stage2", progress)
    for group in r2["groups"]:
        model, tok, cfg = load_stage(out / "stage2" / group)
        subset = [r for r in json.loads((tasks / "test-eval.json").read_text()) if r["group"] == group]
        write_json(tasks / f"test-eval-{group}.json", subset)
        cfg.eval_data = str(tasks / f"test-eval-{group}.json")
        summaries[f"stage2-{group}"] = evaluate_folder(model, tok, cfg, out / "stage2" / group, progress)
        rows += _rows("2", f"stage2 {group} FFN", summaries[f"stage2-{group}"])
    experts = {g: str(out / "stage2" / g) for g in r2["groups"]}

    loads, expert_names = {}, []
    for name, dense in (("moe", False), ("dense-equal-active", True)):
        cfg = _config(_recipe(3, tasks, data=str(tasks / "stage3.json"), init=str(out / "stage1"), experts=experts, dense=dense,
                              steps=size["steps3"]), overrides)  # fmt: skip
        folder = out / f"stage3-{name}"
        r3 = run_stage(cfg, folder, progress)
        summaries[f"stage3-{name}"] = evaluate_folder(r3["model"], r3["tokenizer"], cfg, folder, progress)
        rows += _rows("3", f"stage3 {name}", summaries[f"stage3-{name}"])
        if not dense:
            from omnimoe.mllm.data import ConversationData, template_for

            model, tok = r3["model"], r3["tokenizer"]
            data = ConversationData(tasks / "test-eval.json", features_for(cfg, [tasks / "test-eval.json"], False), tok, template_for(tok, cfg.template), model.config.placeholder_ids, lambda m, n: model.connectors[m].num_tokens(n))  # fmt: skip
            loads = expert_load_by_group(model, data)
            expert_names = [src.split(":")[1] if src.startswith("stage2:") else "base" for src in next(iter(model.config.expert_sources.values()), [])]
            write_json(folder / "expert_load.json", loads)
        del r3
    spread = {k: v.get("spread") for k, v in summaries.items()}
    result = {"rows": rows, "summaries": summaries, "spread": spread, "counts": counts["files"], "quick": quick, "plots": []}
    write_json(out / "results.json", rows)
    write_json(out / "summary.json", {k: v for k, v in result.items() if k != "rows"})
    result["plots"] = _plots(out, rows, loads, expert_names)
    return result


def _plots(out: Path, rows: list[dict[str, Any]], loads: dict[str, dict[int, list[float]]], expert_names: list[str] | None = None) -> list[str]:
    """``scores.png`` (every task after every stage) and ``expert_load.png`` (share of each group's routed
    tokens per expert, per MoE layer; experts named by where they came from: the base FFN or a stage-2 group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    models = list(dict.fromkeys(r["model"] for r in rows))
    task_names = sorted({r["task"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(task_names)), 4))
    width = 0.8 / max(1, len(models))
    for j, m in enumerate(models):
        vals = [next((r["score"] for r in rows if r["model"] == m and r["task"] == t), np.nan) for t in task_names]
        ax.bar(np.arange(len(task_names)) + j * width, vals, width, label=m)
    ax.set_xticks(np.arange(len(task_names)) + 0.4 - width / 2, task_names, rotation=20)
    ax.set_ylabel("score (accuracy / token F1)")
    ax.set_title("Held-out Tux Paint tasks after each stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=120)
    plt.close(fig)
    paths.append(str(out / "scores.png"))
    if loads:
        groups = sorted(loads)
        layers = sorted({int(k) for g in groups for k in loads[g]})
        grids = {layer: np.array([loads[g].get(layer, loads[g].get(str(layer))) for g in groups]) for layer in layers}
        top = max(float(g.max()) for g in grids.values())
        names = expert_names or [f"e{i}" for i in range(next(iter(grids.values())).shape[1])]
        fig, axes = plt.subplots(1, len(layers), figsize=(2.3 * len(layers) + 1, 3.0), squeeze=False)
        for ax, layer in zip(axes[0], layers):
            grid = grids[layer]
            ax.imshow(grid, vmin=0, vmax=top, cmap="viridis")  # colour scale up to the largest share (uniform = 1/E)
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 * top else "black")
            ax.set_title(f"layer {layer}", fontsize=8)
            ax.set_yticks(range(len(groups)), groups if layer == layers[0] else [""] * len(groups), fontsize=7)
            ax.set_xticks(range(grid.shape[1]), names[: grid.shape[1]], fontsize=6, rotation=45)
        fig.suptitle("Expert load per modality group (share of routed tokens; experts named by origin)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=120)
        plt.close(fig)
        paths.append(str(out / "expert_load.png"))
    return paths


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| model | " + " | ".join(tasks) + " | spread (max-min) |", "|---" * (len(tasks) + 2) + "|"]
    for m in models:
        got = {r["task"]: r["score"] for r in rows if r["model"] == m}
        vals = [got[t] for t in tasks if t in got]
        spread = f"{max(vals) - min(vals):.3f}" if len(vals) > 1 else "-"
        lines.append(f"| {m} | " + " | ".join(f"{got[t]:.3f}" if t in got else "-" for t in tasks) + f" | {spread} |")
    return "\n".join(lines)
