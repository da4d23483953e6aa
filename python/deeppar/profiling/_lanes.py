"""Timeline geometry shared by the PNG and HTML writers: lanes of coloured intervals."""

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


@dataclass
class Lane:
    """One horizontal row: label and, per colour key, (starts, ends) in ms."""

    label: str
    bars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    names: list[tuple[float, float, str]] = field(default_factory=list)  # phase bands


def build_lanes(traces: list[RankTrace], report: TraceReport, classifier: Classifier,
                max_ranks: int = 8) -> tuple[list[Lane], float]:
    """Lanes (phase band, streams, exposed communication) per rank and device, and the
    total width in ms. Times are aligned across ranks on the traces' absolute clocks."""
    shown = traces[:max_ranks]
    starts = [t.base_us + float(t.gpu_start.min()) for t in shown if t.gpu_start.size]
    starts += [t.base_us + float(t.ann_start.min()) for t in shown if t.ann_start.size]
    origin = min(starts) if starts else 0.0
    lanes: list[Lane] = []
    end_ms = 0.0
    by_rank = {r.rank: r for r in report.ranks}
    for t in shown:
        off = t.base_us - origin
        ms = lambda x, o=off: (np.asarray(x) + o) / 1000.0
        rr = by_rank.get(t.rank)
        if rr is not None and rr.phases:
            band = Lane(f"rank {t.rank} phases")
            for p in rr.phases:
                band.names.append((float(ms(p.cpu_start_us)),
                                   float(ms(p.cpu_start_us + p.cpu_dur_us)), p.name))
                end_ms = max(end_ms, band.names[-1][1])
            lanes.append(band)
        if not t.gpu_start.size:
            continue
        cls, _ = classify_activities(t, classifier)
        for d in t.devices:
            on_dev = t.gpu_device == d
            for st in np.unique(t.gpu_stream[on_dev]).tolist():
                m = on_dev & (t.gpu_stream == st)
                lane = Lane(f"r{t.rank} GPU{d} stream {st}")
                for key in ("computation", "communication", "memory"):
                    k = m & (cls == CLASS_CODE[key])
                    if k.any():
                        lane.bars[key] = (ms(t.gpu_start[k]), ms(t.gpu_end[k]))
                lanes.append(lane)
            comm_m = on_dev & (cls == CLASS_CODE[COMM])
            comp_m = on_dev & (cls == CLASS_CODE[COMPUTE])
            exposed = iv.subtract(iv.union(t.gpu_start[comm_m], t.gpu_end[comm_m]),
                                  iv.union(t.gpu_start[comp_m], t.gpu_end[comp_m]))
            lane = Lane(f"r{t.rank} GPU{d} exposed comm")
            lane.bars["exposed"] = (ms(exposed[0]), ms(exposed[1]))
            lanes.append(lane)
            end_ms = max(end_ms, float(ms(t.gpu_end[on_dev].max())))
    return lanes, end_ms


def phase_color_map(lanes: list[Lane]) -> dict[str, str]:
    names: dict[str, str] = {}
    for lane in lanes:
        for _a, _b, n in lane.names:
            if n not in names:
                names[n] = PHASE_COLORS[len(names) % len(PHASE_COLORS)]
    return names
