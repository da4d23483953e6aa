"""Profile a few training steps with torch.profiler and analyze the trace it writes.

    with capture("out/trace.json.gz", steps=2, warmup=1) as prof:
        for _ in range(prof.total_steps):
            train_step()
            prof.step()
    print(prof.report.ranks[0].devices)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from deeppar._io import write_atomic


@dataclass
class Capture:
    """Handle yielded by :func:`capture`: call ``step()`` after each step; after the block,
    ``path`` holds the trace and ``report`` its analysis."""

    path: str
    skip: int
    warmup: int
    steps: int
    profiler: Any = None
    report: Any = None
    written: bool = False
    _options: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        """How many steps the loop must run for the trace to be written."""
        return self.skip + self.warmup + self.steps

    def step(self) -> None:
        """Mark the end of one step (drives the profiler's schedule)."""
        self.profiler.step()


@contextmanager
def capture(path: str | os.PathLike[str], steps: int = 1, warmup: int = 1, skip: int = 0,
            cuda: bool | None = None, record_shapes: bool = False, with_stack: bool = False,
            analyze: bool = True, comm_patterns: tuple[str, ...] = ()) -> Iterator[Capture]:
    """Profile ``steps`` steps after ``skip`` unprofiled and ``warmup`` discarded ones.

    CUDA activity is recorded when a GPU is available (``cuda=None``). The trace is written
    to ``path`` (gzipped when it ends in ``.gz``) when the active steps end, atomically; on
    leaving the block it is analyzed into ``Capture.report`` (unless ``analyze=False``).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    for name, value, least in (("steps", steps, 1), ("warmup", warmup, 0), ("skip", skip, 0)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"capture: {name} must be an integer >= {least}, got {value!r}")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if cuda is None:
        cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    handle = Capture(path=path, skip=skip, warmup=warmup, steps=steps)

    def on_ready(prof: Any) -> None:
        suffix = ".json.gz" if path.endswith(".gz") else ".json"
        write_atomic(path, prof.export_chrome_trace, suffix=suffix)
        handle.written = True

    sched = schedule(skip_first=skip, wait=0, warmup=warmup, active=steps, repeat=1)
    with profile(activities=activities, schedule=sched, on_trace_ready=on_ready,
                 record_shapes=record_shapes, with_stack=with_stack) as prof:
        handle.profiler = prof
        yield handle
    if not handle.written:
        raise ValueError(f"capture: no trace written to {path!r}: the block ran fewer than "
                         f"{handle.total_steps} steps (skip {skip} + warmup {warmup} + steps "
                         f"{steps}); call prof.step() once per step")
    if analyze:
        from .analysis import analyze_files

        handle.report = analyze_files(path, comm_patterns=comm_patterns)
