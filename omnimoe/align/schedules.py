"""Direction schedules: which direction(s) an optimizer step trains.

* ``alternate`` (the paper's AGD): one direction per step, cycling; ``steps_per_direction`` > 1 stays on each.
* ``adaptive``: one direction per step, drawn with probabilities that favour the directions with the
  lowest validation recall (``update`` after each validation).
* ``joint`` (the ablation): every direction summed in each step.
"""

from __future__ import annotations

from typing import Any

import torch


class DirectionSchedule:
    def __init__(
        self,
        directions: list[str],
        kind: str = "alternate",
        steps_per_direction: int = 1,
        seed: int = 0,
        temperature: float = 0.1,
    ) -> None:
        if kind not in ("alternate", "adaptive", "joint"):
            raise ValueError(f"schedule must be alternate, adaptive or joint, got {kind!r}")
        if not directions:
            raise ValueError("a schedule needs at least one direction")
        if steps_per_direction < 1:
            raise ValueError("steps_per_direction must be >= 1")
        self.directions, self.kind, self.steps_per_direction = list(directions), kind, steps_per_direction
        self.temperature = temperature
        self.generator = torch.Generator().manual_seed(seed)
        self.weights = torch.ones(len(directions))

    def directions_for(self, step: int) -> list[str]:
        if self.kind == "joint":
            return list(self.directions)
        if self.kind == "alternate":
            return [self.directions[(step // self.steps_per_direction) % len(self.directions)]]
        i = int(torch.multinomial(self.weights / self.weights.sum(), 1, generator=self.generator))
        return [self.directions[i]]

    def update(self, recall: dict[str, float]) -> None:
        """Adaptive only: p(direction) proportional to exp(-recall / temperature)."""
        if self.kind != "adaptive":
            return
        r = torch.tensor([recall.get(d, 0.0) for d in self.directions])
        self.weights = torch.softmax(-r / self.temperature, dim=0)

    def probabilities(self) -> dict[str, float]:
        p = self.weights / self.weights.sum()
        return dict(zip(self.directions, p.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.clone(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weights = state["weights"].clone()
        self.generator.set_state(state["generator"])
