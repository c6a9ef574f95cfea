"""Expert parallelism, applied from outside the model.

:func:`parallelize_experts` replaces the ``experts`` of every :class:`MoELayer` in a model by an
:class:`ExpertParallelExperts` holding only this rank's contiguous block of experts (rank r of W holds
experts ``[r*E/W, (r+1)*E/W)``). Each rank routes its own tokens; the forward pass is the standard
MegaBlocks / torchtitan pattern:

1. tokens arrive sorted by global expert, so the rows bound for each rank are contiguous;
2. all-to-all of the per-expert counts, then an uneven all-to-all of the token rows;
3. the received rows (ordered by source rank, then local expert) are regrouped by local expert and run
   through the local experts (grouped_mm or loop);
4. the inverse regrouping and the reverse all-to-all bring the results home.

Both all-to-alls are autograd-aware, so backward sends gradients along the reverse routes and each rank's
expert gradients sum the contributions of every rank's tokens. Router, shared experts and everything else stay
replicated: average their gradients over the data-parallel group (DDP, with the expert parameters excluded by
:func:`expert_parameter_names`).

``state_dict()`` is independent of the world size: it all-gathers the shards into full ``[E, ...]`` tensors
(a collective: call it on every rank), and ``load_state_dict()`` takes full tensors and keeps this rank's
slice. A checkpoint saved at 2 ranks therefore loads at 1 or 4, and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from omnimoe.moe.experts import Experts, compute_dtype
from omnimoe.moe.layer import moe_layers


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows whose backward is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(Experts):
    """This rank's shard of an :class:`Experts` module; ``forward`` takes the same arguments as the full one."""

    def __init__(self, full: Experts, group: dist.ProcessGroup | None = None) -> None:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        if full.num_experts % world:
            raise ValueError(
                f"num_experts={full.num_experts} is not divisible by the expert-parallel world size {world}"
            )
        local = full.num_experts // world
        super().__init__(
            local,
            full.hidden_size,
            full.intermediate_size,
            full.expert_type,
            full.hidden_act,
            full.b_in is not None,
            full.dropout,
            full.backend,
        )
        self.group, self.world, self.rank = group, world, rank
        self.global_num_experts = full.num_experts
        self.first_expert = rank * local
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                p.copy_(getattr(full, name)[self.first_expert : self.first_expert + local])
        self.register_state_dict_post_hook(_gather_full_state)
        self.register_load_state_dict_pre_hook(_slice_full_state)

    def extra_repr(self) -> str:
        return (
            f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of {self.global_num_experts}, "
            + super().extra_repr()
        )

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.global_num_experts:
            raise ValueError(f"expected {self.global_num_experts} per-expert counts, got {len(counts)}")
        local, world = self.num_experts, self.world
        x = x.to(compute_dtype(x))  # communicate in the dtype the experts compute in
        # Counts live on the tokens' device: NCCL only moves CUDA tensors.
        send_counts = torch.tensor(counts, dtype=torch.int64, device=x.device)
        recv_counts = torch.empty_like(send_counts)  # [src rank, local expert] -> rows
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send_splits = send_counts.view(world, local).sum(1).tolist()
        recv_matrix = recv_counts.view(world, local)
        recv_splits = recv_matrix.sum(1).tolist()

        received = all_to_all(x, recv_splits, send_splits, self.group)
        # Regroup rows from (source rank, local expert) order to local-expert order.
        row_expert = (
            torch.arange(local, device=x.device)
            .repeat(world)
            .repeat_interleave(recv_counts, output_size=received.shape[0])
        )
        perm = torch.argsort(row_expert, stable=True)
        out_local = super().forward(received[perm], recv_matrix.sum(0).tolist())
        back = torch.empty_like(perm)
        back[perm] = torch.arange(perm.numel(), device=perm.device)
        return all_to_all(out_local[back], send_splits, recv_splits, self.group)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the dense backend does not run expert-parallel; use grouped_mm or loop")


def _gather_full_state(module: ExpertParallelExperts, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, _ in module.named_parameters(recurse=False):
        key = prefix + name
        shard = state_dict[key].contiguous()
        parts = [torch.empty_like(shard) for _ in range(module.world)]
        dist.all_gather(parts, shard, group=module.group)
        state_dict[key] = torch.cat(parts)


def _slice_full_state(module: ExpertParallelExperts, state_dict: dict, prefix: str, *args) -> None:
    for name, p in module.named_parameters(recurse=False):
        key = prefix + name
        if key in state_dict and state_dict[key].shape[0] == module.global_num_experts:
            state_dict[key] = state_dict[key][module.first_expert : module.first_expert + module.num_experts]


def parallelize_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the experts of every MoE layer in ``model`` over ``group`` (in place; returns ``model``).

    Every rank must hold the same full weights beforehand (same seed, or the same checkpoint loaded).
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "parallelize_experts needs torch.distributed to be initialised (torchrun / init_process_group)"
        )
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoELayer to parallelise")
    for layer in layers:
        if layer.config.backend == "dense":
            raise ValueError("the dense backend does not run expert-parallel; use grouped_mm, loop or auto")
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts(layer.experts, group)
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the sharded expert parameters (for DDP to ignore)."""
    return [
        f"{mod_name}.{p_name}" if mod_name else p_name
        for mod_name, mod in model.named_modules()
        if isinstance(mod, ExpertParallelExperts)
        for p_name, _ in mod.named_parameters(recurse=False)
    ]


def data_parallel(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """Wrap an expert-parallel model in DDP that averages every parameter except the sharded experts.

    Expert gradients already sum every rank's tokens (through the all-to-all), so DDP leaves them alone and
    they are divided by the world size instead: with each rank's loss a mean over an equal-sized local batch,
    every parameter then gets the gradient of the mean loss over all ranks' batches, as one process would.
    """
    names = expert_parameter_names(model)
    world = dist.get_world_size(ddp_kwargs.get("process_group"))
    params = dict(model.named_parameters())
    for name in names:
        if params[name].requires_grad:  # frozen experts (e.g. LoRA on top of them) have no gradient to scale
            params[name].register_hook(lambda g: g / world)
    # Each rank counts its own expert load for aux-loss-free balancing (summed at update time): DDP must not
    # overwrite those counters with rank 0's when it broadcasts buffers.
    counters = [n for n, _ in model.named_buffers() if n.endswith("_load_since_update")]
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))  # e.g. per-rank expert adapters
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, already + names + counters)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
