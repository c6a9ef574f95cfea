"""How many threads torch's CPU ops use: the thread policy of every long job.

A parallel region of torch ends when its slowest thread ends. When another process holds one of the cores,
every op of a two-thread job waits for the thread that lost its core, and a job of small ops (the
connector's 128 x 256 matmuls) runs many times slower than on one thread (benchmarks/contention.py
measures it). One thread is as fast on such ops even on an idle machine. Large ops (encoder forwards, an
LLM's training step) do gain from more threads, as long as the cores are really free.

The setting (``OMNIMOE_THREADS``, or ``omnimoe --threads``):

* ``auto`` (default): a job of small ops uses one thread; a job of large ops uses the cores that are free,
  measured from ``/proc/stat`` (the CPU time of other processes) and re-checked every ``interval`` seconds,
  so it shrinks when another process takes a core and grows back when it leaves. Where ``/proc/stat`` is
  missing (not Linux), the cores this process may run on;
* ``torch``: torch's own default (a thread per core), never changed;
* ``N``: N threads, fixed.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import torch

Work = Literal["small", "large"]
ENV = "OMNIMOE_THREADS"
INTERVAL_S = 2.0
LARGE_MODEL_PARAMS = 50_000_000  # a model from this size gains from more than one thread (an LLM like Gemma-3-270M)


def setting() -> str:
    """``OMNIMOE_THREADS`` as given (``auto`` when unset); a bad value is refused naming the variable."""
    value = os.environ.get(ENV, "auto").strip() or "auto"
    check_setting(value, ENV)
    return value


def check_setting(value: str, name: str = "--threads") -> str:
    if value in ("auto", "torch") or (value.isdigit() and int(value) >= 1):
        return value
    raise ValueError(f"{name}={value!r}: use auto, torch, or a number of threads >= 1")


def work_of(model: torch.nn.Module) -> Work:
    """``large`` for a model of :data:`LARGE_MODEL_PARAMS` parameters or more (its ops gain from threads),
    else ``small``."""
    return "large" if sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMS else "small"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _CpuSampler:
    """CPU time of other processes between two reads, in cores, from ``/proc/stat`` and ``/proc/self/stat``."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1
        self.last = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
        busy = total - fields[3] - fields[4]
        return total, busy, int(own[11]) + int(own[12])  # this process's utime + stime, every thread

    def others(self) -> float | None:
        """Cores the rest of the machine kept busy since the last call (None where it cannot be read)."""
        now = self._read()
        before, self.last = self.last, now
        if now is None or before is None or now[0] <= before[0]:
            return None
        elapsed_cores = (now[0] - before[0]) / self.ncpu  # ticks of one core
        return max(0.0, ((now[1] - before[1]) - (now[2] - before[2])) / elapsed_cores)


class ThreadPolicy:
    """The policy for one job. ``with ThreadPolicy("small") as threads:`` sets the thread count, and
    ``threads.tick()`` once per step lets an ``auto`` policy follow the load; the count before is restored
    at the end.

    ``work``: ``small`` for jobs of small ops (one thread under ``auto``), ``large`` for jobs whose ops gain
    from more threads. ``value``: the setting (default: :func:`setting`)."""

    def __init__(self, work: Work, value: str | None = None, interval: float = INTERVAL_S) -> None:
        if work not in ("small", "large"):
            raise ValueError(f"work {work!r}: small or large")
        self.work, self.value, self.interval = work, check_setting(value) if value else setting(), interval
        self.cores = usable_cores()
        self.previous = torch.get_num_threads()
        self.sampler: _CpuSampler | None = None
        self.next_check = 0.0
        self.changes = 0

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def __enter__(self) -> ThreadPolicy:
        self.previous = torch.get_num_threads()
        if self.value == "torch":
            return self
        if self.value.isdigit():
            self._set(int(self.value))
        elif self.work == "small":
            self._set(1)
        else:  # large work: start with the cores free over a first short look, then follow the load
            self.sampler = _CpuSampler()
            time.sleep(0.1)
            self._follow_load()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.value != "torch":
            torch.set_num_threads(self.previous)

    def tick(self) -> None:
        """Under ``auto`` for large work: every ``interval`` seconds, as many threads as cores are free."""
        if self.sampler is not None and time.monotonic() >= self.next_check:
            self._follow_load()

    def _follow_load(self) -> None:
        assert self.sampler is not None
        self.next_check = time.monotonic() + self.interval
        self._set(self.threads_for(self.sampler.others()))

    def threads_for(self, others: float | None) -> int:
        """Threads for large work when other processes keep ``others`` cores busy (None: unknown): one per
        free core (a core 80% free counts), at least one."""
        free = self.cores if others is None else self.cores - others
        return max(1, min(self.cores, int(free + 0.2)))

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
            self.changes += 1

    def describe(self) -> dict[str, object]:
        return {"setting": self.value, "work": self.work, "threads": self.threads, "cores": self.cores}
