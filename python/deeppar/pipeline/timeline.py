"""Measured timeline of a pipeline step: when each step of each rank's program started and ended.

On CPU the times are ``time.perf_counter``; on GPU a pair of CUDA events per step (read once the
step has ended, so recording adds no synchronisation inside the step). :func:`to_chrome_trace`
writes the events of all ranks as a Chrome/Perfetto trace; :func:`measured_costs` turns them
into per-action durations for the schedule simulator, so a measured bubble can be compared with
a simulated one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class TimedStep:
    """One executed step: ``name`` as the IR prints it, e.g. ``F3@s1`` or ``(F3@s1;B1@s6)``;
    ``kind`` F, B, I, W or FB; times in microseconds from the start of the step."""

    rank: int
    index: int
    name: str
    kind: str
    start_us: float
    end_us: float

    @property
    def duration_us(self) -> float:
        return self.end_us - self.start_us


class TimelineRecorder:
    """Records the start and end of every step of one rank for one pipeline step."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._open: list[tuple[int, str, str, Any, Any]] = []
        self._origin: Any = None
        self.steps: list[TimedStep] = []

    def _now(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self) -> None:
        """Mark time zero of the step."""
        self._open = []
        self.steps = []
        self._origin = self._now()

    def begin(self) -> Any:
        return self._now()

    def end(self, index: int, name: str, kind: str, began: Any) -> None:
        self._open.append((index, name, kind, began, self._now()))

    def finish(self) -> list[TimedStep]:
        """Resolve the times (synchronising the GPU once) and return the steps."""
        if self.cuda:
            torch.cuda.synchronize()

            def us(ev: Any) -> float:
                return self._origin.elapsed_time(ev) * 1e3
        else:
            def us(t: Any) -> float:
                return (t - self._origin) * 1e6
        self.steps = [TimedStep(self.rank, i, n, k, us(b), us(e))
                      for i, n, k, b, e in self._open]
        self._open = []
        return self.steps


def to_chrome_trace(steps: list[TimedStep], path: str | None = None) -> dict[str, Any]:
    """Chrome trace (``chrome://tracing`` / Perfetto) with one row per rank; written to ``path``
    when given. Ranks' clocks are only aligned at the start of the step."""
    events = [
        {"name": s.name, "cat": s.kind, "ph": "X", "pid": 0, "tid": s.rank,
         "ts": s.start_us, "dur": max(s.duration_us, 0.0), "args": {"index": s.index}}
        for s in steps
    ]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                "args": {"name": f"rank {r}"}} for r in sorted({s.rank for s in steps})]
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path is not None:
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace


def measured_costs(steps: list[TimedStep]) -> dict[str, float]:
    """Mean duration (microseconds) of each kind of step: ``F``, ``B``, ``I``, ``W``, ``FB``."""
    sums: dict[str, list[float]] = {}
    for s in steps:
        sums.setdefault(s.kind, []).append(s.duration_us)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def bubble(steps: list[TimedStep]) -> dict[str, float]:
    """Measured makespan and bubble: ``makespan_us`` (latest end over ranks), ``busy_us`` (sum of
    step durations over ranks) and ``bubble_fraction`` = 1 - busy / (ranks * makespan)."""
    if not steps:
        return {"makespan_us": 0.0, "busy_us": 0.0, "bubble_fraction": 0.0}
    ranks = {s.rank for s in steps}
    makespan = max(s.end_us for s in steps)
    busy = sum(s.duration_us for s in steps)
    return {"makespan_us": makespan, "busy_us": busy,
            "bubble_fraction": 1.0 - busy / (len(ranks) * makespan) if makespan > 0 else 0.0}


def to_measured_costs(steps: list[TimedStep], comm_us: float = 0.0) -> Any:
    """The simulator's :class:`~deeppar.pipeline.simulate.MeasuredCosts` (microseconds), keyed
    by ``(rank, index)`` of each measured step, so ``simulate(schedule, costs)`` replays the
    measured durations with the schedule's dependencies."""
    from .simulate import MeasuredCosts

    return MeasuredCosts({(s.rank, s.index): s.duration_us for s in steps}, comm=comm_us)


def steps_to_dicts(steps: list[TimedStep]) -> list[dict[str, Any]]:
    return [asdict(s) for s in steps]


__all__ = [
    "TimedStep",
    "TimelineRecorder",
    "bubble",
    "measured_costs",
    "steps_to_dicts",
    "to_measured_costs",
    "to_chrome_trace",
]
