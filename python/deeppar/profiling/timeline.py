"""PNG timeline: one lane per stream, communication and computation in different colours,
exposed communication highlighted, annotation ranges as a band on top (matplotlib Agg)."""

from __future__ import annotations

from deeppar._io import save_figure

from ._lanes import COLORS, Window, build_lanes, phase_color_map
from .analysis import TraceReport
from .classify import Classifier
from .loader import RankTrace


def write_png(path: str, traces: list[RankTrace], report: TraceReport,
              classifier: Classifier | None = None, max_ranks: int = 8, dpi: int = 130,
              window: Window = (None, None)) -> None:
    """Draw the timeline of ``traces`` (the first ``max_ranks`` ranks) into ``path``; time in
    microseconds from the first activity, cut to ``window`` (start, end) when given."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lanes, (lo, hi) = build_lanes(traces, report, classifier or Classifier(), max_ranks, window)
    phase_colors = phase_color_map(lanes)
    n = max(len(lanes), 1)
    fig, ax = plt.subplots(figsize=(18, max(3.0, 1.4 + 0.42 * n + (0.5 if phase_colors else 0))))
    try:
        for row, lane in enumerate(lanes):
            y = n - 1 - row
            for key, (s, e) in lane.bars.items():
                if s.size:
                    h = 0.5 if key == "exposed" else 0.8
                    ax.broken_barh(list(zip(s.tolist(), (e - s).tolist())), (y - h / 2, h),
                                   facecolors=COLORS[key], edgecolors="none",
                                   linewidth=0)
            for a, b, name in lane.names:
                ax.broken_barh([(a, max(b - a, 1e-6))], (y - 0.4, 0.8),
                               facecolors=phase_colors[name], edgecolors="#555555",
                               linewidth=0.4)
                if (b - a) > 0.018 * (hi - lo):
                    ax.text((a + b) / 2, y, name, ha="center", va="center", fontsize=6.5,
                            clip_on=True)
        ax.set_yticks(range(n))
        ax.set_yticklabels([lane.label for lane in reversed(lanes)], fontsize=8)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlim(lo, hi + 0.005 * (hi - lo))
        ax.set_xlabel("time (us)")
        ax.grid(axis="x", linewidth=0.3, alpha=0.6)
        handles = [Patch(color=COLORS[k], label=k) for k in
                   ("computation", "communication", "memory")]
        handles.append(Patch(color=COLORS["exposed"], label="exposed communication"))
        handles += [Patch(facecolor=c, edgecolor="#555555", label=nm)
                    for nm, c in phase_colors.items()]
        ax.legend(handles=handles, loc="upper center",
                  bbox_to_anchor=(0.5, -0.12 - 0.9 / max(n, 4)),
                  ncol=min(len(handles), 8), fontsize=8, frameon=False)
        title = "communication/computation overlap"
        dev = [d for r in report.ranks for d in r.devices]
        if dev:
            d0 = dev[0]
            title += (f" - rank {d0.rank} GPU {d0.device}: overlap ratio {d0.overlap_ratio:.3f}, "
                      f"exposed communication {d0.exposed_comm_us:,.1f} us")
        else:
            title += " - no GPU activity in the trace"
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        save_figure(fig, path, format="png", dpi=dpi)
    finally:
        plt.close(fig)
