"""Measured timeline of a pipeline step: when each step of each rank's program started and ended.

Times are microseconds from the start of the step, kept as
:class:`~deeppar.pipeline.simulate.TimedStep` (the record the simulator produces too):
``time.perf_counter`` on CPU; on GPU a pair of CUDA events per step, read once the step has
ended, so recording adds no synchronisation inside the step. :func:`write_chrome_trace` writes
all ranks as a Chrome/Perfetto trace; :func:`to_measured_costs` turns them into the simulator's
per-step durations, so a measured bubble can be compared with a simulated one.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from deeppar._io import write_json

from .ir import Schedule, Step
from .simulate import MeasuredCosts, TimedStep


class TimelineRecorder:
    """Records the start and end of every step of one rank for one pipeline step."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = device
        self.cuda = device.type == "cuda"
        self._open: list[tuple[int, Step, Any, Any]] = []
        self._origin: Any = None
        self.steps: list[TimedStep] = []

    def _now(self) -> Any:
        if self.cuda:
            # on the stages' device (its current stream), whatever device is current
            with torch.cuda.device(self.device):
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(torch.cuda.current_stream(self.device))
            return ev
        return time.perf_counter()

    def start(self) -> None:
        """Mark time zero of the step."""
        self._open = []
        self.steps = []
        self._origin = self._now()

    def begin(self) -> Any:
        return self._now()

    def end(self, index: int, step: Step, began: Any) -> None:
        """Close the ``index``-th step of this rank's program (``step``: what actually ran)."""
        self._open.append((index, step, began, self._now()))

    def finish(self) -> list[TimedStep]:
        """Resolve the times (synchronising the GPU once) and return the steps."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

            def us(ev: Any) -> float:
                return self._origin.elapsed_time(ev) * 1e3
        else:
            def us(t: Any) -> float:
                return (t - self._origin) * 1e6
        self.steps = [TimedStep(self.rank, i, step, us(b), us(e))
                      for i, step, b, e in self._open]
        self._open = []
        return self.steps


def write_chrome_trace(schedule: Schedule, steps: list[TimedStep], path: str) -> dict[str, Any]:
    """Write the Chrome trace (``chrome://tracing`` / Perfetto) of a measured step to ``path``
    and return it: one row per rank, flow arrows for transfers, microsecond times. Ranks'
    clocks are aligned only at the start of the step. (The trace object alone, of a simulated
    or a measured run, is :func:`deeppar.pipeline.export.to_chrome_trace`.)"""
    from .export import to_chrome_trace

    trace = to_chrome_trace(schedule, steps, time_unit_us=1.0)
    write_json(path, trace, what="the Chrome trace")
    return trace


def measured_costs(steps: list[TimedStep]) -> dict[str, float]:
    """Mean duration (microseconds) of each kind of step: ``F``, ``B``, ``I``, ``W``, ``FB``."""
    sums: dict[str, list[float]] = {}
    for s in steps:
        sums.setdefault(s.kind, []).append(s.duration)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def bubble(steps: list[TimedStep]) -> dict[str, float]:
    """Measured makespan and bubble: ``makespan_us`` (latest end over ranks), ``busy_us`` (sum of
    step durations over ranks) and ``bubble_fraction`` = 1 - busy / (ranks * makespan)."""
    if not steps:
        return {"makespan_us": 0.0, "busy_us": 0.0, "bubble_fraction": 0.0}
    ranks = {s.rank for s in steps}
    makespan = max(s.end for s in steps)
    busy = sum(s.duration for s in steps)
    return {"makespan_us": makespan, "busy_us": busy,
            "bubble_fraction": 1.0 - busy / (len(ranks) * makespan) if makespan > 0 else 0.0}


def to_measured_costs(steps: list[TimedStep], comm_us: float = 0.0) -> MeasuredCosts:
    """The simulator's :class:`~deeppar.pipeline.simulate.MeasuredCosts` (microseconds), keyed
    by ``(rank, index)`` of each measured step, so ``simulate(schedule, costs)`` replays the
    measured durations with the schedule's dependencies."""
    return MeasuredCosts({(s.rank, s.index): s.duration for s in steps}, comm=comm_us)


__all__ = [
    "TimedStep",
    "TimelineRecorder",
    "bubble",
    "measured_costs",
    "to_measured_costs",
    "write_chrome_trace",
]
