"""Probe ceilings for the closed Uni-MoE tasks: how well the frozen encoder's pooled features alone answer a
question, with a linear read-out trained on the train split and scored on the same held-out records.

* ``image-category`` (and any closed task whose answer does not depend on the question): multinomial
  logistic regression on the pooled encoder features of the record's media;
* ``image-yesno`` ("Is this <phrase>?"): logistic regression on a low-rank bilinear score between the pooled
  media features and the mean of the LM's frozen input embeddings of the asked phrase, the only frozen
  features that name the phrase (test phrases never occur in training).

Features are standardised on the train split; the L2 weight is chosen on a held-out fifth of the train
records (grouped by media item), then the probe is refitted on all train records. Everything is seeded.
A model that reads the same features through a connector should get near these numbers.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def _split(groups: list[str], seed: int) -> tuple[list[int], list[int]]:
    names = sorted(set(groups))
    random.Random(f"{seed}:probe").shuffle(names)
    held = set(names[: max(1, len(names) // 5)])
    return [i for i, g in enumerate(groups) if g not in held], [i for i, g in enumerate(groups) if g in held]


def _fit(
    make: Callable[[], torch.nn.Module], x: tuple[torch.Tensor, ...], y: torch.Tensor, wd: float, steps: int, seed: int
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = make()
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(*x), y) + wd * sum(
            (p**2).sum() for n, p in model.named_parameters() if "bias" not in n
        )
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu, sd = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(t - mu) / sd for t in (train, *others)]


class _Linear(torch.nn.Module):
    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


class _Bilinear(torch.nn.Module):
    """Logits (no, yes) = (0, <A x, B t> + w.x + v.t + b): rank-``rank`` bilinear logistic regression."""

    def __init__(self, dx: int, dt: int, rank: int) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(dx, rank, bias=False), torch.nn.Linear(dt, rank, bias=False)
        self.lin = torch.nn.Linear(dx + dt, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        yes = (self.a(x) * self.b(t)).sum(-1, keepdim=True) + self.lin(torch.cat([x, t], -1))
        return torch.cat([torch.zeros_like(yes), yes], -1)


def _choose_and_fit(
    make: Callable[[], torch.nn.Module],
    xs_train: tuple[torch.Tensor, ...],
    y: torch.Tensor,
    groups: list[str],
    seed: int,
    steps: int,
) -> tuple[torch.nn.Module, float]:
    fit_i, val_i = _split(groups, seed)
    best, best_acc = WEIGHT_DECAYS[0], -1.0
    for wd in WEIGHT_DECAYS:
        m = _fit(make, tuple(x[fit_i] for x in xs_train), y[fit_i], wd, steps, seed)
        with torch.no_grad():
            acc = float((m(*(x[val_i] for x in xs_train)).argmax(-1) == y[val_i]).float().mean())
        if acc > best_acc:
            best, best_acc = wd, acc
    return _fit(make, xs_train, y, best, steps, seed), best


def _accuracy(pred: list[Any], truth: list[Any]) -> float:
    return sum(p == t for p, t in zip(pred, truth)) / len(truth)


def category_probe(
    train_x: torch.Tensor,
    train_y: list[str],
    test_x: torch.Tensor,
    test_y: list[str],
    groups: list[str],
    seed: int = 0,
    steps: int = 200,
    control_x: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Multinomial logistic regression: accuracy on the test rows, the chosen L2 weight, n; with
    ``control_x`` (e.g. the test rows' swapped media) also ``control``, the same probe's accuracy on those."""
    classes = sorted(set(train_y))
    idx = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([idx[c] for c in train_y])
    xtr, xte, *xc = _standardise(train_x.float(), test_x.float(), *([] if control_x is None else [control_x.float()]))
    model, wd = _choose_and_fit(lambda: _Linear(xtr.shape[1], len(classes)), (xtr,), y, groups, seed, steps)
    out = {"n": len(test_y), "weight_decay": wd}
    with torch.no_grad():
        for name, x in (("score", xte), *(("control", c) for c in xc)):
            out[name] = _accuracy([classes[i] for i in model(x).argmax(-1).tolist()], test_y)
    return out


def yesno_probe(
    train_x: torch.Tensor,
    train_t: torch.Tensor,
    train_y: list[bool],
    test_x: torch.Tensor,
    test_t: torch.Tensor,
    test_y: list[bool],
    groups: list[str],
    seed: int = 0,
    rank: int = 32,
    steps: int = 200,
    control_x: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Bilinear logistic regression between media features ``x`` and phrase features ``t``: test accuracy
    (and ``control``: the accuracy with ``control_x`` in place of the test media, same phrases)."""
    xtr, xte, *xc = _standardise(train_x.float(), test_x.float(), *([] if control_x is None else [control_x.float()]))
    ttr, tte = _standardise(train_t.float(), test_t.float())
    y = torch.tensor([int(v) for v in train_y])
    model, wd = _choose_and_fit(lambda: _Bilinear(xtr.shape[1], ttr.shape[1], rank), (xtr, ttr), y, groups, seed, steps)
    out = {"n": len(test_y), "weight_decay": wd}
    with torch.no_grad():
        for name, x in (("score", xte), *(("control", c) for c in xc)):
            out[name] = _accuracy([bool(p) for p in model(x, tte).argmax(-1).tolist()], test_y)
    return out
