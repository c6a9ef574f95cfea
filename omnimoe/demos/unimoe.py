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
from collections import Counter
from pathlib import Path
from typing import Any

from omnimoe.io import write_json
from omnimoe.mllm.train import MLLMTrainConfig, dataset_for, features_for, load_stage, run_stage

FULL = {
    "prealign": 600,
    "steps1": 500,
    "steps2": 30,
    "steps3": 100,
    "eval_per_task": 0,
    "max_per_task": 0,
    "eval_tokens": 12,
}
VAL_FRACTION = 0.2  # held_out="val": the share of train captions held out for choosing recipes
QUICK = {"prealign": 5, "steps1": 2, "steps2": 2, "steps3": 2, "eval_per_task": 0, "max_per_task": 4, "eval_tokens": 6}


def _recipe(stage: int, tasks: Path, **extra: Any) -> dict[str, Any]:
    return {
        "stage": stage,
        "llm": "gemma3-270m",
        "template": "auto",
        "batch_size": 8,
        "warmup_steps": 10,
        "save_every": 25,
        "log_every": 10,
        "connectors": {"image": {"kind": "mlp", "max_tokens": 16}, "audio": {"kind": "mlp", "max_tokens": 16}},
        "moe": {"layers": "every:2", "num_experts_per_tok": 2, "router_aux_loss_coef": 0.01},
        "eval_data": str(tasks / "test-eval.json"),
        "eval_max_new_tokens": 12,
        "eval_batch_size": 8,
        **extra,
    }


def _config(data: dict[str, Any], overrides: list[str]) -> MLLMTrainConfig:
    from omnimoe.config import apply_overrides, from_dict

    return from_dict(MLLMTrainConfig, apply_overrides(data, overrides))


def eval_subset(tasks: Path, per_task: int, seed: int = 0, split: str = "test") -> Path:
    """``<split>-eval.json``: at most ``per_task`` records of each task of ``<split>.json`` (0: every record)."""
    records = json.loads((tasks / f"{split}.json").read_text())
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    picked = [
        r
        for _, rs in sorted(by_task.items())
        for r in sorted(rng.sample(rs, min(per_task or len(rs), len(rs))), key=lambda r: r["id"])
    ]
    path = tasks / f"{split}-eval.json"
    write_json(path, picked)
    return path


BLIND = "blind (most frequent answer)"
PROBE = "probe ceiling (frozen pooled features)"
NEAREST = "nearest training answer (frozen pooled features)"
ORACLE = "best training answer (oracle)"
OPEN_TASKS = {"image-what": "image", "speech-what": "audio", "sound-what": "audio"}


def blind_rows(tasks: Path, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """The media-blind reference: every held-out record answered with its task's most frequent training
    answer. A model that scores no better has not learned to use the image or the audio. It ignores the
    media, so its swapped-media score is its score."""
    from omnimoe.mllm.metrics import score, summarise

    answers: dict[str, Counter] = {}
    for name in ("stage1.json", "stage3.json"):
        if (tasks / name).is_file():
            for r in json.loads((tasks / name).read_text()):
                answers.setdefault(r["task"], Counter())[r["answer"]] += 1
    scored = [
        {"task": r["task"], "group": r["group"], "score": score(r, answers[r["task"]].most_common(1)[0][0])}
        for r in json.loads((tasks / f"{split}-eval.json").read_text())
        if r["task"] in answers
    ]
    summary = summarise(scored)
    for info in summary["tasks"].values():
        info["swapped"], info["seeing_gain"] = info["mean"], 0.0
    return _rows("-", BLIND, summary, seed)


def open_answer_rows(tasks: Path, features: Any, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """What limits the open tasks, whose held-out answers (captions, transcriptions) never occur in training:
    ``NEAREST`` answers each held-out record with the training answer of the same task whose media are
    closest (cosine of the frozen pooled features; ``swapped``: the same with the swapped record's media);
    ``ORACLE`` picks the training answer of highest token F1 with the true one, an upper bound for any
    model that can only say what it was taught."""
    import torch
    import torch.nn.functional as F

    from omnimoe.mllm.data import MediaFeatures
    from omnimoe.mllm.evaluate import swap_media
    from omnimoe.mllm.metrics import summarise, token_f1

    root = tasks.resolve()

    def files(r: dict[str, Any], modality: str) -> list[str]:
        value = r.get(modality)
        return [MediaFeatures.key(features.root, root, f) for f in (value if isinstance(value, list) else [value])]

    def usable(name: str, task: str) -> list[dict[str, Any]]:
        modality = OPEN_TASKS[task]
        return [
            r
            for r in json.loads((tasks / name).read_text())
            if r["task"] == task
            and r.get(modality)
            and all(features.problem(modality, k) is None for k in files(r, modality))
        ]

    def pooled(recs: list[dict[str, Any]], modality: str) -> torch.Tensor:
        return F.normalize(
            torch.stack([features.item(modality, files(r, modality)).float().mean(0) for r in recs]), dim=-1
        )

    nearest, oracle = [], []
    for task, modality in OPEN_TASKS.items():
        train, test = usable("stage3.json", task), usable(f"{split}-eval.json", task)
        if not train or not test:
            continue
        answers = [r["answer"] for r in train]
        distinct = set(answers)
        keys = pooled(train, modality)
        picks = (pooled(test, modality) @ keys.T).argmax(1).tolist()
        moved = swap_media(test, seed)
        swapped = (pooled(moved, modality) @ keys.T).argmax(1).tolist() if len(moved) == len(test) else picks
        for r, i, j in zip(test, picks, swapped):
            nearest.append({"task": task, "group": r["group"], "score": token_f1(answers[i], r["answer"]),
                            "swapped": token_f1(answers[j], r["answer"])})  # fmt: skip
            best = max(token_f1(a, r["answer"]) for a in distinct)
            oracle.append({"task": task, "group": r["group"], "score": best, "swapped": best})
    rows = []
    for name, scored in ((NEAREST, nearest), (ORACLE, oracle)):
        if not scored:
            continue
        summary = summarise([{k: v for k, v in s.items() if k != "swapped"} for s in scored])
        for task, info in summary["tasks"].items():
            values = [s["swapped"] for s in scored if s["task"] == task]
            info["swapped"] = sum(values) / len(values)
            info["seeing_gain"] = info["mean"] - info["swapped"]
        rows += _rows("-", name, summary, seed)
    return rows


def _phrase(record: dict[str, Any]) -> str:
    text = record["conversations"][0]["value"]
    return text.split("Is this ", 1)[-1].split("? Answer yes or no.", 1)[0]


def probe_rows(
    tasks: Path, features: Any, model: Any, tokenizer: Any, seed: int = 0, split: str = "test"
) -> list[dict[str, Any]]:
    """The probe ceiling of each closed task (:mod:`omnimoe.mllm.probe`) on the held-out records of
    ``<split>-eval.json``, trained on ``stage3.json``; ``swapped``: the same probe on the media-swapped records."""
    import torch

    from omnimoe.mllm.data import MediaFeatures
    from omnimoe.mllm.evaluate import swap_media
    from omnimoe.mllm.probe import category_probe, yesno_probe

    root = tasks.resolve()

    def key(r: dict[str, Any]) -> str:
        return MediaFeatures.key(features.root, root, r["image"])

    def usable(
        name: str,
    ) -> list[dict[str, Any]]:  # records whose image was encoded (the evaluation drops the others too)
        return [
            r
            for r in json.loads((tasks / name).read_text())
            if "image" in r and features.problem("image", key(r)) is None
        ]

    train, test = usable("stage3.json"), usable(f"{split}-eval.json")

    def pooled(recs: list[dict[str, Any]]) -> torch.Tensor:
        return torch.stack([features.item("image", [key(r)]).float().mean(0) for r in recs])

    table = model.llm.get_input_embeddings()

    @torch.no_grad()
    def phrases(recs: list[dict[str, Any]]) -> torch.Tensor:
        ids = [tokenizer(_phrase(r), add_special_tokens=False).input_ids or [0] for r in recs]
        return torch.stack([table(torch.tensor(i)).float().mean(0) for i in ids])

    rows = []
    for task in ("image-category", "image-yesno"):
        tr = [r for r in train if r["task"] == task]
        te = [r for r in test if r["task"] == task]
        if not tr or not te:
            continue
        te_swap = {r["id"]: r for r in swap_media(te, seed)}
        sw = [te_swap.get(r["id"], r) for r in te]
        groups = [r["source_id"] for r in tr]
        if task == "image-category":
            res = category_probe(
                pooled(tr),
                [r["answer"] for r in tr],
                pooled(te),
                [r["answer"] for r in te],
                groups,
                seed,
                control_x=pooled(sw),
            )
        else:
            yes = [[r["answer"].lower().startswith("yes") for r in recs] for recs in (tr, te)]
            res = yesno_probe(
                pooled(tr), phrases(tr), yes[0], pooled(te), phrases(te), yes[1], groups, seed, control_x=pooled(sw)
            )
        rows.append(
            {
                "stage": "-",
                "model": PROBE,
                "task": task,
                "group": "image",
                "score": res["score"],
                "n": res["n"],
                "swapped": res["control"],
                "seeing_gain": res["score"] - res["control"],
                "seed": seed,
                "weight_decay": res["weight_decay"],
            }
        )
    return rows


def _rows(stage: str, model: str, summary: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    rows = []
    for t, v in summary.get("tasks", {}).items():
        row = {
            "stage": stage,
            "model": model,
            "task": t,
            "group": v["group"],
            "score": v["mean"],
            "n": v["n"],
            "swapped": v.get("swapped"),
            "seeing_gain": v.get("seeing_gain"),
            "seed": seed,
        }
        if "replies" in v:
            row["replies"] = v["replies"]
        rows.append(row)
    return rows


def run_unimoe_demo(
    out: str | Path,
    quick: bool = False,
    overrides: list[str] | None = None,
    progress: bool = True,
    seed: int = 0,
    held_out: str = "test",
) -> dict[str, Any]:
    """Every stage, both stage-3 models, every held-out record scored with its own and with swapped media,
    the blind and probe-ceiling rows, chat answers on held-out stamps, plots. ``seed`` seeds every stage
    (the task files and the held-out split stay those of seed 0, so seeds compare on the same records).
    ``held_out="val"`` is for choosing a recipe: a fifth of the train captions becomes the validation split
    (left out of training), scored in place of the test split, which is then never read."""
    from omnimoe.data.tuxpaint import build_tuxpaint_manifest
    from omnimoe.mllm.evaluate import evaluate_folder, expert_load_by_group
    from omnimoe.mllm.tasks import build_tuxpaint_tasks

    out = Path(out)
    size = QUICK if quick else FULL
    overrides = [f"seed={seed}", f"eval_max_new_tokens={size['eval_tokens']}", *(overrides or [])]
    if held_out not in ("test", "val"):
        raise ValueError(f"held_out must be 'test' or 'val', got {held_out!r}")
    tasks = out / "tasks"
    val_fraction = VAL_FRACTION if held_out == "val" else 0.0
    if (tasks / "tasks.json").is_file():  # the stages of this folder were trained on those task files
        before = json.loads((tasks / "tasks.json").read_text())["counts"].get("val_fraction", 0.0)
        if before != val_fraction:
            raise ValueError(
                f"{out} holds a run with held_out={'val' if before else 'test'}; use another output folder"
            )
    manifest, _ = build_tuxpaint_manifest(out / "data")
    counts = build_tuxpaint_tasks(manifest, tasks, max_per_task=size["max_per_task"] or None, val_fraction=val_fraction)
    evals = eval_subset(tasks, size["eval_per_task"], split=held_out)
    rows: list[dict[str, Any]] = blind_rows(tasks, seed, held_out)
    summaries: dict[str, Any] = {}

    s1 = _config(
        _recipe(
            1,
            tasks,
            eval_data=str(evals),
            data=str(tasks / "stage1.json"),
            steps=size["steps1"],
            prealign={"steps": size["prealign"]},
        ),
        overrides,
    )
    r1 = run_stage(s1, out / "stage1", progress)
    reference_features = features_for(s1, [tasks / "stage3.json", evals], False)
    rows += probe_rows(tasks, reference_features, r1["model"], r1["tokenizer"], seed, held_out)
    rows += open_answer_rows(tasks, reference_features, seed, held_out)
    summaries["stage1"] = evaluate_folder(r1["model"], r1["tokenizer"], s1, out / "stage1", progress)
    rows += _rows("1", "stage1 (connectors)", summaries["stage1"], seed)
    del r1

    s2 = _config(
        _recipe(
            2,
            tasks,
            eval_data=str(evals),
            data=str(tasks / "stage3.json"),
            init=str(out / "stage1"),
            steps=size["steps2"],
        ),
        overrides,
    )
    r2 = run_stage(s2, out / "stage2", progress)
    for group in r2["groups"]:
        model, tok, cfg = load_stage(out / "stage2" / group)
        subset = [r for r in json.loads(evals.read_text()) if r["group"] == group]
        write_json(tasks / f"{held_out}-eval-{group}.json", subset)
        cfg.eval_data = str(tasks / f"{held_out}-eval-{group}.json")
        # each group's FFN scored on its group's records (no swap control: stage 2 only feeds the experts)
        summaries[f"stage2-{group}"] = evaluate_folder(model, tok, cfg, out / "stage2" / group, progress, control=False)
        rows += _rows("2", f"stage2 {group} FFN", summaries[f"stage2-{group}"], seed)
    experts = {g: str(out / "stage2" / g) for g in r2["groups"]}

    loads, expert_names, chats = {}, [], []
    for name, dense in (("moe", False), ("dense-equal-active", True)):
        cfg = _config(
            _recipe(
                3,
                tasks,
                eval_data=str(evals),
                data=str(tasks / "stage3.json"),
                init=str(out / "stage1"),
                experts=experts,
                dense=dense,
                steps=size["steps3"],
            ),
            overrides,
        )
        folder = out / f"stage3-{name}"
        r3 = run_stage(cfg, folder, progress)
        summaries[f"stage3-{name}"] = evaluate_folder(r3["model"], r3["tokenizer"], cfg, folder, progress)
        rows += _rows("3", f"stage3 {name}", summaries[f"stage3-{name}"], seed)
        if not dense:
            model, tok = r3["model"], r3["tokenizer"]
            data = dataset_for(cfg, evals, features_for(cfg, [evals], False), model, tok, report=False)
            loads = expert_load_by_group(model, data)
            expert_names = [
                src.split(":")[1] if src.startswith("stage2:") else "base"
                for src in next(iter(model.config.expert_sources.values()), [])
            ]
            write_json(folder / "expert_load.json", loads)
            del r3
            chats = chat_examples(folder, tasks, 2 if quick else 10, seed=0, split=held_out)
            write_json(out / "chat.json", chats)
        else:
            del r3
    spread = {k: v.get("spread") for k, v in summaries.items()}
    result = {
        "rows": rows,
        "summaries": summaries,
        "spread": spread,
        "counts": counts["files"],
        "quick": quick,
        "seed": seed,
        "held_out": held_out,
        "chat": chats,
        "plots": [],
    }
    write_json(out / "results.json", rows)
    write_json(out / "summary.json", {k: v for k, v in result.items() if k != "rows"})
    result["plots"] = _plots(out, rows, loads, expert_names) + ([_chat_sheet(out, chats)] if chats else [])
    return result


def chat_examples(
    model_dir: Path, tasks: Path, count: int = 10, seed: int = 0, question: str = "What is this?", split: str = "test"
) -> list[dict[str, Any]]:
    """``omnimoe mllm chat --image <stamp> "What is this?"`` on ``count`` held-out stamps drawn at random
    (fixed seed), through the live encoder as a user runs it: ``{image, answer, caption, category}``."""
    from omnimoe.mllm.chat import ChatSession
    from omnimoe.mllm.metrics import token_f1

    held_out = json.loads((tasks / f"{split}.json").read_text())
    test = [r for r in held_out if r["task"] == "image-what"]  # the stamps with their captions as answers
    categories = {r["source_id"]: r["answer"] for r in held_out if r["task"] == "image-category"}
    picked = random.Random(f"{seed}:chat").sample(test, min(count, len(test)))
    session = ChatSession(model_dir)
    rows = []
    for r in picked:
        path = (tasks / r["image"]).resolve()
        reply = session.ask(question, images=[str(path)], max_new_tokens=16)
        caption = r["answer"]
        rows.append(
            {
                "id": r["source_id"],
                "image": str(path),
                "question": question,
                "answer": reply,
                "caption": caption,
                "category": categories.get(r["source_id"]),
                "token_f1": token_f1(reply, caption),
            }
        )
    return grade_chat(rows, tasks, split)


def grade_chat(rows: list[dict[str, Any]], tasks: Path, split: str = "test") -> list[dict[str, Any]]:
    """Add to each chat row what its reply names: ``named`` (the data set's object whose caption the reply
    is, after answer normalisation, else None), ``named_category`` (that object's category),
    ``right_object`` (the reply is the stamp's own caption) and ``right_category`` (the reply names an
    object of the stamp's category). Objects come from the training files and the held-out split."""
    from omnimoe.mllm.metrics import normalise_answer

    records = []
    for name in ("stage1.json", "stage3.json", f"{split}.json"):
        if (tasks / name).is_file():
            records += json.loads((tasks / name).read_text())
    category = {r["source_id"]: r["answer"] for r in records if r["task"] == "image-category"}
    objects = {
        normalise_answer(r["answer"]): (r["answer"], category.get(r["source_id"]))
        for r in records
        if r["task"] == "image-what"
    }
    graded = []
    for row in rows:
        named, named_category = objects.get(normalise_answer(row["answer"]), (None, None))
        graded.append(
            {
                **row,
                "named": named,
                "named_category": named_category,
                "right_object": normalise_answer(row["answer"]) == normalise_answer(row["caption"]),
                "right_category": named_category is not None and named_category == row["category"],
            }
        )
    return graded


def _chat_sheet(out: Path, chats: list[dict[str, Any]]) -> str:
    """``chat.png``: each held-out stamp with the model's answer to "What is this?" and the true caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from omnimoe.encoders.media import read_image

    cols = min(5, len(chats))
    rows_ = (len(chats) + cols - 1) // cols
    fig, axes = plt.subplots(rows_, cols, figsize=(2.6 * cols, 3.0 * rows_), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, chats):
        try:
            ax.imshow(read_image(c["image"]))
        except Exception:  # a picture that cannot be shown still gets its text
            pass
        mark = " (right object)" if c.get("right_object") else " (its category)" if c.get("right_category") else ""
        ax.set_title(f"model: {c['answer'][:28]}{mark}\ntrue: {c['caption'][:28]}", fontsize=7)
    fig.suptitle('Held-out stamps: "What is this?" (stage-3 MoE model)', fontsize=9)
    fig.tight_layout()
    path = out / "chat.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _plots(
    out: Path,
    rows: list[dict[str, Any]],
    loads: dict[str, dict[int, list[float]]],
    expert_names: list[str] | None = None,
) -> list[str]:
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
        swapped = [
            next((r.get("swapped") for r in rows if r["model"] == m and r["task"] == t), None) for t in task_names
        ]
        xs = [x for x, v in zip(np.arange(len(task_names)) + j * width, swapped) if v is not None]
        ax.scatter(
            xs,
            [v for v in swapped if v is not None],
            marker="_",
            s=60,
            color="black",
            zorder=3,
            label="swapped media" if j == 0 else None,
        )
    ax.set_xticks(np.arange(len(task_names)) + 0.4 - width / 2, task_names, rotation=20)
    ax.set_ylabel("score (accuracy / token F1)")
    ax.set_title("Held-out Tux Paint tasks after each stage (black: the same records with swapped media)")
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
                ax.text(
                    j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white" if v < 0.6 * top else "black"
                )
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
    """Per task: score (swapped-media score); yes/no with its share of "yes" replies; spread across tasks."""
    rows = result["rows"]
    tasks = sorted({r["task"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [
        "score (swapped-media score) per task; image-yesno also [share of yes replies]",
        "",
        "| model | " + " | ".join(tasks) + " | spread (max-min) |",
        "|---" * (len(tasks) + 2) + "|",
    ]

    def cell(r: dict[str, Any]) -> str:
        text = f"{r['score']:.3f}"
        if r.get("swapped") is not None:
            text += f" ({r['swapped']:.3f})"
        if "yes" in (r.get("replies") or {}):
            text += f" [{r['replies']['yes']:.2f}]"
        return text

    for m in models:
        got = {r["task"]: r for r in rows if r["model"] == m}
        vals = [got[t]["score"] for t in tasks if t in got]
        spread = f"{max(vals) - min(vals):.3f}" if len(vals) > 1 else "-"
        lines.append(f"| {m} | " + " | ".join(cell(got[t]) if t in got else "-" for t in tasks) + f" | {spread} |")
    return "\n".join(lines)


def aggregate_seeds(runs: list[Path]) -> dict[str, Any]:
    """Mean and spread over seeds of every (model, task) row of several demo runs (``results.json`` each),
    and for each model the spread across tasks of its mean scores, raw and, for tasks with a probe ceiling,
    as a fraction of that ceiling (``score / ceiling``): Uni-MoE's performance bias across modalities."""
    import statistics

    rows = [r for run in runs for r in json.loads((Path(run) / "results.json").read_text())]
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        cell = cells.setdefault((r["model"], r["task"]), {"score": [], "swapped": [], "yes": [], "seed": []})
        cell["score"].append(r["score"])
        cell["seed"].append(r.get("seed", 0))
        if r.get("swapped") is not None:
            cell["swapped"].append(r["swapped"])
        if "yes" in (r.get("replies") or {}):
            cell["yes"].append(r["replies"]["yes"])

    def ms(v: list[float]) -> dict[str, float] | None:
        return (
            {"mean": statistics.fmean(v), "std": statistics.pstdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            if v
            else None
        )

    table = {
        f"{m} | {t}": {
            "model": m,
            "task": t,
            "score": ms(c["score"]),
            "swapped": ms(c["swapped"]),
            "yes_share": ms(c["yes"]),
            "seeds": sorted(set(c["seed"])),
        }
        for (m, t), c in cells.items()
    }
    ceilings = {c["task"]: c["score"]["mean"] for c in table.values() if c["model"] == PROBE}
    spread = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        means = {c["task"]: c["score"]["mean"] for c in table.values() if c["model"] == model}
        if len(means) < 2:
            continue
        rel = [means[t] / ceilings[t] for t in means if t in ceilings and ceilings[t] > 0]
        spread[model] = {
            "max_min": max(means.values()) - min(means.values()),
            "std": statistics.pstdev(means.values()),
            "relative_to_ceiling": {"max_min": max(rel) - min(rel), "std": statistics.pstdev(rel)}
            if len(rel) > 1
            else None,
        }
    chat = []
    for run in map(Path, runs):  # chat on held-out stamps, graded here too for runs written before the grading
        if (run / "chat.json").is_file() and (run / "summary.json").is_file():
            info = json.loads((run / "summary.json").read_text())
            graded = grade_chat(
                json.loads((run / "chat.json").read_text()), run / "tasks", info.get("held_out", "test")
            )
            chat.append(
                {
                    "run": str(run),
                    "seed": info.get("seed", 0),
                    "n": len(graded),
                    "right_object": sum(g["right_object"] for g in graded),
                    "right_category": sum(g["right_category"] for g in graded),
                }
            )
    return {"cells": table, "spread": spread, "chat": chat, "runs": [str(r) for r in runs]}


def format_seeds(agg: dict[str, Any]) -> str:
    """Markdown: mean ± std over seeds per task, swapped-media score in brackets, yes share for yes/no."""
    cells = agg["cells"].values()
    tasks = sorted({c["task"] for c in cells})
    models = list(dict.fromkeys(c["model"] for c in cells))
    lines = ["| model | seeds | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for m in models:
        got = {c["task"]: c for c in cells if c["model"] == m}
        seeds = max((len(c["seeds"]) for c in got.values()), default=0)
        out = []
        for t in tasks:
            c = got.get(t)
            if c is None:
                out.append("-")
                continue
            text = f"{c['score']['mean']:.3f} ± {c['score']['std']:.3f}"
            if c["swapped"] and m != BLIND:
                text += f" ({c['swapped']['mean']:.3f})"
            if c["yes_share"]:
                text += f" [yes {c['yes_share']['mean']:.2f}]"
            out.append(text)
        lines.append(f"| {m} | {seeds} | " + " | ".join(out) + " |")
    return "\n".join(lines)
