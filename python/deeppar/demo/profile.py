"""The profiled step: what ``deeppar trace`` finds in it, and what the fused engine measured.

Every process captures the same training step with :func:`deeppar.profiling.capture` (one
trace file per process); process 0 analyses them together. On GPUs the analysis measures
kernels: overlap ratio and exposed communication per device and per phase (the runtime's and
the engine's ``record_function`` ranges). A CPU trace has no kernels, so there the phases'
CPU times are reported, and the overlap is the engine's own: how long each all-to-all was in
flight (from its start to the return of its wait) while computation ran.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

TOP_PHASES = 12  # rows of the phase table printed


def engine_overlap(entries: list[Any]) -> dict[str, float]:
    """Overlap of in-flight transfers with computation in the engine's timeline (seconds):
    ``comm_s`` (union of transfers), ``compute_s``, ``overlap_s`` and ``ratio`` =
    overlap / comm."""
    from deeppar.profiling import intervals as iv

    def union(stream: str) -> tuple[np.ndarray, np.ndarray]:
        sel = [e for e in entries if e.stream == stream]
        return iv.union(np.array([e.start for e in sel], dtype=np.float64),
                        np.array([e.end for e in sel], dtype=np.float64))

    comm, comp = union("comm"), union("compute")
    comm_s, overlap = iv.length(*comm), iv.intersection_length(comm, comp)
    return {"comm_s": comm_s, "compute_s": iv.length(*comp), "overlap_s": overlap,
            "ratio": overlap / comm_s if comm_s > 0 else 0.0,
            "waited_s": sum(getattr(e, "waited", 0.0) for e in entries if e.stream == "comm"),
            "transfers": sum(1 for e in entries if e.stream == "comm")}


def draw_engine_timeline(entries: list[Any], path: Path) -> None:
    """Process 0's F&B pairs as the engine ran them: computation sub-steps (forward, backward,
    weight-gradient parts), all-to-alls from start to the end of their wait, and the time the
    host was blocked in a wait (exposed communication)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from deeppar._io import save_figure

    t0 = min(e.start for e in entries)
    colors = {"F": "#f6a623", "B": "#3aa655", "W": "#8e6bbf", "comm": "#4C78A8",
              "wait": "#D62728"}
    fig, ax = plt.subplots(figsize=(14, 2.6))
    try:
        for e in entries:
            a, b = (e.start - t0) * 1e3, (e.end - t0) * 1e3
            if e.stream == "comm":
                ax.broken_barh([(a, b - a)], (0.6, 0.8), facecolors=colors["comm"],
                               edgecolors="white", linewidth=0.4)
                waited = getattr(e, "waited", 0.0) * 1e3
                if waited > 0:
                    ax.broken_barh([(b - waited, waited)], (0.6, 0.8), facecolors=colors["wait"])
            else:
                kind = e.name[:1] if e.name[:1] in "FBW" else "F"
                ax.broken_barh([(a, b - a)], (1.6, 0.8), facecolors=colors[kind],
                               edgecolors="white", linewidth=0.4)
        ov = engine_overlap(entries)
        ax.set_yticks([1.0, 2.0])
        ax.set_yticklabels(["all-to-all in flight", "computation"])
        ax.set_xlabel("time (ms)")
        ax.set_title(f"fused F&B pairs on process 0: all-to-alls in flight "
                     f"{ov['comm_s'] * 1e3:.1f} ms, {ov['ratio']:.0%} of it alongside "
                     f"computation; host blocked in waits {ov['waited_s'] * 1e3:.1f} ms",
                     fontsize=10)
        handles = [Patch(color=colors[k], label=n) for k, n in (
            ("F", "forward sub-step"), ("B", "backward (input grad)"),
            ("W", "weight grad"), ("comm", "all-to-all in flight"),
            ("wait", "blocked in wait (exposed)"))]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=5,
                  fontsize=8, frameon=False)
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def phase_table(report: Any) -> list[tuple[str, int, float, float, float]]:
    """Phases added up by name over all ranks and layers (``F.attn[1]`` counts as
    ``F.attn``, through :func:`deeppar.profiling.analysis.summarize_phases`): (name, count,
    CPU ms, GPU busy ms, exposed communication ms), longest CPU time first."""
    from deeppar.profiling.analysis import summarize_phases

    phases = [replace(p, name=re.sub(r"\[\d+\]", "", p.name))
              for rank in report.ranks for p in rank.phases]
    rows = [(s.name, s.count, s.cpu_total_us / 1e3, s.busy_us / 1e3, s.exposed_comm_us / 1e3)
            for s in summarize_phases(phases)]
    rows.sort(key=lambda r: -r[2])
    return rows


def published_trace_lines() -> list[str]:
    """DeepSeek's published training trace (one F&B chunk pair, H800 GPUs), shipped with
    deeppar, through the same analysis: what the GPU figures look like."""
    from deeppar.data import sample_trace
    from deeppar.profiling import analyze_files

    path = sample_trace()
    if not path.exists():
        return []
    d = analyze_files(str(path)).ranks[0].devices[0]
    return [f"for comparison, DeepSeek's published trace of one DualPipe F&B pair (H800, "
            f"EP 64) through the same analysis: overlap ratio {d.overlap_ratio:.3f}, exposed "
            f"communication {d.exposed_comm_us / 1e3:.2f} ms of {d.comm_busy_us / 1e3:.1f} ms "
            f"(`deeppar trace analyze {path.name}`)"]


def analyse(folder: Path, engine_entries: list[Any], pictures: Path) -> dict[str, Any]:
    """Analyse every rank's trace in ``folder``; write the timeline pictures of the trace
    under ``pictures``. Returns the lines to print, a one-line summary and the files."""
    from deeppar.profiling import analyze, load_traces, write_html, write_png

    traces = load_traces([str(folder)])
    report = analyze(traces)
    lines: list[str] = []
    files: list[tuple[str, str]] = []
    devices = [d for r in report.ranks for d in r.devices]
    if devices:
        for d in devices:
            lines.append(f"rank {d.rank} GPU {d.device}: overlap ratio {d.overlap_ratio:.3f}, "
                         f"exposed communication {d.exposed_comm_us / 1e3:.3f} ms of "
                         f"{d.comm_busy_us / 1e3:.3f} ms communication, span "
                         f"{d.span_us / 1e3:.3f} ms")
        worst = min(devices, key=lambda d: d.overlap_ratio)
        summary = (f"{len(devices)} GPUs, overlap ratio >= {worst.overlap_ratio:.3f}, exposed "
                   f"comm <= {max(d.exposed_comm_us for d in devices) / 1e3:.3f} ms")
    else:
        lines.append(f"{len(traces)} traces, no GPU kernels in them (CPU run): per-phase CPU "
                     "times below; the overlap is the engine's own measurement")
        summary = ""
    phases = phase_table(report)
    if phases:
        gpu_cols = (f"{'GPU busy ms':>13}{'exposed comm ms':>17}" if devices else "")
        lines.append(f"  {'phase (all ranks, all layers)':<30}{'count':>7}{'CPU ms':>10}"
                     + gpu_cols)
        for name, count, cpu, busy, exposed in phases[:TOP_PHASES]:
            gpu = f"{busy:>13.3f}{exposed:>17.3f}" if devices else ""
            lines.append(f"  {name[:29]:<30}{count:>7}{cpu:>10.2f}{gpu}")
    else:
        lines.append("  no record_function phases in the trace")
    if engine_entries:
        ov = engine_overlap(engine_entries)
        lines.append(f"fused engine, F&B pairs on process 0: {ov['transfers']} all-to-alls in "
                     f"flight {ov['comm_s'] * 1e3:.2f} ms, of which {ov['overlap_s'] * 1e3:.2f} "
                     f"ms ran alongside computation (ratio {ov['ratio']:.2f}); the host was "
                     f"blocked in their waits {ov['waited_s'] * 1e3:.2f} ms")
        path = pictures / "engine_timeline.png"
        draw_engine_timeline(engine_entries, path)
        files.append(("fused engine, F&B pairs on process 0", str(path)))
        if not devices:
            summary = (f"engine overlap ratio {ov['ratio']:.2f} (all-to-all in flight during "
                       f"computation), {len(phases)} named phases")
    else:
        lines.append("fused engine: no F&B pair ran on process 0 in this step")
        summary = summary or f"{len(phases)} named phases, no GPU kernels (CPU)"
    if not devices:
        lines += published_trace_lines()
    png, html = pictures / "trace_timeline.png", pictures / "trace_timeline.html"
    write_png(str(png), traces, report, max_ranks=4)
    write_html(str(html), traces, report, max_ranks=4)
    files += [("profiled step, timeline", str(png)), ("profiled step, zoomable", str(html))]
    return {"lines": lines, "summary": summary, "files": files,
            "overlap": engine_overlap(engine_entries) if engine_entries else None,
            "gpu": bool(devices)}


__all__ = ["analyse", "draw_engine_timeline", "engine_overlap", "phase_table",
           "published_trace_lines"]
