"""Plots a person would rather look at than tables: recall per method and direction, training curves,
expert load per direction. Matplotlib with the Agg backend (no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_recall(
    summary: list[dict[str, Any]], path: str | Path, head: str = "contrastive", metric: str = "R@1"
) -> Path:
    """Grouped bars: one group per direction, one bar per method (mean over seeds, spread as error bar)."""
    plt = _plt()
    rows = [s for s in summary if s["head"] == head]
    directions = list(dict.fromkeys(f"{s['query']}->{s['target']}" for s in rows))
    methods = list(dict.fromkeys(s["method"] for s in rows))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(directions) + 2), 4))
    for i, m in enumerate(methods):
        vals = {f"{s['query']}->{s['target']}": s for s in rows if s["method"] == m}
        xs = [j + i * width for j in range(len(directions))]
        ax.bar(
            xs,
            [vals[d][metric] if d in vals else 0 for d in directions],
            width,
            yerr=[vals[d][metric + "_std"] if d in vals else 0 for d in directions],
            capsize=3,
            label=m,
        )
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(directions))], directions)
    ax.set(ylabel=f"test {metric} ({head} head)", title=f"Retrieval {metric}: mean ± spread over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_training_curves(curves: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """Validation mean R@1 and training loss against step, one line per method."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method, hist in curves.items():
        steps = [h["step"] for h in hist]
        a.plot(steps, [h["val_mean_r1"] for h in hist], label=method)
        b.plot(steps, [h["loss"] for h in hist], label=method)
    a.set(xlabel="step", ylabel="validation mean R@1", title="Validation recall")
    b.set(xlabel="step", ylabel="training loss (last batch)", title="Training loss", yscale="log")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_expert_load(load: dict[str, list[float]], path: str | Path, title: str = "Expert load per direction") -> Path:
    """Heatmap: rows = directions, columns = experts, cell = share of that direction's assignments."""
    plt = _plt()
    directions = list(load)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(load[directions[0]]) + 3), 0.6 * len(directions) + 1.8))
    im = ax.imshow([load[d] for d in directions], cmap="magma", aspect="auto")
    ax.set_yticks(range(len(directions)), directions)
    ax.set(xlabel="expert", title=title)
    fig.colorbar(im, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
