"""Side-by-side timing that order cannot fool: candidates take turns step by step (each round in a rotated
order) after discarded warm-up steps, so machine noise and warm-up hit all of them alike; each is reported
as its median with the spread (min and max) over rounds."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(
    candidates: dict[str, Callable[[], object]], rounds: int, warmup: int = 3
) -> dict[str, dict[str, float | list[float]]]:
    """``{name: {"median_ms", "min_ms", "max_ms", "ms": [every round]}}``: ``warmup`` untimed calls of
    each candidate in turn, then ``rounds`` timed calls of each, interleaved."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "ms": ms}
        for name, ms in times.items()
    }
