"""Training a connector on stored latents (encoders never run here), and evaluating it.

Methods, all in this one loop on the same data and split:

* ``moe-alternating``: the Alt-MoE connector, one direction per optimizer step (AGD);
* ``moe-joint``: the same connector, every direction summed in each step (the no-alternation ablation);
* ``mlp-alternating``: the connector with one dense MLP in place of the MoE (the paper's MLP ablation);
* ``linear``: a CLIP-style two-tower reference, one linear projection per modality + InfoNCE.

Scalars go to TensorBoard (``out/tb``): losses per direction, learning rate, validation recall per direction.
``steps`` counts direction-batches, so alternating and joint schedules get the same data and compute.
Loop: AdamW; linear warm-up then cosine decay of the learning rate; weight decay ramped linearly from
``weight_decay`` to ``weight_decay_end``; gradient clipping; bf16 autocast where this CPU runs it fast.
Every ``eval_every`` steps: recall on the validation split, early stopping on the mean R@1 over directions
(contrastive head) with the best weights kept, and a checkpoint of the whole training state, written
atomically, so a killed run resumes where it was and ends with the same result.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from omnimoe.align.connector import AltMoEConnector, ConnectorConfig, ConnectorOutput, LinearTwoTower, parse_direction
from omnimoe.align.data import AlignmentData, Pairs
from omnimoe.align.losses import LogitScale, gather_rows, info_nce, regression_loss
from omnimoe.align.prior import LabelPrior, fused_rows, prior_for
from omnimoe.align.schedules import DirectionSchedule
from omnimoe.config import ConfigError, check_ranges
from omnimoe.eval.metrics import recall_at_k
from omnimoe.io import write_json
from omnimoe.runtime import (
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

Method = Literal["moe-alternating", "moe-joint", "mlp-alternating", "linear"]
METHODS: tuple[str, ...] = ("linear", "mlp-alternating", "moe-joint", "moe-alternating")


@dataclass
class TrainConfig:
    """Defaults come from a sweep on the Tux Paint split (docs/results.md): small data wants a small,
    strongly regularised connector, latent mixup and early stopping."""

    method: Method = "moe-alternating"
    steps: int = 800  # direction-batches (see the module docstring)
    batch_size: int = 128
    lr: float = 3e-4
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    weight_decay_end: float = 0.5
    grad_clip: float = 1.0
    temperature: float = 0.05
    learnable_temperature: bool = False
    regression_loss: str = "smooth_l1"
    regression_weight: float = 0.5
    contrastive_weight: float = 0.5
    steps_per_direction: int = 1
    token_inputs: bool = False  # feed token states (MoE per token, masked mean) instead of pooled vectors
    schedule: str = "auto"  # auto (alternate for *-alternating, joint for moe-joint/linear), alternate, adaptive, joint
    # Latent-space augmentation (the encoders are frozen, so augment the stored vectors):
    mixup_alpha: float = 0.4  # > 0: FuseMix-style mixup, source and target mixed with the same Beta(a, a) weight
    input_noise: float = 0.0  # > 0: Gaussian noise on source latents, as a fraction of each feature's std
    # > 0: learn on top of the label prior (omnimoe.align.prior) where one applies: its cosine times this weight
    # is added to the InfoNCE logits, and to the score used for early stopping and at test
    prior_weight: float = 0.0
    eval_every: int = 25
    patience: int = 10  # evaluations without improvement before stopping
    select_on: str = (
        "mean"  # validation score for early stopping and the best checkpoint: R@1, R@5, R@10, mean (of the three)
    )
    dtype: str = "auto"
    device: str = "auto"  # auto: CUDA when available (cuda:LOCAL_RANK under torchrun), else CPU; or cpu, cuda, cuda:1
    seed: int = 0
    # connector
    hidden_size: int = 256
    contrastive_dim: int = 256
    num_experts: int = 12
    num_experts_per_tok: int = 4
    dropout: float = 0.5
    router_aux_loss_coef: float = 0.0
    linear_path: bool = False  # MoE / MLP connectors: the linear two-tower inside, the MoE as a residual from zero

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "steps": "[1, inf)",
                "batch_size": "[2, inf)",
                "lr": "(0, inf)",
                "min_lr": "[0, inf)",
                "warmup_steps": "[0, inf)",
                "weight_decay": "[0, inf)",
                "weight_decay_end": "[0, inf)",
                "grad_clip": "[0, inf)",
                "temperature": "(0, inf)",
                "regression_weight": "[0, inf)",
                "contrastive_weight": "[0, inf)",
                "steps_per_direction": "[1, inf)",
                "mixup_alpha": "[0, inf)",
                "input_noise": "[0, inf)",
                "prior_weight": "[0, inf)",
                "eval_every": "[1, inf)",
                "patience": "[1, inf)",
                "seed": "[0, inf)",
                "hidden_size": "[1, inf)",
                "contrastive_dim": "[1, inf)",
                "num_experts": "[1, inf)",
                "num_experts_per_tok": "[1, inf)",
                "dropout": "[0, 1)",
                "router_aux_loss_coef": "[0, inf)",
            },
        )
        if self.regression_weight + self.contrastive_weight <= 0:
            raise ConfigError("regression_weight + contrastive_weight must be > 0 (nothing would be learned)")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok: {self.num_experts_per_tok} is more than num_experts ({self.num_experts})"
            )


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
    if cfg.method == "linear":
        return LinearTwoTower(widths, cfg.contrastive_dim)
    return AltMoEConnector(
        ConnectorConfig(
            modalities=dict(widths),
            directions=list(directions),
            hidden_size=cfg.hidden_size,
            contrastive_dim=cfg.contrastive_dim,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            dropout=cfg.dropout,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            use_moe=cfg.method != "mlp-alternating",
            linear_path=cfg.linear_path,
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


def inputs(
    cfg: TrainConfig, data: AlignmentData, modality: str, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Source inputs of ``rows``: token states + mask for ``token_inputs`` (not for the linear two-tower, which
    projects pooled vectors), else pooled vectors."""
    if cfg.token_inputs and cfg.method != "linear":
        if modality not in data.tokens:
            raise ValueError(
                f"token_inputs: no token states for {modality!r}; load AlignmentData(..., tokens=True) from stores extracted with --tokens"
            )
        return data.source(modality, rows)
    return data.latents[modality][rows], None


def _to(
    args: tuple[torch.Tensor, torch.Tensor | None], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    return args[0].to(device), None if args[1] is None else args[1].to(device)


@torch.no_grad()
def embed_pairs(
    model: nn.Module, data: AlignmentData, direction: str, split: str, batch: int = 512, cfg: TrainConfig | None = None
) -> tuple[Pairs, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``direction``'s pairs of ``split`` through ``model``: (pairs, contrastive queries, target keys,
    regression outputs or None), on the CPU in float32. The caller puts the model in eval mode."""
    cfg = cfg or TrainConfig(method="linear" if isinstance(model, LinearTwoTower) else "moe-alternating")
    device = next(model.parameters()).device
    src, tgt = parse_direction(direction)
    pairs = data.pairs(direction, split)
    target = data.latents[tgt][pairs.tgt_rows].to(device)
    outs = [
        model(direction, *_to(inputs(cfg, data, src, pairs.src_rows[i : i + batch]), device))
        for i in range(0, len(pairs), batch)
    ]
    con = torch.cat([o.contrastive for o in outs]).float().cpu()
    keys = model.embed_target(direction, target).float().cpu()
    reg = torch.cat([o.regression for o in outs]).float().cpu() if outs[0].regression is not None else None
    return pairs, con, keys, reg


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: AlignmentData,
    directions: list[str],
    split: str,
    batch: int = 512,
    cfg: TrainConfig | None = None,
) -> list[dict[str, Any]]:
    """Recall@1/5/10 per direction on ``split``, for the contrastive head and (if any) the regression head.
    ``cfg`` says whether the model reads token states (``token_inputs``)."""
    model.eval()
    rows = []
    for d in directions:
        src, tgt = parse_direction(d)
        if not len(data.pairs(d, split)):
            continue
        pairs, con, keys, reg = embed_pairs(model, data, d, split, batch, cfg)
        rows.append(
            {"query": src, "target": tgt, "head": "contrastive", **recall_at_k(con, keys, pairs.groups, pairs.groups)}
        )
        if reg is not None:
            target = data.latents[tgt][pairs.tgt_rows]
            rows.append(
                {
                    "query": src,
                    "target": tgt,
                    "head": "regression",
                    **recall_at_k(reg, target, pairs.groups, pairs.groups),
                }
            )
    model.train()
    return rows


def mean_r1(rows: list[dict[str, Any]], head: str = "contrastive") -> float:
    vals = [r["R@1"] for r in rows if r["head"] == head]
    return sum(vals) / len(vals) if vals else 0.0


SELECT_ON = ("R@1", "R@5", "R@10", "mean")


def selection_score(rows: list[dict[str, Any]], select_on: str = "R@1") -> float:
    """Mean over directions of the recall a run is judged by (``select_on``: R@1, R@5, R@10, or ``mean`` of
    the three), on the score it is judged by: ``contrastive+prior`` where a direction has it (a connector
    trained on top of the prior), else ``contrastive``."""
    if select_on not in SELECT_ON:
        raise ValueError(f"select_on must be one of {SELECT_ON}, got {select_on!r}")
    keys = ("R@1", "R@5", "R@10") if select_on == "mean" else (select_on,)
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        key = (r["query"], r["target"])
        if r["head"] == "contrastive+prior" or (r["head"] == "contrastive" and key not in best):
            best[key] = sum(r[k] for k in keys) / len(keys)
    return sum(best.values()) / len(best) if best else 0.0


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
    out = Path(out)
    selection_score([], cfg.select_on)  # a bad select_on fails now, not at the first evaluation
    out.mkdir(parents=True, exist_ok=True)
    rank, world = init_distributed()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, data.widths, directions).to(device)
    scale = LogitScale(cfg.temperature, cfg.learnable_temperature).to(device)
    step_module: nn.Module = PairStep(model, scale)
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=ids, find_unused_parameters=True)
        torch.manual_seed(cfg.seed + 7919 * rank)  # different dropout masks per rank
    params = list(model.parameters()) + list(scale.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = schedule_for(cfg, directions)
    priors = priors if cfg.prior_weight > 0 else None
    if cfg.prior_weight > 0 and not any(prior_for(priors, d) for d in directions):
        warnings.warn(
            f"prior_weight={cfg.prior_weight} but no label prior applies to {directions}: training without it",
            stacklevel=2,
        )
    device_priors = {m: p.to(device) for m, p in (priors or {}).items()}
    train_pairs = {d: data.pairs(d, "train") for d in directions}
    for d, p in train_pairs.items():
        if len(p) < 2:
            raise ValueError(f"direction {d}: {len(p)} training pairs; need at least 2")
    dtype = autocast_dtype(cfg.dtype, device)
    # Noise scale from the training rows only (no statistics of test inputs leak into training).
    train_rows: dict[str, list[torch.Tensor]] = {}
    for d, p in train_pairs.items():
        src, tgt = parse_direction(d)
        train_rows.setdefault(src, []).append(p.src_rows)
        train_rows.setdefault(tgt, []).append(p.tgt_rows)
    feature_std = {m: data.latents[m][torch.cat(r).unique()].std(0) for m, r in train_rows.items()}
    state_path = out / "state.pt"
    if rank == 0:
        remove_temporaries(out)  # of a run killed mid-write
    step, best, best_step, history, bad_evals = 0, -1.0, -1, [], 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False, map_location=device)
        if _resumable(state["config"]) != _resumable(dataclasses.asdict(cfg)):
            raise ValueError(f"{state_path} was written with another config; use a new output folder")
        model.load_state_dict(state["model"])
        scale.load_state_dict(state["scale"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        restore_rng(state, device)
        step, best, best_step, history, bad_evals = (
            state["step"],
            state["best"],
            state["best_step"],
            state["history"],
            state["bad_evals"],
        )
    model.train()
    writer = tensorboard(out / "tb", step) if rank == 0 else None
    pending: dict[str, list[float]] = {}
    bar = tqdm(
        total=cfg.steps, initial=step, desc=f"train {cfg.method}", disable=not progress or rank != 0, dynamic_ncols=True
    )
    stopped_early = bad_evals >= cfg.patience  # a finished run that stopped early stays stopped when called again
    # ``step`` counts direction-batches (one direction's batch through the model): an alternating optimizer
    # step advances it by 1, a joint one by the number of directions. Budgets (steps, warm-up, evaluation)
    # are therefore equal in data and compute across schedules.
    while step < cfg.steps and not stopped_early:
        if stop_at_step is not None and step >= stop_at_step:
            bar.close()
            return {"interrupted_at": step}
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = lr_at(cfg, step), weight_decay_at(cfg, step)
        batch_gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)  # step and rank only
        loss = torch.zeros((), device=device)
        logs: dict[str, float] = {}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            for d in schedule.directions_for(step):
                src, tgt = parse_direction(d)
                pairs = train_pairs[d]
                pick = torch.randint(len(pairs), (min(cfg.batch_size, len(pairs)),), generator=batch_gen)
                source, mask = inputs(cfg, data, src, pairs.src_rows[pick])
                target = data.latents[tgt][pairs.tgt_rows[pick]]
                pooled = data.latents[src][pairs.src_rows[pick]] if mask is not None else None  # for the prior
                source, target, mask, pooled = augment(cfg, source, target, feature_std[src], batch_gen, mask, pooled)
                source, target = source.to(device, non_blocking=True), target.to(device, non_blocking=True)
                pooled = (
                    source if pooled is None else pooled.to(device, non_blocking=True)
                )  # on the device, like what it is gathered with
                mask = None if mask is None else mask.to(device)
                o, keys, logit_scale = step_module(d, source, target, mask)
                # Negatives from every rank: the ranks' mean loss is the loss of one big batch.
                keys_all, offset = gather_rows(keys)
                queries_all, _ = gather_rows(o.contrastive)
                prior_qk = prior_kq = None
                if (prior := prior_for(device_priors, d)) is not None:  # the fixed prior scores of this batch
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
                loss = loss + part
                logs[d] = part.item()
        require_finite(loss, f"step {step} (directions: " + ", ".join(f"{d} {v:.4g}" for d, v in logs.items()) + ")")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        previous, step = step, step + len(logs)
        for d, v in logs.items():  # per-direction means since the last log point (alternation visits each in turn)
            pending.setdefault(d, []).append(v)
        if writer is not None and step // 10 > previous // 10:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", lr_at(cfg, previous), step)
            for d, vs in pending.items():
                writer.add_scalar(f"train/loss/{d}", sum(vs) / len(vs), step)
            pending.clear()
        bar.update(len(logs))
        bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{max(best, 0):.3f}")
        if step // cfg.eval_every > previous // cfg.eval_every or step >= cfg.steps:
            rows = evaluate(model, data, directions, "val", cfg=cfg)
            if priors:
                rows += fused_rows(model, data, directions, priors, cfg, split="val")[0]
            val = selection_score(rows, cfg.select_on)
            history.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "val_score": val,
                    "val_mean_r1": selection_score(rows),
                    "lr": lr_at(cfg, step - 1),
                    "losses": logs,
                }
            )
            schedule.update({f"{r['query']}->{r['target']}": r["R@1"] for r in rows if r["head"] == "contrastive"})
            if writer is not None:
                writer.add_scalar("val/score", val, step)
                writer.add_scalar("val/mean_R@1", history[-1]["val_mean_r1"], step)
                for r in rows:
                    writer.add_scalar(f"val/{r['head']}/{r['query']}->{r['target']}/R@1", r["R@1"], step)
                writer.flush()
            # Every rank evaluates the same (synchronised) weights on the same data, so all reach the same
            # early-stopping decision without talking; rank 0 alone writes.
            if val > best:
                best, best_step, bad_evals = val, step, 0
                if rank == 0:
                    save_checkpoint(
                        out / "best.pt", {"model": model.state_dict(), "scale": scale.state_dict(), "step": step}
                    )
            else:
                bad_evals += 1
                stopped_early = bad_evals >= cfg.patience
            if rank == 0:
                save_checkpoint(
                    state_path,
                    {
                        "config": dataclasses.asdict(cfg),
                        "model": model.state_dict(),
                        "scale": scale.state_dict(),
                        "optimizer": opt.state_dict(),
                        "schedule": schedule.state_dict(),
                        **rng_state(device),
                        "step": step,
                        "best": best,
                        "best_step": best_step,
                        "history": history,
                        "bad_evals": bad_evals,
                    },
                )
            if world > 1:
                dist.barrier()
    bar.close()
    if writer is not None:
        writer.close()
    if world > 1:
        del step_module  # release DDP's hold on the process group before the caller tears it down
        dist.barrier()
    result = {"best_step": best_step, "best_val": best, "history": history, "stopped_early": stopped_early}
    if rank == 0:
        write_json(out / "train.json", result)
    return result


def _resumable(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys a resumed run must share with the one that wrote the checkpoint (not the device)."""
    return {k: v for k, v in config.items() if k != "device"}


def load_best(cfg: TrainConfig, data: AlignmentData, directions: list[str], out: str | Path) -> nn.Module:
    """The best weights, on the CPU."""
    model = build_model(cfg, data.widths, directions)
    model.load_state_dict(torch.load(Path(out) / "best.pt", weights_only=False, map_location="cpu")["model"])
    return model.eval()
