"""End-to-end example of the MoE engine on a task where experts should help.

Tokens come from ``num_clusters`` clusters; each cluster has its own random "teacher" network mapping the
token to its target. A dense MLP must fit every teacher with one set of weights; an MoE with the same
active FLOPs per token (``num_experts_per_tok * expert width == dense width``) can give each teacher its own
expert. The demo trains both, then shows sparse upcycling (an MoE initialised from the trained dense MLP,
fine-tuned), checks ``save_pretrained`` / ``from_pretrained``, and writes ``results.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from omnimoe.io import write_json
from omnimoe.moe import MoEConfig, MoELayer
from omnimoe.moe.upcycle import upcycle_from_dense


@dataclass
class EngineDemoConfig:
    hidden_size: int = 64
    expert_size: int = 128
    num_experts: int = 8
    num_experts_per_tok: int = 1
    num_clusters: int = 8
    steps: int = 600
    upcycle_steps: int = 300
    batch_tokens: int = 512
    lr: float = 3e-3
    router_aux_loss_coef: float = 0.01
    test_tokens: int = 4096
    seed: int = 0


class ClusterTask:
    """Clustered inputs, one random tanh teacher per cluster."""

    def __init__(self, cfg: EngineDemoConfig) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        h = cfg.hidden_size
        self.cfg = cfg
        self.centers = torch.randn(cfg.num_clusters, h, generator=g) * 2.0
        self.w1 = torch.randn(cfg.num_clusters, h, h, generator=g) / h**0.5
        self.w2 = torch.randn(cfg.num_clusters, h, h, generator=g) / h**0.5

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = torch.randint(self.cfg.num_clusters, (n,), generator=g)
        x = self.centers[c] + torch.randn(n, self.cfg.hidden_size, generator=g)
        y = torch.einsum("nh,nhk->nk", torch.tanh(torch.einsum("nh,nhk->nk", x, self.w1[c]) * 2), self.w2[c])
        return x, y, c


class SwiGLUMLP(nn.Module):
    """SwiGLU MLP with Llama names (so it can be upcycled)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Regressor(nn.Module):
    """x -> norm -> FFN (dense or MoE) -> prediction. Returns (prediction, router loss, MoE output or None)."""

    def __init__(self, hidden: int, ffn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.ffn = ffn

    def forward(self, x: torch.Tensor):
        h = self.norm(x)
        if isinstance(self.ffn, MoELayer):
            out = self.ffn(h)
            return out.hidden_states, out.router_loss, out
        return self.ffn(h), x.new_zeros(()), None


def _train(model: Regressor, task: ClusterTask, steps: int, cfg: EngineDemoConfig, name: str, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    curve = []
    model.train()
    for _ in tqdm(range(steps), desc=f"train {name}", leave=False):
        x, y, _ = task.sample(cfg.batch_tokens, g)
        pred, router_loss, _ = model(x)
        mse = (pred - y).pow(2).mean()
        (mse + router_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        curve.append(mse.item())
    return curve


@torch.no_grad()
def _evaluate(model: Regressor, x: torch.Tensor, y: torch.Tensor, clusters: torch.Tensor, num_experts: int) -> dict:
    model.eval()
    pred, _, out = model(x)
    result = {"test_mse": (pred - y).pow(2).mean().item()}
    if out is not None:
        top1 = out.router_logits[:, :num_experts].argmax(-1)
        n_clusters = int(clusters.max()) + 1
        table = torch.zeros(n_clusters, num_experts)
        table.index_put_((clusters, top1), torch.ones(len(top1)), accumulate=True)
        # purity: share of each cluster's tokens whose first choice is that cluster's most used expert
        result["routing_purity"] = (table.max(1).values.sum() / table.sum()).item()
        result["routing_table"] = table.tolist()
        result["tokens_per_expert"] = out.tokens_per_expert.tolist()
    return result


def _plot(out_dir: Path, curves: dict[str, list[float]], table: list[list[float]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        k = max(1, len(curve) // 100)
        smooth = [sum(curve[i : i + k]) / len(curve[i : i + k]) for i in range(0, len(curve), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth, label=name)
    ax.set(yscale="log", xlabel="step", ylabel="train MSE", title="Dense MLP vs MoE at equal active FLOPs")
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "training_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    im = ax.imshow(table, cmap="viridis", aspect="auto")
    ax.set(xlabel="expert (first choice)", ylabel="cluster (teacher)", title="Which expert each cluster is routed to")
    fig.colorbar(im, ax=ax, label="test tokens")
    fig.tight_layout()
    paths.append(out_dir / "routing.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_engine_demo(cfg: EngineDemoConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    task = ClusterTask(cfg)
    x_test, y_test, c_test = task.sample(cfg.test_tokens, torch.Generator().manual_seed(cfg.seed + 1))
    active = cfg.num_experts_per_tok * cfg.expert_size
    moe_cfg = MoEConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.expert_size,
        num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.num_experts_per_tok,
        router_aux_loss_coef=cfg.router_aux_loss_coef,
    )
    rows, curves = [], {}

    def record(name: str, model: Regressor, curve: list[float], seconds: float) -> dict:
        row = {"model": name, **_evaluate(model, x_test, y_test, c_test, cfg.num_experts), "train_s": round(seconds, 2)}
        row["params"] = sum(p.numel() for p in model.parameters())
        rows.append(row)
        curves[name] = curve
        return row

    torch.manual_seed(cfg.seed)
    dense = Regressor(cfg.hidden_size, SwiGLUMLP(cfg.hidden_size, active))
    t = time.perf_counter()
    record(
        f"dense MLP (width {active})",
        dense,
        _train(dense, task, cfg.steps, cfg, "dense", cfg.seed + 2),
        time.perf_counter() - t,
    )

    torch.manual_seed(cfg.seed)
    moe = Regressor(cfg.hidden_size, MoELayer(moe_cfg))
    t = time.perf_counter()
    moe_row = record(
        f"MoE {cfg.num_experts}x{cfg.expert_size}, top-{cfg.num_experts_per_tok}",
        moe,
        _train(moe, task, cfg.steps, cfg, "moe", cfg.seed + 2),
        time.perf_counter() - t,
    )

    # Sparse upcycling: copy the trained dense FFN into every expert (widths must match: one expert = dense).
    up_cfg = dataclasses.replace(moe_cfg, intermediate_size=active, num_experts_per_tok=1)
    upcycled = Regressor(cfg.hidden_size, upcycle_from_dense(dense.ffn, up_cfg, noise_std=0.01))
    upcycled.norm.load_state_dict(dense.norm.state_dict())
    start = _evaluate(upcycled, x_test, y_test, c_test, cfg.num_experts)["test_mse"]
    t = time.perf_counter()
    up_row = record(
        f"MoE upcycled from the dense MLP (+{cfg.upcycle_steps} steps)",
        upcycled,
        _train(upcycled, task, cfg.upcycle_steps, cfg, "upcycled", cfg.seed + 3),
        time.perf_counter() - t,
    )
    up_row["test_mse_at_upcycling"] = start

    # Persistence: the trained MoE layer survives save_pretrained / from_pretrained exactly.
    moe.ffn.save_pretrained(out_dir / "moe_layer")
    reloaded = MoELayer.from_pretrained(out_dir / "moe_layer").eval()
    moe.eval()
    with torch.no_grad():
        h = moe.norm(x_test)
        same = torch.equal(reloaded(h).hidden_states, moe.ffn(h).hidden_states)
    if not same:
        raise RuntimeError("the reloaded MoE layer does not reproduce the trained one")

    plots = _plot(out_dir, curves, moe_row["routing_table"])
    result = {
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "reload_identical": same,
        "plots": [p.name for p in plots],
    }
    write_json(out_dir / "results.json", result)
    return result


def format_table(result: dict) -> str:
    lines = [f"{'model':<52} {'test MSE':>10} {'purity':>7} {'params':>8} {'train s':>8}", "-" * 89]
    for r in result["rows"]:
        purity = f"{r['routing_purity']:.2f}" if "routing_purity" in r else "-"
        lines.append(f"{r['model']:<52} {r['test_mse']:>10.4f} {purity:>7} {r['params']:>8} {r['train_s']:>8.1f}")
    return "\n".join(lines)
