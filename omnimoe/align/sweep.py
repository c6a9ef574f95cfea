"""Choosing a recipe on held-out data: ``omnimoe align --sweep sweep.yaml``.

A sweep file names candidate recipes (``TrainConfig`` overrides, on top of the run's ``--config``/``--set``)
and, optionally, several data sets (manifests)::

    candidates:
      default: {}
      no-linear-start: {linear_start: false}
      dropout-0.3: {connector: {dropout: 0.3}}
      mpnet: {encoders: {text: mpnet}}  # other towers for some modalities (stores extracted once per encoder)
    datasets:                       # optional; default: the run's --manifest
      tuxpaint: runs/tux/manifest.jsonl
      art4apps: runs/art4apps/manifest.jsonl
    dev_fraction: 0.1               # optional (default 0.1): train captions held out for choosing

Every candidate runs ``omnimoe align`` (:func:`omnimoe.align.pipeline.run_align`) on every data set with the
run's methods and seeds, into ``out/<dataset>/<candidate>`` (latent stores shared per data set; a killed sweep
resumes run by run). Candidates that differ only in fields read after training (``residual_per_direction``)
train once: the later ones start from the earlier one's finished runs (:func:`share_training`). A share of
the train captions (``dev_fraction``) is held out as a **dev** split that neither training nor early stopping
sees: the validation score of a run is the best of its evaluations and flatters the recipes that fluctuate
most, the dev score is not. Each (candidate, method, head) is scored on
dev: mean R@1 over directions, averaged over seeds, then over data sets. Rows within one standard error of
the top are ties, and among ties the candidate listed first in the file wins (:func:`choose`); the test
figures stand beside the ranking for the reader and are never read to choose. Writes ``sweep.json`` (every score),
``sweep.md`` (the ranking) and ``chosen.json`` (the chosen recipe: candidate, method, head, overrides, encoders).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from omnimoe.align.config import AFTER_TRAINING, TrainConfig
from omnimoe.align.pipeline import run_align, seed_means
from omnimoe.config import ConfigError, from_dict
from omnimoe.io import read_json, write_json
from omnimoe.runtime import barrier, is_rank0


@dataclass
class SweepSpec:
    candidates: dict[str, dict[str, Any]]  # name -> TrainConfig overrides, and optionally "encoders"
    datasets: dict[str, str] = field(default_factory=dict)  # name -> manifest; empty: the run's own manifest
    dev_fraction: float = 0.1  # train captions held out for choosing (neither trained on nor early-stopped on)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file: every candidate must make a valid ``TrainConfig`` (checked by
    :func:`recipe`), so a typo fails here, before any extraction or training."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"sweep file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or set(data) - {"candidates", "datasets", "dev_fraction"}:
        raise ConfigError(
            f"sweep file {path}: expected the keys 'candidates' and (optional) 'datasets' and 'dev_fraction'"
        )
    dev = data.get("dev_fraction", 0.1)
    if not isinstance(dev, (int, float)) or not 0 < dev < 0.5:
        raise ConfigError(f"sweep file {path}: dev_fraction must be a number in (0, 0.5), got {dev!r}")
    candidates, datasets = data.get("candidates"), data.get("datasets") or {}
    if not isinstance(candidates, dict) or not candidates:
        raise ConfigError(f"sweep file {path}: 'candidates' must map names to TrainConfig overrides")
    if not isinstance(datasets, dict) or not all(isinstance(v, str) for v in datasets.values()):
        raise ConfigError(f"sweep file {path}: 'datasets' must map names to manifest paths")
    for name, overrides in candidates.items():
        if overrides is not None and not isinstance(overrides, dict):
            raise ConfigError(f"sweep file {path}: candidate {name!r} must be a mapping of TrainConfig fields")
        encoders = (overrides or {}).get("encoders", {})
        if not isinstance(encoders, dict) or not all(isinstance(v, str) and v for v in encoders.values()):
            raise ConfigError(
                f"sweep file {path}: candidate {name!r}: 'encoders' must map modalities to encoder names "
                "(e.g. {text: mpnet})"
            )
    return SweepSpec(
        {str(k): dict(v or {}) for k, v in candidates.items()}, {str(k): v for k, v in datasets.items()}, float(dev)
    )


def candidate_encoders(base: dict[str, str], overrides: dict[str, Any], name: str = "") -> dict[str, str]:
    """The run's encoders (modality -> encoder) with a candidate's ``encoders`` in place of some of them."""
    encoders = overrides.get("encoders") or {}
    unknown = sorted(set(encoders) - set(base))
    if unknown:
        raise ConfigError(
            f"candidate {name!r}: encoders for {unknown}, which the run does not have (it has {sorted(base)})"
        )
    merged = dict(base)
    for modality, spec in encoders.items():
        field_name = base[modality].partition("@")[2]
        merged[modality] = spec if "@" in spec or not field_name else f"{spec}@{field_name}"  # keeps the field read
    return merged


def check_encoder_names(encoders: dict[str, str], name: str = "") -> None:
    """Refuse an encoder that is neither a registry name nor ``hf[-text|-vision|-audio]:...``, before any run."""
    from omnimoe.encoders.registry import REGISTRY, is_encoder_name

    for modality, spec in encoders.items():
        encoder = spec.partition("@")[0]
        if not is_encoder_name(encoder):
            raise ConfigError(
                f"candidate {name!r}: unknown encoder {encoder!r} for {modality!r} (use one of "
                f"{', '.join(sorted(REGISTRY))}, or hf:<model id or local folder>)"
            )


def recipe(base: TrainConfig, overrides: dict[str, Any], name: str = "") -> TrainConfig:
    """``base`` with a candidate's overrides (flat connector keys such as ``dropout`` read as
    ``connector.dropout``, as in a recipe file; ``encoders`` is not a training field and is left out)."""
    merged = dataclasses.asdict(base)
    connector = dict(merged.pop("connector"))
    for key, value in overrides.items():
        if key == "encoders":
            continue
        if key == "connector":
            if not isinstance(value, dict):
                raise ConfigError(f"candidate {name!r}: 'connector' must be a mapping")
            connector.update(value)
        elif key in TrainConfig.legacy_keys:
            connector[key] = value
        else:
            merged[key] = value
    for key in ("modalities", "directions", "use_moe"):
        connector.pop(key, None)
    try:
        return from_dict(TrainConfig, {**merged, "connector": connector})
    except ConfigError as exc:
        raise ConfigError(f"candidate {name!r}: {exc}") from None


def training_key(cfg: TrainConfig, encoders: dict[str, str]) -> str:
    """What a candidate's training depends on: its towers and its ``TrainConfig`` less the fields read only
    after training (:data:`~omnimoe.align.config.AFTER_TRAINING`) and those every run sets itself (method,
    seed). Candidates with equal keys on one data set train the same runs (training is deterministic), so a
    sweep trains them once."""
    skip = {*AFTER_TRAINING, "method", "seed"}
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}
    return json.dumps({"encoders": encoders, "train": config}, sort_keys=True)


SHARED_MARK = "shared_from.json"  # in a run folder that another candidate's run was linked into


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # run files are replaced whole (written beside, then renamed), never edited in place
    except OSError:
        shutil.copy2(src, dst)


def share_training(done: Path, folder: Path) -> list[str]:
    """Start ``folder`` (a candidate with the same :func:`training_key` as ``done``) from ``done``'s finished
    runs: each ``runs/<method>/seed<k>`` with its ``train.json`` that ``folder`` lacks is hard-linked in (copied
    where the file system has no links), marked with :data:`SHARED_MARK`. A run ``folder`` already has stays
    its own. Returns the runs ``folder`` holds from ``done`` (``"<method>/seed<k>"``), linked now or before."""
    shared = []
    for run in sorted((done / "runs").glob("*/seed*")):
        if not run.is_dir() or not (run / "train.json").is_file():
            continue  # unfinished (or a staging folder): each candidate resumes its own
        name = run.relative_to(done / "runs").as_posix()
        target = folder / "runs" / name
        if not target.exists():
            staging = target.with_name(target.name + ".sharing")
            shutil.rmtree(staging, ignore_errors=True)  # left by a sweep killed while sharing
            shutil.copytree(run, staging, copy_function=_link_or_copy)
            write_json(staging / SHARED_MARK, {"from": os.path.relpath(run, staging.parent)})
            staging.rename(target)
        if (target / SHARED_MARK).is_file():
            shared.append(name)
    return shared


def score_run(folder: str | Path) -> list[dict[str, Any]]:
    """One ``omnimoe align`` folder's (method, head) scores: on the choice split (``validation.json``: dev, or
    val where the run has no dev split) and on test, mean R@1 over directions, mean and spread over seeds."""
    folder = Path(folder)
    chosen, test = seed_means(read_json(folder / "validation.json")), seed_means(read_json(folder / "results.json"))
    rows = []
    for (method, head), values in chosen.items():
        tested = test.get((method, head), [])
        rows.append(
            {
                "method": method,
                "head": head,
                "seeds": len(values),
                "dev": statistics.fmean(values),
                "dev_std": statistics.pstdev(values),
                "test": statistics.fmean(tested) if tested else None,
                "test_std": statistics.pstdev(tested) if tested else None,
            }
        )
    return rows


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (candidate, method, head): the dev score averaged over data sets, best first (ties: the order given)."""
    keyed: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        keyed.setdefault((r["candidate"], r["method"], r["head"]), []).append(r)
    ranked = [
        {
            "candidate": c,
            "method": m,
            "head": h,
            "dev": statistics.fmean(r["dev"] for r in rs),
            "datasets": {r["dataset"]: {k: r[k] for k in ("dev", "dev_std", "test", "test_std", "seeds")} for r in rs},
        }
        for (c, m, h), rs in keyed.items()
    ]
    return sorted(ranked, key=lambda r: -r["dev"])


def standard_error(row: dict[str, Any]) -> float:
    """The standard error of a ranked row's dev score (a mean over data sets of means over seeds)."""
    parts = [d["dev_std"] ** 2 / max(1, d["seeds"]) for d in row["datasets"].values()]
    return (sum(parts) ** 0.5) / len(parts)


def choose(ranked: list[dict[str, Any]], preference: list[str]) -> dict[str, Any]:
    """The first of ``ranked`` after ties are settled: every row within one standard error of the top's dev
    score is a tie (the dev split cannot tell them apart), and among ties the candidate listed first in the
    sweep file wins (list the safer or cheaper recipes first), then the higher score."""
    top = ranked[0]
    ties = [r for r in ranked if top["dev"] - r["dev"] <= standard_error(top)]
    return min(ties, key=lambda r: (preference.index(r["candidate"]), -r["dev"]))


def markdown(ranked: list[dict[str, Any]]) -> str:
    datasets = sorted({d for r in ranked for d in r["datasets"]})
    head = "| rank | candidate | method | head | dev (mean) | " + " | ".join(f"{d} dev | {d} test" for d in datasets)
    lines = [head + " |", "|" + "---|" * (5 + 2 * len(datasets))]
    for i, r in enumerate(ranked, 1):
        cells = []
        for d in datasets:
            s = r["datasets"].get(d)
            cells += (
                [
                    f"{s['dev']:.3f} ± {s['dev_std']:.3f}",
                    "-" if s["test"] is None else f"{s['test']:.3f} ± {s['test_std']:.3f}",
                ]
                if s
                else ["-", "-"]
            )
        lines.append(
            f"| {i} | {r['candidate']} | {r['method']} | {r['head']} | {r['dev']:.3f} | " + " | ".join(cells) + " |"
        )
    return (
        "Mean R@1 over directions, mean ± spread over seeds. Ranked by the dev split (held out from training and\n"
        "early stopping; averaged over data sets); the test columns are for reading, not for choosing.\n\n"
        + "\n".join(lines)
        + "\n"
    )


def run_sweep(spec: SweepSpec, base: Any, progress: bool = True) -> dict[str, Any]:
    """Run every candidate on every data set (``base``: the run's :class:`~omnimoe.align.pipeline.AlignConfig`;
    its ``out`` holds the sweep), rank on the dev split and write ``sweep.json``, ``sweep.md``, ``chosen.json``."""
    out = Path(base.out)
    recipes = {name: recipe(base.train, overrides, name) for name, overrides in spec.candidates.items()}
    encoders = {name: candidate_encoders(base.encoders, o, name) for name, o in spec.candidates.items()}
    for name, chosen_encoders in encoders.items():
        check_encoder_names(chosen_encoders, name)
    datasets = spec.datasets or {"data": base.manifest}
    rows, shared = [], {}
    for dataset, manifest in datasets.items():
        trained: dict[str, Path] = {}  # training key -> the first candidate's folder that trained it
        for name, train_cfg in recipes.items():
            folder = out / dataset / name
            stores = out / dataset / ("stores-tokens" if train_cfg.token_inputs else "stores")
            key = training_key(train_cfg, encoders[name])
            if key in trained:  # differs from an earlier candidate only after training: its runs, not a retraining
                if is_rank0() and (runs := share_training(trained[key], folder)):
                    shared[f"{dataset}/{name}"] = {"from": f"{dataset}/{trained[key].name}", "runs": runs}
                    print(f"{dataset}/{name}: trains as {trained[key].name}; {len(runs)} runs shared", flush=True)
                barrier()  # under torchrun the other ranks read the shared runs next
            else:
                trained[key] = folder
            run_align(
                dataclasses.replace(
                    base,
                    manifest=manifest,
                    out=str(folder),
                    encoders=encoders[name],
                    train=train_cfg,
                    stores=str(stores),
                    dev_fraction=spec.dev_fraction,
                ),
                progress,
            )
            if not is_rank0():
                continue  # under torchrun rank 0 alone evaluates and writes
            rows += [{"dataset": dataset, "candidate": name, **r} for r in score_run(folder)]
    if not is_rank0():
        return {"ranked": [], "chosen": {}}
    if not rows:
        raise ValueError(
            f"no dev rows in {list(datasets)}: a sweep chooses on a dev split carved from train, and these data "
            "sets have too few train captions to carve one"
        )
    ranked = rank(rows)
    best = choose(ranked, list(spec.candidates))
    chosen = {
        "candidate": best["candidate"],
        "method": best["method"],
        "head": best["head"],
        "label_prior": best["head"] == "contrastive+prior",
        "overrides": spec.candidates[best["candidate"]],
        "encoders": encoders[best["candidate"]],
        "dev_mean_r1": best["dev"],
        "dev_fraction": spec.dev_fraction,
        "datasets": datasets,
        "seeds": base.seeds,
    }
    write_json(out / "sweep.json", {"rows": rows, "ranked": ranked, "chosen": chosen, "shared_training": shared})
    (out / "sweep.md").write_text(markdown(ranked))
    write_json(out / "chosen.json", chosen)
    return {"ranked": ranked, "chosen": chosen}
