"""``omnimoe align``: from a manifest to a comparison of connectors, in one call.

1. extract one latent store per modality (reused when present: extraction resumes and refuses a mismatch);
2. train every method with every seed on the train split (validation carved from train, grouped by caption);
3. evaluate the best checkpoint of each run on the test split;
4. write ``results.json`` (one row per method, seed, direction and head), ``results.md`` (mean and spread over
   seeds), ``validation.json`` (the same rows on the validation split, the only ones a choice of recipe may
   read), plots, and the seed-0 connector of each method (``connectors/<method>``).

Modalities are given as ``name=encoder`` or ``name=encoder@field`` (the manifest field to encode; default: the
name when the manifest has such a field, else the encoder's modality), e.g.
``text=minilm,image=efficientnet-lite0,speech=whisper-tiny@audio,sound=whisper-tiny@sound``.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from omnimoe.align.connector import direction_name
from omnimoe.align.data import AlignmentData
from omnimoe.align.config import METHODS, TrainConfig
from omnimoe.align.evaluate import (
    ZERO_SHOT_PROMPT,
    evaluate,
    expert_load,
    fused_rows,
    keep_residuals_that_help,
    prior_rows,
    serving_weights,
    zero_shot,
)
from omnimoe.align.prior import LABEL_PROMPT, build_label_priors
from omnimoe.align.trainer import load_best, train
from omnimoe.data.manifest import read_manifest
from omnimoe.encoders import EncoderOptions
from omnimoe.io import file_sha256, read_json, relative_path, write_json
from omnimoe.runtime import is_rank0
from omnimoe.latents import extract
from omnimoe.latents.store import LatentStore


@dataclass
class AlignConfig:
    manifest: str
    encoders: dict[str, str]  # modality -> "encoder" or "encoder@field"
    out: str
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    directions: list[str] = field(default_factory=list)  # default: every ordered pair of modalities
    train: TrainConfig = field(default_factory=TrainConfig)
    stores: str = ""  # default: <out>/stores
    # The label prior (omnimoe.align.prior): where an encoder has its own classifier (EfficientNet: ImageNet),
    # add "prior" rows (zero-shot) and "contrastive+prior" rows: the learned score fused with it (weight picked on
    # val), or, with train.prior_weight > 0, the connector trained on top of it and scored as trained.
    label_prior: bool = True
    # > 0: a share of train captions held out as a "dev" split that neither training nor early stopping sees;
    # validation.json (what a choice between recipes reads) is then scored on it instead of on val
    dev_fraction: float = 0.0


def parse_encoders(spec: str) -> dict[str, str]:
    """``"text=minilm,image=efficientnet-lite0"`` -> ``{"text": "minilm", "image": "efficientnet-lite0"}``."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, enc = part.partition("=")
        if not sep or not name or not enc:
            raise ValueError(f"--encoders item {part!r} is not of the form modality=encoder[@field]")
        out[name] = enc
    if len(out) < 2:
        raise ValueError(f"--encoders needs at least two modalities, got {spec!r}")
    return out


def parse_seeds(spec: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else is refused naming ``--seeds``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"--seeds {spec!r}: expected a comma list of non-negative integers, e.g. 0,1,2")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {spec!r}: a seed is listed twice")
    return seeds


def _field_of(modality: str, encoder_spec: str, manifest_fields: set[str]) -> tuple[str, str | None]:
    encoder, _, field_name = encoder_spec.partition("@")
    if field_name:
        return encoder, field_name
    return encoder, modality if modality in manifest_fields else None


FIELD_MODALITY = {
    "text": "text",
    "image": "image",
    "audio": "audio",
    "sound": "audio",
}  # what each manifest field holds


def check_encoders(cfg: AlignConfig, fields: set[str]) -> None:
    """Before any extraction: each modality's field exists in the manifest and holds what its encoder reads."""
    from omnimoe.encoders.registry import encoder_modality

    for modality, spec in cfg.encoders.items():
        encoder, field_name = _field_of(modality, spec, fields)
        reads = encoder_modality(encoder)
        field_name = field_name or reads  # no field named: the encoder's own modality
        if field_name is None:
            continue  # an hf: encoder with no field: its modality is known once it loads
        if field_name not in fields:
            raise ValueError(
                f"--encoders {modality}={spec}: the manifest has no field {field_name!r} (it has {sorted(fields - {'id', 'split', '_line'})})"
            )
        holds = FIELD_MODALITY.get(field_name)
        if reads and holds and reads != holds:
            raise ValueError(
                f"--encoders {modality}={spec}: {encoder} reads {reads}, but the field {field_name!r} holds {holds}"
            )


def extract_all(cfg: AlignConfig, progress: bool = True) -> dict[str, Path]:
    records = read_manifest(cfg.manifest)
    fields = {k for r in records for k in r}
    root = Path(cfg.stores or Path(cfg.out) / "stores")
    stores = {}
    for modality, spec in cfg.encoders.items():
        encoder, field_name = _field_of(modality, spec, fields)
        suffix = "-tokens" if cfg.train.token_inputs else ""
        path = root / f"{modality}-{encoder.replace(':', '_').replace('/', '_')}{suffix}"
        extract(
            cfg.manifest,
            encoder,
            path,
            field=field_name,
            tokens=cfg.train.token_inputs,
            options=EncoderOptions(),
            progress=progress,
        )
        stores[modality] = path
    return stores


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (population std) over seeds for each method, direction and head."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["query"], r["target"], r["head"]), []).append(r)
    out = []
    for (method, q, t, head), rs in groups.items():
        item = {"method": method, "query": q, "target": t, "head": head, "seeds": len(rs), "n": rs[0]["n"]}
        for k in ("R@1", "R@5", "R@10"):
            vals = [r[k] for r in rs]
            item[k] = statistics.fmean(vals)
            item[k + "_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        out.append(item)
    return out


def markdown_table(summary: list[dict[str, Any]]) -> str:
    lines = ["| method | direction | head | R@1 | R@5 | R@10 | n | seeds |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted(
        summary,
        key=lambda s: (
            s["query"],
            s["target"],
            s["head"],
            METHODS.index(s["method"]) if s["method"] in METHODS else 99,
        ),
    ):
        cell = lambda k: f"{s[k]:.3f} ± {s[k + '_std']:.3f}"  # noqa: E731
        lines.append(
            f"| {s['method']} | {s['query']}->{s['target']} | {s['head']} | {cell('R@1')} | {cell('R@5')} | {cell('R@10')} | {s['n']} | {s['seeds']} |"
        )
    return "\n".join(lines) + "\n"


def zero_shot_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: zero-shot accuracy by category name per method and source modality (mean ± spread over seeds)."""
    if not rows:
        return ""
    lines = [
        "",
        f"Zero-shot classification by category name (prompt: {ZERO_SHOT_PROMPT.format('<category>')!r}):",
        "",
        "| method | query | accuracy | chance | n | seeds |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["query"]), []).append(r)
    for (method, query), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        spread = statistics.pstdev(acc) if len(acc) > 1 else 0.0
        lines.append(
            f"| {method} | {query} | {statistics.fmean(acc):.3f} ± {spread:.3f} | {rs[0]['chance']:.3f} | {rs[0]['n']} | {len(rs)} |"
        )
    return "\n".join(lines) + "\n"


def _category_prompts(cfg: AlignConfig, records: list[dict]) -> tuple[dict[str, str], list[str], torch.Tensor] | None:
    """Category of each sample, the sorted names, and the text encoder's vectors of their prompts."""
    categories = {r["id"]: r["category"] for r in records if isinstance(r.get("category"), str)}
    if "text" not in cfg.encoders or len(set(categories.values())) < 2:
        return None
    from omnimoe.encoders import load_encoder

    names = sorted(set(categories.values()))
    encoder = load_encoder(_field_of("text", cfg.encoders["text"], set())[0])
    prompts = [ZERO_SHOT_PROMPT.format(n) for n in names]
    return categories, names, encoder.encode([encoder.load_item(p) for p in prompts]).pooled


RUN = "run.json"


SERVED_HEADS = ("contrastive", "contrastive+prior")  # what retrieval can serve: the connector alone, or fused


def seed_means(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """(method, head) -> the mean R@1 over directions of each seed (in seed order), for the served heads;
    keys in the order the rows first give them."""
    per: dict[tuple[str, str], dict[int, list[float]]] = {}
    for r in rows:
        if r["head"] in SERVED_HEADS:
            per.setdefault((r["method"], r["head"]), {}).setdefault(r["seed"], []).append(r["R@1"])
    return {key: [statistics.fmean(v) for _, v in sorted(seeds.items())] for key, seeds in per.items()}


def choose(val_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What this run serves (``omnimoe search``/``serve`` by default), chosen on the validation split: the
    (method, head) of highest mean R@1 over directions, averaged over seeds, where head is the connector's
    contrastive score alone or fused with the label prior; and, per method, the better of its two heads."""
    scores = {key: statistics.fmean(values) for key, values in seed_means(val_rows).items()}
    if not scores:
        return {}
    ranking = sorted(scores, key=lambda k: -scores[k])  # stable: the methods' order breaks ties
    heads = {}
    for method, head in ranking:
        heads.setdefault(method, head)
    method, head = ranking[0]
    return {
        "method": method,
        "head": head,
        "validation_mean_r1": scores[ranking[0]],
        "heads": heads,
        "ranking": [{"method": m, "head": h, "validation_mean_r1": scores[(m, h)]} for m, h in ranking],
    }


def check_run_identity(out: Path, identity: dict[str, Any]) -> None:
    """``out/run.json`` records what decides a run folder's connectors (the manifest's bytes, each modality's
    encoder and weights, the directions, the token inputs). The first run writes it; a later run into the same
    folder must match it key for key, else it is refused naming what differs: a connector trained on other
    latents is never resumed or reported under new labels. Keys a run does not know yet are added."""
    path = out / RUN
    before = {"dev_fraction": 0.0, **read_json(path)} if path.is_file() else {}  # runs written before the key
    differs = [
        f"{k}: {before[k]!r} in {path}, {v!r} now" for k, v in identity.items() if k in before and before[k] != v
    ]
    if differs:
        raise ValueError(f"{out} holds a run of other inputs ({'; '.join(differs)}). Use a new --out folder.")
    if any(k not in before for k in identity) and is_rank0():
        write_json(path, {**before, **identity})


def run_align(cfg: AlignConfig, progress: bool = True) -> dict[str, Any]:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'all'")
    modalities = list(cfg.encoders)
    directions = cfg.directions or [direction_name(a, b) for a in modalities for b in modalities if a != b]
    # what the folder's connectors depend on: checked before any extraction, then with the encoders' weights
    records = read_manifest(cfg.manifest)  # a missing or malformed manifest is named here
    check_encoders(cfg, {k for r in records for k in r})
    check_run_identity(
        out,
        {
            "manifest_sha256": file_sha256(cfg.manifest),
            "encoders": dict(cfg.encoders),
            "directions": directions,
            "token_inputs": cfg.train.token_inputs,
            "dev_fraction": cfg.dev_fraction,
        },
    )
    stores = extract_all(cfg, progress)
    check_run_identity(
        out, {"encoder_weights": {m: LatentStore.open(p).index.get("weights_hash") for m, p in stores.items()}}
    )
    data = AlignmentData(
        cfg.manifest,
        stores,
        tokens=cfg.train.token_inputs,
        pooled_tokens=cfg.train.pool_tokens,
        dev_fraction=cfg.dev_fraction,
    )
    choice = "dev" if any(len(data.pairs(d, "dev")) for d in directions) else "val"
    rows, val_rows, curves, loads, zeroshot, betas, serve, residuals = [], [], {}, {}, [], {}, {}, {}
    prompts = _category_prompts(cfg, records) if is_rank0() else None
    priors = {}
    if cfg.label_prior and (
        is_rank0() or cfg.train.prior_weight > 0
    ):  # every rank trains with it; rank 0 alone scores it
        priors = build_label_priors(  # the bridge's settings chosen on the train split (the prior never trains)
            {m: _field_of(m, spec, set())[0] for m, spec in cfg.encoders.items()}, calibrate_on=data
        )
    zero_shot_prior = prior_rows(data, directions, priors)
    for method in cfg.methods:
        for seed in cfg.seeds:
            tcfg = dataclasses.replace(cfg.train, method=method, seed=seed)  # type: ignore[arg-type]
            run_dir = out / "runs" / method / f"seed{seed}"
            result = train(data, directions, tcfg, run_dir, progress=progress, priors=priors)
            if not is_rank0():
                continue  # under torchrun every rank trains; rank 0 alone evaluates and writes
            model = load_best(tcfg, data, directions, run_dir)
            if tcfg.residual_per_direction and (  # before anything reads or saves the model
                kept := keep_residuals_that_help(model, data, directions, tcfg, priors)
            ):
                residuals[f"{method}/seed{seed}"] = kept
            fused, betas[f"{method}/seed{seed}"] = fused_rows(model, data, directions, priors, tcfg)
            for r in evaluate(model, data, directions, "test", cfg=tcfg) + fused:
                rows.append({"method": method, "seed": seed, **r})
            # the same rows on the split a choice between recipes reads (dev where there is one, else val; the
            # test rows: never)
            val_fused = fused_rows(model, data, directions, priors, tcfg, split=choice)[0]
            for r in evaluate(model, data, directions, choice, cfg=tcfg) + val_fused:
                val_rows.append({"method": method, "seed": seed, "split": choice, **r})
            if prompts is not None:
                zeroshot += [
                    {"method": method, "seed": seed, **r}
                    for r in zero_shot(model, data, *prompts, directions, cfg=tcfg)
                ]
            if seed == cfg.seeds[0]:
                curves[method] = result["history"]
                if hasattr(model, "save_pretrained"):
                    model.save_pretrained(out / "connectors" / method)
                    serve[method] = serving_weights(
                        model, data, directions, priors, betas[f"{method}/seed{seed}"], tcfg
                    )
                if (load := expert_load(model, data, directions, tcfg)) is not None:
                    loads[method] = load
    if not is_rank0():
        return {"rows": [], "summary": [], "plots": [], "directions": directions, "zeroshot": []}
    # the prior alone, once per seed like every method (it does not train, so the spread is 0)
    rows += [{"method": "label-prior", "seed": seed, **r} for seed in cfg.seeds for r in zero_shot_prior]
    summary = summarise(rows)
    write_json(out / "results.json", rows)
    write_json(out / "validation.json", val_rows)
    if residuals:  # per run and direction: whether the residual on top of the linear path was kept
        write_json(out / "residuals.json", residuals)
    else:
        (out / "residuals.json").unlink(missing_ok=True)  # an earlier call's choices no longer apply
    if zeroshot:
        write_json(out / "zeroshot.json", zeroshot)
    if priors:  # the weight of the prior in each fused score, picked on validation (omnimoe.align.prior)
        write_json(
            out / "prior.json",
            {
                "prompt": LABEL_PROMPT,  # the plain bridge's; each prior's own is in "settings"
                "modalities": {m: p.text for m, p in priors.items()},
                # per modality, the bridge's prompt, temperature and top_k, chosen on the train split
                "settings": {m: p.settings for m, p in priors.items()},
                "prior_weight": cfg.train.prior_weight,
                "beta": betas,
                # per method, the weight of the prior side in a fused search (omnimoe.align.evaluate.serving_weights)
                "serve": serve,
            },
        )
    (out / "results.md").write_text(markdown_table(summary) + zero_shot_table(zeroshot))
    from omnimoe.eval.plots import plot_expert_load, plot_recall, plot_training_curves

    plots = [plot_recall(summary, out / "recall.png"), plot_training_curves(curves, out / "training_curves.png")]
    if any(s["head"] == "contrastive+prior" for s in summary):
        plots.append(plot_recall(summary, out / "recall_with_prior.png", head="contrastive+prior"))
    for method, load in loads.items():
        plots.append(
            plot_expert_load(
                load, out / f"expert_load_{method}.png", title=f"{method}: expert load per direction (test)"
            )
        )
    write_json(
        out / "summary.json",
        {
            "summary": summary,
            "manifest": relative_path(cfg.manifest, out),
            "encoders": cfg.encoders,
            "modalities": list(cfg.encoders),
            "methods": cfg.methods,
            "stores": {m: relative_path(p, out) for m, p in stores.items()},
            "directions": directions,
            "train_config": dataclasses.asdict(cfg.train),
            "chosen": {**choose(val_rows), "split": choice} if val_rows else {},
            "plots": [p.name for p in plots],
        },
    )
    return {"rows": rows, "summary": summary, "plots": plots, "directions": directions, "zeroshot": zeroshot}
