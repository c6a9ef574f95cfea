"""What every trainer shares at run time: the checks that stop a step before a bad value is kept, the
TensorBoard writer, and the tidying of a run folder that a killed run left behind.

A NaN or infinite loss is never backpropagated: the step raises :class:`NonFiniteLoss` naming where it
happened, so the weights, the checkpoints and the results on disk stay those of the last good step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class NonFiniteLoss(ValueError):
    """The loss of a training step is NaN or infinite: training stops there, with the step named."""


def require_finite(loss: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLoss` when ``loss`` is NaN or inf; ``where`` says which step and batch."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(f"{where}: the training loss is {loss.detach().float().flatten()[0].item()}; nothing of this step was kept. "
                            "Lower the learning rate, or check the inputs (`omnimoe store verify` for latent stores).")  # fmt: skip


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
