"""Training a connector on stored latents (encoders never run here), and evaluating it.

Methods, all in this one loop on the same data and split:

* ``moe-alternating``: the Alt-MoE connector, one direction per optimizer step (AGD);
* ``moe-joint``: the same connector, every direction summed in each step (the no-alternation ablation);
* ``mlp-alternating``: the connector with one dense MLP in place of the MoE (the paper's MLP ablation);
* ``linear``: a CLIP-style two-tower reference, one linear projection per modality + InfoNCE.

Scalars go to TensorBoard (``out/tb``): losses per direction, learning rate, validation recall per direction.
``steps`` counts direction-batches, so alternating and joint schedules get the same data and compute.
Each optimizer step (:meth:`Trainer.train_step`): a batch per scheduled direction, latent mixup, the
contrastive (InfoNCE, negatives from every rank) and regression losses, one backward. Loop: AdamW; linear warm-up then cosine decay of the learning rate; weight decay ramped linearly from
``weight_decay`` to ``weight_decay_end``; gradient clipping; bf16 autocast where this CPU runs it fast.
Every ``eval_every`` steps: recall on the validation split, early stopping on the mean R@1 over directions
(contrastive head) with the best weights kept, and a checkpoint of the whole training state, written
atomically, so a killed run resumes where it was and ends with the same result.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from omnimoe.align.config import AFTER_TRAINING, METHODS, TrainConfig, flat
from omnimoe.align.connector import AltMoEConnector, ConnectorOutput, LinearTwoTower, parse_direction
from omnimoe.align.data import AlignmentData
from omnimoe.align.evaluate import evaluate, fused_rows, mean_r1, selection_score
from omnimoe.align.losses import LogitScale, gather_rows, info_nce, regression_loss
from omnimoe.align.prior import LabelPrior, prior_for
from omnimoe.align.schedules import DirectionSchedule
from omnimoe.io import write_json
from omnimoe.threads import ThreadPolicy
from omnimoe.runtime import (
    adamw,
    autocast_dtype,
    init_distributed,
    remove_temporaries,
    require_finite,
    resolve_device,
    restore_rng,
    rng_state,
    save_checkpoint,
    tensorboard,
    warmup_cosine,
)

__all__ = ["METHODS", "TrainConfig", "Trainer", "build_model", "evaluate", "load_best", "mean_r1", "train"]


class PairStep(nn.Module):
    """One direction's forward: the query side and the projected target keys, in one ``forward`` so that
    DistributedDataParallel sees (and synchronises) every parameter the step uses."""

    def __init__(self, model: nn.Module, scale: LogitScale) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def forward(
        self, direction: str, source: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[ConnectorOutput, torch.Tensor, torch.Tensor]:
        return self.model(direction, source, mask), self.model.embed_target(direction, target), self.scale()


def build_model(cfg: TrainConfig, widths: dict[str, int], directions: list[str]) -> nn.Module:
    """``cfg.method``'s model for the data's modality ``widths``: the linear two-tower, or the connector of
    ``cfg.connector`` (the MoE, or the dense MLP for ``mlp-alternating``)."""
    if cfg.method == "linear":
        return LinearTwoTower(widths, cfg.connector.contrastive_dim)
    return AltMoEConnector(
        dataclasses.replace(
            cfg.connector,
            modalities=dict(widths),
            directions=list(directions),
            use_moe=cfg.method != "mlp-alternating",
        )
    )


def schedule_for(cfg: TrainConfig, directions: list[str]) -> DirectionSchedule:
    kind = cfg.schedule
    if kind == "auto":
        kind = "joint" if cfg.method in ("moe-joint", "linear") else "alternate"
    return DirectionSchedule(directions, kind, cfg.steps_per_direction, seed=cfg.seed)


def lr_at(cfg: TrainConfig, step: int) -> float:
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr)


def weight_decay_at(cfg: TrainConfig, step: int) -> float:
    return cfg.weight_decay + (cfg.weight_decay_end - cfg.weight_decay) * min(1.0, step / max(1, cfg.steps))


def augment(
    cfg: TrainConfig,
    source: torch.Tensor,
    target: torch.Tensor,
    std: torch.Tensor,
    gen: torch.Generator,
    mask: torch.Tensor | None = None,
    pooled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mixup of whole pairs (a mixed pair stays a positive pair) and noise on the source side. Token inputs
    (B, L, D) mix position by position, and the mixed row keeps the tokens of both. ``pooled`` (B, D), the
    pooled latents of token inputs' rows, is mixed with the same weights (the label prior reads it).
    Returns (source, target, mask, pooled)."""
    if cfg.mixup_alpha > 0:
        lam = torch.distributions.Beta(cfg.mixup_alpha, cfg.mixup_alpha).sample((len(source), 1))
        perm = torch.randperm(len(source), generator=gen)
        lam_src = lam.view(-1, *([1] * (source.dim() - 1)))
        source = lam_src * source + (1 - lam_src) * source[perm]
        target = lam * target + (1 - lam) * target[perm]
        if mask is not None:
            mask = mask | mask[perm]
        if pooled is not None:
            pooled = lam * pooled + (1 - lam) * pooled[perm]
    if cfg.input_noise > 0:
        source = source + torch.randn(source.shape, generator=gen) * std * cfg.input_noise
    return source, target, mask, pooled


class Trainer:
    """One training run: the model, the optimiser, the direction schedule, the validation record, and the
    files of ``out`` (``state.pt`` to resume, ``best.pt``, ``train.json``, TensorBoard under ``tb``).
    :func:`train` drives it; each method is one named step of the loop."""

    def __init__(
        self,
        data: AlignmentData,
        directions: list[str],
        cfg: TrainConfig,
        out: Path,
        priors: dict[str, LabelPrior] | None = None,
        progress: bool = True,
    ) -> None:
        self.data, self.directions, self.cfg, self.out, self.progress = data, directions, cfg, out, progress
        out.mkdir(parents=True, exist_ok=True)
        self.rank, self.world = init_distributed()
        self.device = device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = build_model(cfg, data.widths, directions).to(device)
        self.starts_linear = cfg.linear_start and cfg.connector.linear_path and cfg.method != "linear"
        if self.starts_linear and cfg.freeze_linear:
            for p in self.model.linear_parameters():
                p.requires_grad_(False)
        self.scale = LogitScale(cfg.temperature, cfg.learnable_temperature).to(device)
        self.step_module: nn.Module = PairStep(self.model, self.scale)
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=ids, find_unused_parameters=True
            )
            torch.manual_seed(cfg.seed + 7919 * self.rank)  # different dropout masks per rank
        self.params = [p for p in [*self.model.parameters(), *self.scale.parameters()] if p.requires_grad]
        # for-each AdamW: the seeded results in docs/results.md were trained with it (runtime.adamw)
        self.opt = adamw(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, device=device, fused=False)
        self.schedule = schedule_for(cfg, directions)
        self.priors = priors if cfg.prior_weight > 0 else None
        if cfg.prior_weight > 0 and not any(prior_for(self.priors, d) for d in directions):
            warnings.warn(
                f"prior_weight={cfg.prior_weight} but no label prior applies to {directions}: training without it",
                stacklevel=3,
            )
        self.device_priors = {m: p.to(device) for m, p in (self.priors or {}).items()}
        self.train_pairs = {d: data.pairs(d, "train") for d in directions}
        for d, p in self.train_pairs.items():
            if len(p) < 2:
                raise ValueError(f"direction {d}: {len(p)} training pairs; need at least 2")
        self.has_val = any(len(data.pairs(d, "val")) for d in directions)
        if not self.has_val:
            warnings.warn(
                f"no validation pairs for {directions}: early stopping is off and the last weights are kept "
                "(give the manifest a val split, or more train items to carve one from)",
                stacklevel=3,
            )
        self.dtype = autocast_dtype(cfg.dtype, device)
        self.feature_std = self._feature_std()
        self.state_path = out / "state.pt"
        if self.rank == 0:
            remove_temporaries(out)  # of a run killed mid-write
        self.step, self.best, self.best_step, self.history, self.bad_evals = 0, -1.0, -1, [], 0
        self.writer: Any = None
        self.bar: Any = None
        self.pending: dict[str, list[float]] = {}  # per-direction losses since the last log point

    def _feature_std(self) -> dict[str, torch.Tensor]:
        """The noise scale of each modality, from the training rows only (no statistics of test inputs leak
        into training)."""
        rows: dict[str, list[torch.Tensor]] = {}
        for d, p in self.train_pairs.items():
            src, tgt = parse_direction(d)
            rows.setdefault(src, []).append(p.src_rows)
            rows.setdefault(tgt, []).append(p.tgt_rows)
        return {m: self.data.latents[m][torch.cat(r).unique()].std(0) for m, r in rows.items()}

    @property
    def stopped_early(self) -> bool:
        return self.bad_evals >= self.cfg.patience  # a finished run that stopped early stays stopped

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps or self.stopped_early

    def start_from_linear(self, priors: dict[str, LabelPrior] | None) -> None:
        """``linear_start``: train the linear two-tower (the ``linear`` method, same settings and seed) in
        ``out/linear-start``, copy it into the connector's linear path, and judge it on validation as step 0.
        A resumed run has all of this in its state already."""
        if not self.starts_linear or self.state_path.is_file():
            return
        linear = dataclasses.replace(self.cfg, method="linear", linear_start=False)
        folder = self.out / "linear-start"
        train(self.data, self.directions, linear, folder, self.progress, priors=priors)
        best = torch.load(folder / "best.pt", weights_only=False, map_location=self.device)
        tower = build_model(linear, self.data.widths, self.directions)
        tower.load_state_dict(best["model"])
        self.model.load_linear(tower)
        self.scale.load_state_dict(best["scale"])

    def resume(self) -> None:
        """Continue from ``state.pt`` when a killed run left one (refused when its config differs), then open
        the TensorBoard writer and the progress bar at the step reached."""
        if self.state_path.is_file():
            state = torch.load(self.state_path, weights_only=False, map_location=self.device)
            if _resumable(state["config"]) != _resumable(dataclasses.asdict(self.cfg)):
                raise ValueError(f"{self.state_path} was written with another config; use a new output folder")
            self.model.load_state_dict(state["model"])
            self.scale.load_state_dict(state["scale"])
            self.opt.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            restore_rng(state, self.device)
            for key in ("step", "best", "best_step", "history", "bad_evals"):
                setattr(self, key, state[key])
        self.model.train()
        self.writer = tensorboard(self.out / "tb", self.step) if self.rank == 0 else None
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc=f"train {self.cfg.method}",
            disable=not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )

    def train_step(self) -> tuple[torch.Tensor, dict[str, float]]:
        """One optimizer step over the directions the schedule gives this step; returns the summed loss and
        each direction's part. ``step`` counts direction-batches: an alternating step advances it by 1, a
        joint one by the number of directions, so budgets (steps, warm-up, evaluation) are equal in data and
        compute across schedules."""
        cfg, device = self.cfg, self.device
        for group in self.opt.param_groups:
            group["lr"], group["weight_decay"] = lr_at(cfg, self.step), weight_decay_at(cfg, self.step)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + self.step) * 64 + self.rank)  # step and rank
        loss = torch.zeros((), device=device)
        logs: dict[str, float] = {}
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            for d in self.schedule.directions_for(self.step):
                part = self._direction_loss(d, gen)
                loss = loss + part
                logs[d] = part.item()
        require_finite(
            loss, f"step {self.step} (directions: " + ", ".join(f"{d} {v:.4g}" for d, v in logs.items()) + ")"
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        self.step += len(logs)
        return loss, logs

    def _direction_loss(self, d: str, gen: torch.Generator) -> torch.Tensor:
        """Direction ``d``'s loss on a fresh batch: contrastive (with the prior's scores where it applies) plus
        the router's and the regression head's."""
        cfg, device, data = self.cfg, self.device, self.data
        src, tgt = parse_direction(d)
        pairs = self.train_pairs[d]
        pick = torch.randint(len(pairs), (min(cfg.batch_size, len(pairs)),), generator=gen)
        source, mask = data.inputs(src, pairs.src_rows[pick], cfg.reads_tokens)
        target = data.latents[tgt][pairs.tgt_rows[pick]]
        pooled = data.latents[src][pairs.src_rows[pick]] if mask is not None else None  # for the prior
        source, target, mask, pooled = augment(cfg, source, target, self.feature_std[src], gen, mask, pooled)
        source, target = source.to(device, non_blocking=True), target.to(device, non_blocking=True)
        pooled = source if pooled is None else pooled.to(device, non_blocking=True)  # beside what it is gathered with
        mask = None if mask is None else mask.to(device)
        o, keys, logit_scale = self.step_module(d, source, target, mask)
        # Negatives from every rank: the ranks' mean loss is the loss of one big batch.
        keys_all, offset = gather_rows(keys)
        queries_all, _ = gather_rows(o.contrastive)
        prior_qk = prior_kq = None
        if (prior := prior_for(self.device_priors, d)) is not None:  # the fixed prior scores of this batch
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                source_all, target_all = gather_rows(pooled.float())[0], gather_rows(target.float())[0]
                prior_qk = cfg.prior_weight * prior.pair_scores(d, pooled, target_all)
                prior_kq = cfg.prior_weight * prior.pair_scores(d, source_all, target).t()
        con = info_nce(
            o.contrastive,
            keys,
            logit_scale,
            key_all=keys_all,
            query_all=queries_all,
            offset=offset,
            prior_qk=prior_qk,
            prior_kq=prior_kq,
        )
        part = cfg.contrastive_weight * con + o.router_loss
        if o.regression is not None:
            part = part + cfg.regression_weight * regression_loss(o.regression, target, cfg.regression_loss)
        return part

    def log(self, previous: int, loss: torch.Tensor, logs: dict[str, float]) -> None:
        """Progress bar, and TensorBoard every 10 direction-batches: the loss, the learning rate, and each
        direction's mean loss since the last point (alternation visits each in turn)."""
        for d, v in logs.items():
            self.pending.setdefault(d, []).append(v)
        if self.writer is not None and self.step // 10 > previous // 10:
            self.writer.add_scalar("train/loss", loss.item(), self.step)
            self.writer.add_scalar("train/lr", lr_at(self.cfg, previous), self.step)
            for d, vs in self.pending.items():
                self.writer.add_scalar(f"train/loss/{d}", sum(vs) / len(vs), self.step)
            self.pending.clear()
        self.bar.update(len(logs))
        self.bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{max(self.best, 0):.3f}")

    def validation_due(self, previous: int) -> bool:
        return self.step // self.cfg.eval_every > previous // self.cfg.eval_every or self.step >= self.cfg.steps

    def validate(self, loss: torch.Tensor, logs: dict[str, float]) -> None:
        """Recall on the validation split; keep the best weights (``best.pt``), count evaluations without
        improvement (early stopping), and checkpoint the whole training state (``state.pt``)."""
        cfg = self.cfg
        rows = evaluate(self.model, self.data, self.directions, "val", cfg=cfg)
        if self.priors:
            rows += fused_rows(self.model, self.data, self.directions, self.priors, cfg, split="val")[0]
        val = selection_score(rows, cfg.select_on)
        self.history.append(
            {
                "step": self.step,
                "loss": loss.item(),
                "val_score": val,
                "val_mean_r1": selection_score(rows),
                "lr": lr_at(cfg, self.step - 1),
                "losses": logs,
            }
        )
        self.schedule.update({f"{r['query']}->{r['target']}": r["R@1"] for r in rows if r["head"] == "contrastive"})
        if self.writer is not None:
            self.writer.add_scalar("val/score", val, self.step)
            self.writer.add_scalar("val/mean_R@1", self.history[-1]["val_mean_r1"], self.step)
            for r in rows:
                self.writer.add_scalar(f"val/{r['head']}/{r['query']}->{r['target']}/R@1", r["R@1"], self.step)
            self.writer.flush()
        # Every rank evaluates the same (synchronised) weights on the same data, so all reach the same
        # early-stopping decision without talking; rank 0 alone writes.
        if val > self.best or not self.has_val:  # nothing to judge by: the latest weights are the best
            self.best, self.best_step, self.bad_evals = val, self.step, 0
            if self.rank == 0:
                save_checkpoint(
                    self.out / "best.pt",
                    {"model": self.model.state_dict(), "scale": self.scale.state_dict(), "step": self.step},
                )
        else:
            self.bad_evals += 1
        if self.rank == 0:
            save_checkpoint(self.state_path, self.state())
        if self.world > 1:
            dist.barrier()

    def state(self) -> dict[str, Any]:
        """Everything a killed run needs to end with the same result."""
        return {
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "scale": self.scale.state_dict(),
            "optimizer": self.opt.state_dict(),
            "schedule": self.schedule.state_dict(),
            **rng_state(self.device),
            "step": self.step,
            "best": self.best,
            "best_step": self.best_step,
            "history": self.history,
            "bad_evals": self.bad_evals,
        }

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def finish(self) -> dict[str, Any]:
        """Close the writers, release DDP, and write ``train.json``."""
        self.close()
        if self.world > 1:
            del self.step_module  # release DDP's hold on the process group before the caller tears it down
            dist.barrier()
        result = {
            "best_step": self.best_step,
            "best_val": self.best,
            "history": self.history,
            "stopped_early": self.stopped_early,
        }
        if self.rank == 0:
            write_json(self.out / "train.json", result)
        return result


def train(
    data: AlignmentData,
    directions: list[str],
    cfg: TrainConfig,
    out: str | Path,
    progress: bool = True,
    stop_at_step: int | None = None,
    priors: dict[str, LabelPrior] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.method`` on the train split; resume from ``out/state.pt`` when present.

    ``priors`` (from :func:`omnimoe.align.prior.build_label_priors`) are used when ``cfg.prior_weight > 0``:
    the connector then learns on top of them.

    Returns ``{"best_step", "best_val", "history", "stopped_early"}``; the best weights are in ``out/best.pt``.
    ``stop_at_step`` ends the run early without finishing (used to test resumption).
    """
    with ThreadPolicy("small"):  # a connector's ops are small: one thread, whatever else runs (omnimoe.threads)
        run = Trainer(data, directions, cfg, Path(out), priors, progress)
        run.start_from_linear(priors)
        run.resume()
        if run.starts_linear and run.step == 0 and not run.history:  # the linear start, judged before any step
            run.validate(torch.zeros(()), {})
        while not run.done:
            if stop_at_step is not None and run.step >= stop_at_step:
                run.close()
                return {"interrupted_at": run.step}
            previous = run.step
            loss, logs = run.train_step()
            run.log(previous, loss, logs)
            if run.validation_due(previous):
                run.validate(loss, logs)
        return run.finish()


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys a resumed run must share with the one that wrote the checkpoint (not the device);
    the connector's keys flattened, so a checkpoint written before the ``connector`` section still matches."""
    # keys added since, at the value a checkpoint written before them was trained with
    before = {"linear_start": False, "freeze_linear": True, "pool_tokens": 0, "linear_path": False}
    return {
        k: v
        for k, v in {**before, **flat(config)}.items()
        if k not in ("device", "modalities", "directions", "use_moe", *AFTER_TRAINING)  # not training
    }


def load_best(cfg: TrainConfig, data: AlignmentData, directions: list[str], out: str | Path) -> nn.Module:
    """The best weights, on the CPU."""
    model = build_model(cfg, data.widths, directions)
    model.load_state_dict(torch.load(Path(out) / "best.pt", weights_only=False, map_location="cpu")["model"])
    return model.eval()
