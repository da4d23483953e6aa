"""Overlap of computation and communication in torch.profiler traces.

Load Chrome traces (plain or gzipped, one per rank), classify GPU kernels as communication or
computation with an extensible rule table, and measure busy, idle, overlap and exposed
communication per device, stream, kernel family and ``record_function`` phase. The core needs
only NumPy; :func:`capture` (torch) and the timeline writers (matplotlib) load on use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .analysis import (
    Attribution,
    DeviceStats,
    FamilyStats,
    PhaseStats,
    PhaseSummary,
    RankReport,
    StreamStats,
    TraceReport,
    analyze,
    analyze_files,
    analyze_rank,
    summarize_phases,
)
from .classify import COMM, COMPUTE, DEFAULT_RULES, MEMORY, Classifier, Rule, kernel_family
from .loader import RankTrace, load_trace, load_traces
from .report import format_report

_LAZY = {"capture": "._capture", "Capture": "._capture", "write_png": ".timeline",
         "write_html": ".html"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["COMM", "COMPUTE", "DEFAULT_RULES", "MEMORY", "Attribution", "Capture", "Classifier",
           "DeviceStats", "FamilyStats", "PhaseStats", "PhaseSummary", "RankReport", "RankTrace",
           "Rule", "StreamStats", "TraceReport", "analyze", "analyze_files", "analyze_rank",
           "capture", "format_report", "kernel_family", "load_trace", "load_traces",
           "summarize_phases", "write_html", "write_png"]
