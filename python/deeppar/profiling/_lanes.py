"""Timeline geometry shared by the PNG and HTML writers: lanes of coloured intervals.

Times are microseconds from the timeline's origin (the earliest GPU activity or annotation of
the ranks shown, on the traces' absolute clocks), the unit of every other output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import intervals as iv
from .analysis import TraceReport, classify_activities
from .classify import CLASS_CODE, COMM, COMPUTE, Classifier
from .loader import RankTrace

COLORS = {"computation": "#4C78A8", "communication": "#F58518", "memory": "#9D9D9D",
          "exposed": "#D62728"}
PHASE_COLORS = ("#8DD3C7", "#FFFFB3", "#BEBADA", "#FB8072", "#80B1D3", "#FDB462", "#B3DE69",
                "#FCCDE5", "#D9D9D9", "#BC80BD", "#CCEBC5", "#FFED6F")

Window = tuple[float | None, float | None]  # (start, end) in us from the origin; None: open


@dataclass
class Lane:
    """One horizontal row: label and, per colour key, (starts, ends) in us; with names, the
    name of each bar (kernel names; for exposed communication, the kernels it comes from)."""

    label: str
    bars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    bar_names: dict[str, list[str]] = field(default_factory=dict)
    names: list[tuple[float, float, str]] = field(default_factory=list)  # phase bands


def _clip(s: np.ndarray, e: np.ndarray, lo: float, hi: float
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intervals that reach into [lo, hi], cut to it, and which ones they were."""
    keep = np.flatnonzero((s <= hi) & (e >= lo))
    return np.maximum(s[keep], lo), np.minimum(e[keep], hi), keep


def build_lanes(traces: list[RankTrace], report: TraceReport, classifier: Classifier,
                max_ranks: int = 8, window: Window = (None, None), names: bool = False
                ) -> tuple[list[Lane], tuple[float, float]]:
    """Lanes (phase band, streams, exposed communication) per rank and device, cut to
    ``window``, and the time range they cover (the window, its open ends filled from the
    data). Bar names are kept only with ``names`` (the HTML hover text)."""
    shown = traces[:max_ranks]
    starts = [t.base_us + float(t.gpu_start.min()) for t in shown if t.gpu_start.size]
    starts += [t.base_us + float(t.ann_start.min()) for t in shown if t.ann_start.size]
    origin = min(starts) if starts else 0.0
    end = 0.0
    for t in shown:
        off = t.base_us - origin
        for x in (t.gpu_end, t.ann_end):
            if x.size:
                end = max(end, float(x.max()) + off)
    lo = 0.0 if window[0] is None else float(window[0])
    hi = end if window[1] is None else float(window[1])
    if hi <= lo and window == (None, None):
        hi = 1.0  # nothing to draw (a CPU-only trace): an empty 1 us timeline
    if hi <= lo:
        raise ValueError(f"window: the end ({hi:g} us) must lie after the start ({lo:g} us); "
                         f"the timeline runs from 0 to {end:g} us")
    lanes: list[Lane] = []
    by_rank = {r.rank: r for r in report.ranks}
    for t in shown:
        off = t.base_us - origin
        rr = by_rank.get(t.rank)
        if rr is not None and rr.phases:
            band = Lane(f"rank {t.rank} phases")
            for p in rr.phases:
                a, b = p.cpu_start_us + off, p.cpu_start_us + p.cpu_dur_us + off
                if a <= hi and b >= lo:
                    band.names.append((max(a, lo), min(b, hi), p.name))
            lanes.append(band)
        if not t.gpu_start.size:
            continue
        cls, _ = classify_activities(t, classifier)
        start, stop = t.gpu_start + off, t.gpu_end + off
        for d in t.devices:
            on_dev = t.gpu_device == d
            for st in np.unique(t.gpu_stream[on_dev]).tolist():
                m = on_dev & (t.gpu_stream == st)
                lane = Lane(f"r{t.rank} GPU{d} stream {st}")
                for key in ("computation", "communication", "memory"):
                    k = np.flatnonzero(m & (cls == CLASS_CODE[key]))
                    if k.size:
                        s, e, kept = _clip(start[k], stop[k], lo, hi)
                        lane.bars[key] = (s, e)
                        if names:
                            lane.bar_names[key] = [t.names[i] for i in
                                                   t.gpu_name[k[kept]].tolist()]
                lanes.append(lane)
            comm_m = on_dev & (cls == CLASS_CODE[COMM])
            comp_m = on_dev & (cls == CLASS_CODE[COMPUTE])
            exposed = iv.subtract(iv.union(start[comm_m], stop[comm_m]),
                                  iv.union(start[comp_m], stop[comp_m]))
            lane = Lane(f"r{t.rank} GPU{d} exposed comm")
            s, e, _ = _clip(exposed[0], exposed[1], lo, hi)
            lane.bars["exposed"] = (s, e)
            if names:
                lane.bar_names["exposed"] = ["exposed communication"] * s.size
            lanes.append(lane)
    return lanes, (lo, hi)


def phase_color_map(lanes: list[Lane]) -> dict[str, str]:
    names: dict[str, str] = {}
    for lane in lanes:
        for _a, _b, n in lane.names:
            if n not in names:
                names[n] = PHASE_COLORS[len(names) % len(PHASE_COLORS)]
    return names


def parse_window(text: str) -> Window:
    """``START:END`` in microseconds from the timeline's origin; either side may be empty."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = (float(x) if x.strip() else None for x in parts)
    except ValueError:
        raise ValueError(f"window: expected START:END in microseconds (e.g. 1000:25000, or "
                         f"5000: for everything after 5000 us), got {text!r}") from None
    for x in (lo, hi):
        if x is not None and not np.isfinite(x):
            raise ValueError(f"window: bounds must be finite numbers of microseconds, got "
                             f"{text!r}")
    if lo is not None and hi is not None and hi <= lo:
        raise ValueError(f"window: the end must lie after the start, got {text!r}")
    return lo, hi
