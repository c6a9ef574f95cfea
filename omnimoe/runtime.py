"""What every job that trains or extracts shares at run time: the process group under torchrun, the device
and autocast dtype, the optimiser and the learning-rate schedule, checkpoints with their RNG state, the
checks that stop a step before a bad value is kept, the TensorBoard writer, and the tidying of a run folder
that a killed run left behind.

One rule for the process group, whoever opens it first (extraction, alignment or a Uni-MoE stage): gloo for
CPU tensors and, where CUDA is present, NCCL for CUDA tensors (``"cpu:gloo,cuda:nccl"``), with one timeout
(``OMNIMOE_DIST_TIMEOUT_MIN``, default 24 hours: ranks of a big extraction can finish their shares far apart).

A NaN or infinite loss is never backpropagated: the step raises :class:`NonFiniteLoss` naming where it
happened, so the weights, the checkpoints and the results on disk stay those of the last good step.
"""

from __future__ import annotations

import gc
import math
import os
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: this module binds ``group.WORLD`` as a default argument
# when it is first imported, and torch imports it late (with the optimisers). Imported after the group is open,
# it would keep the group alive past ``destroy_process_group``; the gloo threads then outlive ``main`` and may
# free a finished collective's tensors while the interpreter shuts down, which aborts the process (SIGABRT,
# "terminate called without an active exception"). See :func:`finish_distributed`.
if dist.is_available():
    import torch.distributed.nn  # noqa: F401


def init_distributed() -> tuple[int, int]:
    """``(rank, world)``; under torchrun (``WORLD_SIZE`` > 1) the process group is opened on first call.
    ``OMNIMOE_DISTRIBUTED=1`` opens it for a single rank too (torchrun with one process: to check the
    backends, e.g. NCCL on a machine with one GPU)."""
    wanted = int(os.environ.get("WORLD_SIZE", "1")) > 1 or os.environ.get("OMNIMOE_DISTRIBUTED") == "1"
    if wanted and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "cpu:gloo,cuda:nccl"
        dist.init_process_group(
            backend, timeout=timedelta(minutes=float(os.environ.get("OMNIMOE_DIST_TIMEOUT_MIN", 24 * 60)))
        )
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank0() -> bool:
    """True outside torchrun, and on rank 0 under it: the process that writes shared files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Under torchrun: wait until every rank is here (rank 0 has written what the others read next)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish_distributed() -> None:
    """Under torchrun: wait for every rank, then shut the process group down in step.

    The group's worker threads are joined here, while the interpreter is whole, so nothing of the group is
    left to run at exit (:func:`process_group_threads` lists any that are)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()  # objects that hold the group only through a reference cycle let go of it first
        dist.destroy_process_group()
        if left := process_group_threads():
            # Something still holds the group: let its threads release their last collectives while the
            # interpreter can still take them back.
            time.sleep(0.5)
            warnings.warn(
                f"the process group outlived destroy_process_group ({len(left)} gloo threads left); if the process "
                "aborts at exit, open the group after importing omnimoe.runtime",
                RuntimeWarning,
                stacklevel=2,
            )


def process_group_threads() -> list[str]:
    """Names of this process's threads that belong to a gloo process group (Linux; empty elsewhere): after
    :func:`finish_distributed` there should be none."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended while we looked
            continue
    return sorted(n for n in names if n.startswith(("pt_gloo", "gloo_")))


def resolve_device(option: str) -> torch.device:
    """``auto``: CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU; or a device name, refused
    when it names CUDA on a machine without it."""
    if option == "auto":
        return (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(option)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {option!r}: CUDA is not available on this machine")
    return device


def warmup_cosine(step: int, steps: int, warmup: int, peak: float, floor: float) -> float:
    """The learning rate (or its multiplier) at ``step`` of ``steps``: linear warm-up to ``peak`` over ``warmup``
    steps, then cosine decay to ``floor`` at the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def fast_bf16_available() -> bool:
    """bf16 matmul is fast on CPUs with AMX or AVX512-BF16; elsewhere it can be slower than fp32."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX512", "AMX") and "AMX" not in cap:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def autocast_dtype(option: str, device: torch.device | None = None) -> torch.dtype:
    """``float32``, ``bfloat16``, or ``auto``: bf16 on CUDA and on CPUs where it is fast, else fp32."""
    if option == "float32":
        return torch.float32
    if option == "bfloat16":
        return torch.bfloat16
    if option != "auto":
        raise ValueError(f"dtype {option!r}: choose auto, float32 or bfloat16")
    return torch.bfloat16 if (device is not None and device.type == "cuda") or fast_bf16_available() else torch.float32


def adamw(
    params: Any, lr: float, weight_decay: float, device: torch.device, fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over ``params`` (tensors or param groups). ``fused``: one kernel for every tensor, the default on
    CPU and CUDA: on large tensors it is several times faster (a Uni-MoE stage-3 step's update, 254 -> 31 ms,
    benchmarks/mllm.py). ``fused=False``: the for-each implementation; it differs from the fused one in the
    last bits (2e-7 after 20 steps), so a recipe whose seeded results are published keeps the one it had.
    Parameters stored in bf16 or fp16 (pure-bf16 experts) get float32 masters (:class:`MasterAdamW`)."""
    if fused is None:
        fused = device.type in ("cpu", "cuda")
    groups = _param_groups(params)
    if any(p.dtype in (torch.bfloat16, torch.float16) for g in groups for p in g["params"]):
        return MasterAdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _param_groups(params: Any) -> list[dict[str, Any]]:
    params = list(params)
    if params and isinstance(params[0], dict):
        return [{**g, "params": list(g["params"])} for g in params]
    return [{"params": params}]


class MasterAdamW(torch.optim.AdamW):
    """AdamW for parameters stored in a low precision (pure-bf16 expert weights): each such parameter has a
    float32 master copy that the optimizer updates (its moments in float32 too); after every step the master
    is rounded back into the parameter. bf16 alone would lose most updates: at lr 1e-4 a weight of 1 moves by
    less than its own rounding step (2^-8). The masters are part of ``state_dict``, so a resumed run
    continues from the same float32 weights."""

    def __init__(self, params: Any, **kwargs: Any) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (low-precision parameter, float32 master)
        groups = []
        for group in _param_groups(params):
            own = []
            for p in group["params"]:
                if p.dtype in (torch.bfloat16, torch.float16):
                    master = p.detach().float().requires_grad_(p.requires_grad)
                    self.pairs.append((p, master))
                    own.append(master)
                else:
                    own.append(p)
            groups.append({**group, "params": own})
        super().__init__(groups, **kwargs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        for p, master in self.pairs:
            master.grad = None if p.grad is None else p.grad.float()
        loss = super().step(closure)
        for p, master in self.pairs:
            p.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for p, _ in self.pairs:
            p.grad = None if set_to_none or p.grad is None else p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "masters": [m.detach().clone() for _, m in self.pairs]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        if masters is None or len(masters) != len(self.pairs):
            raise ValueError("this optimizer state has no float32 masters for the low-precision parameters")
        with torch.no_grad():
            for (p, master), saved in zip(self.pairs, masters):
                master.copy_(saved)
                p.copy_(saved)
        super().load_state_dict(state_dict)


class NonFiniteLoss(ValueError):
    """The loss of a training step is NaN or infinite: training stops there, with the step named."""


def require_finite(loss: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLoss` when ``loss`` is NaN or inf; ``where`` says which step and batch."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(
            f"{where}: the training loss is {loss.detach().float().flatten()[0].item()}; nothing of this step was kept. "
            "Lower the learning rate, or check the inputs (`omnimoe store verify` for latent stores)."
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """The random-number state a checkpoint carries: CPU, and CUDA on a CUDA device."""
    return {
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_state` saved (a checkpoint without CUDA state leaves CUDA's as it is)."""
    torch.set_rng_state(state["rng"].cpu())
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` under a temporary name, renamed into place: a kill never leaves half a checkpoint."""
    from omnimoe.io import atomic_path

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def tensorboard(folder: Path, resume_step: int = 0) -> Any:
    """A TensorBoard writer (``tensorboard --logdir <out>``), or None where tensorboard is not installed. A run
    resumed after ``resume_step`` steps (scalars are logged at the count of steps done) hides what the killed
    run had logged past its checkpoint, so no step is shown twice."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way left under ``folder`` (``.<name>.*.tmp``, see
    :func:`omnimoe.io.atomic_path`). Called by rank 0 when a run starts, before it writes anything."""
    removed = []
    for path in Path(folder).rglob(".*.tmp"):
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed
