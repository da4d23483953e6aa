"""Readable text report of a :class:`TraceReport`."""

from __future__ import annotations

import os

from .analysis import DEVICE_METRICS, DeviceStats, RankReport, TraceReport


def _us(x: float) -> str:
    return f"{x:,.1f} us" if abs(x) < 10_000 else f"{x / 1000:,.3f} ms"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole > 0 else "   - "


def _device_block(d: DeviceStats, top: int) -> list[str]:
    lines = [
        f"  GPU {d.device}: {d.kernels} kernels ({d.comm_kernels} communication), "
        f"{d.memcpys} memcpy, {d.memsets} memset",
        f"    span                 {_us(d.span_us)}",
        f"    busy                 {_us(d.busy_us)}  ({_pct(d.busy_us, d.span_us)} of span)",
        f"    idle                 {_us(d.idle_us)}  ({_pct(d.idle_us, d.span_us)} of span)",
        f"    communication busy   {_us(d.comm_busy_us)}",
        f"    computation busy     {_us(d.compute_busy_us)}",
        f"    overlap              {_us(d.overlap_us)}  "
        f"(ratio {d.overlap_ratio:.3f} of communication)",
        f"    exposed comm         {_us(d.exposed_comm_us)}  "
        f"({_pct(d.exposed_comm_us, d.span_us)} of span)",
        "    streams:",
    ]
    for s in d.streams:
        lines.append(f"      stream {s.stream:<6} busy {_us(s.busy_us):>12} "
                     f"({_pct(s.busy_us, d.span_us)})  {s.count:6d} activities, "
                     f"{s.comm_kernels} communication kernels")
    lines.append(f"    top kernel families by total time (of {len(d.families)}):")
    for f in d.families[:top]:
        lines.append(f"      {f.category:<13} {_us(f.total_us):>12} {f.count:6d}x  "
                     f"{f.family}  [{f.rule}]")
    return lines


def _phase_block(r: RankReport, limit: int) -> list[str]:
    a = r.attribution
    if not a.annotation_ranges:
        return ["  phases: no record_function / user annotation ranges in the trace"]
    lines = [f"  phases (innermost annotation ranges, {len(r.phases)}; GPU work attributed "
             f"through the launch's correlation id):",
             f"    {'range':<24}{'kernels':>8}{'busy':>13}{'comm':>13}{'compute':>13}"
             f"{'exposed':>13}"]
    for p in r.phases[:limit]:
        lines.append(f"    {p.name[:23]:<24}{p.kernels:>8}{_us(p.busy_us):>13}"
                     f"{_us(p.comm_busy_us):>13}{_us(p.compute_busy_us):>13}"
                     f"{_us(p.exposed_comm_us):>13}")
    if len(r.phases) > limit:
        lines.append(f"    ... {len(r.phases) - limit} more (see --json)")
    for p in r.outer_phases:
        lines.append(f"    (outer) {p.name[:40]}: {p.kernels} activities launched directly")
    lines.append(f"    attributed {a.attributed} of {a.activities} GPU activities"
                 + (f" ({a.via_other_thread} via another thread)" if a.via_other_thread else "")
                 + f"; unattributed {a.unattributed} ({a.no_launch} without launch event, "
                 + (f"{a.ambiguous} with an ambiguous correlation id, " if a.ambiguous else "")
                 + f"{a.outside_ranges} launched outside any range)")
    return lines


def format_report(report: TraceReport, top: int = 12, phase_limit: int = 60) -> str:
    """The text the CLI prints without ``--json``."""
    out: list[str] = []
    for r in report.ranks:
        world = f" of {r.world_size}" if r.world_size else ""
        out.append(f"rank {r.rank}{world}: {os.path.basename(r.path)} ({r.events} events)")
        if not r.has_gpu:
            out.append("  no GPU activity in this trace (CPU-only profile?): "
                       "no overlap figures")
        for d in r.devices:
            out.extend(_device_block(d, top))
        out.extend(_phase_block(r, phase_limit))
        out.append("")
    if len(report.ranks) > 1 and report.summary:
        out.append(f"across {len(report.ranks)} ranks:      min       median          max")
        for m in DEVICE_METRICS:
            s = report.summary[m]
            if m == "overlap_ratio":
                out.append(f"  {m:<16}{s['min']:>12.3f}{s['median']:>13.3f}{s['max']:>13.3f}"
                           f"   (min at rank {s['min_rank']})")
            else:
                out.append(f"  {m:<16}{s['min']:>12,.1f}{s['median']:>13,.1f}{s['max']:>13,.1f}"
                           f"   (max at rank {s['max_rank']})")
        if report.worst:
            w = report.worst
            out.append(f"  worst rank: {w['rank']} (GPU {w['device']}), exposed communication "
                       f"{_us(w['exposed_comm_us'])}, overlap ratio {w['overlap_ratio']:.3f}")
        out.append("")
    for n in report.notes:
        out.append(f"note: {n}")
    return "\n".join(out).rstrip() + "\n"
