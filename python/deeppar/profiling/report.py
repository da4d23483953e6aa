"""Readable text report of a :class:`TraceReport`. Every time is in microseconds (us), as in
the JSON output's ``*_us`` keys."""

from __future__ import annotations

import os

from .analysis import DEVICE_METRICS, DeviceStats, RankReport, TraceReport


def _us(x: float) -> str:
    return f"{x:,.1f} us"


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


_PHASE_HEAD = (f"    {'phase':<24}{'count':>6}{'kernels':>8}{'cpu total':>13}{'gpu busy':>13}"
               f"{'comm':>13}{'compute':>13}{'exposed comm':>13}")


def _phase_row(name: str, count: int, kernels: int, cpu: float, busy: float, comm: float,
               compute: float, exposed: float) -> str:
    return (f"    {name[:23]:<24}{count:>6}{kernels:>8}{cpu:>13,.1f}{busy:>13,.1f}{comm:>13,.1f}"
            f"{compute:>13,.1f}{exposed:>13,.1f}")


def _phase_block(r: RankReport, all_phases: bool) -> list[str]:
    a = r.attribution
    if not a.annotation_ranges:
        return ["  phases: no record_function / user annotation ranges in the trace"]
    if all_phases:
        lines = [f"  phases (each of the {len(r.phases)} innermost ranges, in CPU order; "
                 "times in us):", _PHASE_HEAD]
        lines += [_phase_row(p.name, 1, p.kernels, p.cpu_dur_us, p.busy_us, p.comm_busy_us,
                             p.compute_busy_us, p.exposed_comm_us) for p in r.phases]
    else:
        lines = [f"  phases by name ({len(r.phases)} innermost ranges, {len(r.phase_summary)} "
                 "names; sums in us; --all-phases lists each range):", _PHASE_HEAD]
        lines += [_phase_row(s.name, s.count, s.kernels, s.cpu_total_us, s.busy_us,
                             s.comm_busy_us, s.compute_busy_us, s.exposed_comm_us)
                  for s in r.phase_summary]
    for p in r.outer_phases:
        lines.append(f"    (outer) {p.name[:40]}: {p.kernels} activities launched directly")
    lines.append(f"    attributed {a.attributed} of {a.activities} GPU activities through the "
                 "launch's correlation id"
                 + (f" ({a.via_other_thread} via another thread)" if a.via_other_thread else "")
                 + f"; unattributed {a.unattributed} ({a.no_launch} without launch event, "
                 + (f"{a.ambiguous} with an ambiguous correlation id, " if a.ambiguous else "")
                 + f"{a.outside_ranges} launched outside any range)")
    return lines


def format_report(report: TraceReport, top: int = 12, all_phases: bool = False) -> str:
    """The text the CLI prints without ``--json``: per device, the phases added up by name
    (or every range with ``all_phases``), and the cross-rank summary."""
    out: list[str] = []
    for r in report.ranks:
        world = f" of {r.world_size}" if r.world_size else ""
        out.append(f"rank {r.rank}{world}: {os.path.basename(r.path)} ({r.events} events)")
        if not r.has_gpu:
            out.append("  no GPU activity in this trace (CPU-only profile?): "
                       "no overlap figures")
        for d in r.devices:
            out.extend(_device_block(d, top))
        out.extend(_phase_block(r, all_phases))
        out.append("")
    if len(report.ranks) > 1 and report.summary:
        out.append(f"across {len(report.ranks)} ranks (us):  min       median          max")
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
