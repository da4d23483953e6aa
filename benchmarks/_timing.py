"""Timing and reporting helpers shared by every benchmark script.

``measure`` runs a callable with warm-up and returns quantiles (host-observed: on CUDA each call
is followed by a synchronize). ``write_json`` stores a script's rows next to its text table, so
results are machine-readable; it writes atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20% / 80% quantiles over ``repeats`` timed calls."""

    median: float
    q20: float
    q80: float
    repeats: int

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def us(self) -> float:
        return self.median * 1e6


def _quantile(sorted_values: list[float], q: float) -> float:
    index = q * (len(sorted_values) - 1)
    low = int(index)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (index - low)


def measure(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 2,
            sync: Callable[[], None] | None = None, min_time: float = 0.0) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed calls (more when their total
    stays under ``min_time`` seconds). ``sync`` (e.g. ``torch.cuda.synchronize``) runs after every
    call so that asynchronous device work is counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times: list[float] = []
    total = 0.0
    while len(times) < repeats or total < min_time:
        start = time.perf_counter()
        fn()
        sync()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  len(times))


def ratio(baseline: float, value: float) -> str:
    """``baseline / value`` as ``"12.3x"`` (how many times faster ``value`` is)."""
    return f"{baseline / value:.2f}x" if value > 0 else "n/a"


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (dataclasses converted) as standard JSON, atomically (deeppar's output
    policy: ``deeppar._io.write_json``)."""
    from deeppar._io import write_json as write_output_json

    def convert(value: Any) -> Any:
        if hasattr(value, "__dataclass_fields__"):
            return convert(asdict(value))
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    write_output_json(path, convert(payload), indent=2, what="the benchmark rows")
    return Path(path)
