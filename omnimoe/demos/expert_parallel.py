"""Expert-parallel training under torchrun: experts sharded over ranks, everything else data-parallel.

    torchrun --nproc-per-node 2 -m omnimoe.demos.expert_parallel --out runs/ep

Each rank draws its own batches of the clustered task from :mod:`omnimoe.demos.moe_engine`; the MoE's
experts are split over the ranks (:func:`parallelize_experts`) and the rest is wrapped in DDP
(:func:`data_parallel`). Rank 0 writes a checkpoint whose tensors have the full ``[num_experts, ...]``
shapes, so it loads at any world size, including in one plain process. Uses gloo on CPU, NCCL on GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist

from omnimoe.demos.moe_engine import ClusterTask, EngineDemoConfig, Regressor
from omnimoe.io import save_pretrained, write_json
from omnimoe.moe import MoEConfig, MoELayer
from omnimoe.moe.parallel import data_parallel, parallelize_experts
from omnimoe.runtime import finish_distributed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/expert-parallel"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--num-experts", type=int, default=8)
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    cfg = EngineDemoConfig(num_experts=args.num_experts, steps=args.steps)
    task = ClusterTask(cfg)
    torch.manual_seed(0)  # identical initial weights on every rank
    moe = MoELayer(
        MoEConfig(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.expert_size,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
    )
    model = parallelize_experts(Regressor(cfg.hidden_size, moe)).to(device)
    ddp = data_parallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    losses = []
    for step in range(args.steps):
        x, y, _ = task.sample(cfg.batch_tokens, g)
        pred, router_loss, _ = ddp(x.to(device))
        mse = (pred - y.to(device)).pow(2).mean()
        (mse + router_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = mse.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        if rank == 0 and (step % 50 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  mse {losses[-1]:.4f}", flush=True)

    state = model.ffn.state_dict()  # collective: every rank gathers the full expert tensors
    if rank == 0:
        save_pretrained(args.out / "moe_layer", MoELayer.model_type, dataclasses.asdict(moe.config), state)
        write_json(
            args.out / "summary.json",
            {
                "world_size": world,
                "first_mse": losses[0],
                "last_mse": losses[-1],
                "backend": backend,
                "experts_per_rank": cfg.num_experts // world,
            },
        )
        print(f"saved {args.out / 'moe_layer'} (loads at any world size)")
    # Shut down in step: DDP's reducer holds the process group, and a rank that tears the group down while
    # another is still saving can abort both.
    del ddp
    finish_distributed()


if __name__ == "__main__":
    main()
