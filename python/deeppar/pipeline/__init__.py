"""Pipeline parallelism: schedules as data (IR, generators, validator, simulator, pictures) and
the DualPipe / DualPipeV runtime.

Importing this package needs neither matplotlib nor torch: the schedule tools are pure Python,
and heavier names load lazily on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# draw, simulate and validate are bound eagerly: were they lazy, the first import of their
# submodules (by another module) would bind the package attribute to the module instead.
from .draw import draw
from .ir import Action, Kind, Overlap, Schedule, StageInfo, Step, Transfer
from .simulate import simulate
from .validate import validate

# name -> module (relative) that defines it; loaded on first attribute access
_LAZY: dict[str, str] = {
    # schedule generators
    "build": ".schedules",
    "METHODS": ".schedules",
    # validation
    "check": ".validate",
    "ScheduleError": ".validate",
    # simulation
    "Costs": ".simulate",
    "MeasuredCosts": ".simulate",
    "SimResult": ".simulate",
    "compare_published": ".simulate",
    "TimedStep": ".simulate",
    # exports and pictures (matplotlib is imported inside the drawing functions only)
    "to_torch_actions": ".export",
    "to_chrome_trace": ".export",
    # ---- runtime exports (owned by the runtime engineer: they may add lines here) ----
    "DualPipe": ".runtime",
    "DualPipeV": ".runtime",
    "PipelineRuntime": ".runtime",
    "PipelineConfig": ".runtime",
    "PipelineFailure": ".coordination",
    "defer_weight_grads": ".weight_grad",
    # ---- end of runtime exports ----
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Action", "Kind", "Overlap", "Schedule", "StageInfo", "Step", "Transfer", "draw",
           "simulate", "validate", *_LAZY]
