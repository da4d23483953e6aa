"""Pictures of schedules, in the style of DeepSeek's DualPipe figure: one row per rank, time
left to right, one cell per action coloured by kind and direction, the micro-batch number in
the cell, overlapped F&B pairs framed.

Cells are placed at their simulated times (:func:`~deeppar.pipeline.simulate.simulate`), so
with measured or given costs the widths are true durations; by default F 1, B 2, W 1 (I 1).
matplotlib is imported lazily (Agg backend): importing this module does not need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deeppar._io import save_figure

from .ir import Action, Kind, Overlap, Schedule
from .simulate import CostModel, Costs, SimResult, simulate

# (kind, direction) -> colour. Direction 0 in saturated tones, direction 1 in lighter ones
# (DeepSeek's figure distinguishes the two directions of micro-batches the same way).
COLORS: dict[tuple[str, int], str] = {
    ("F", 0): "#f6a623", ("F", 1): "#fbd38d",
    ("B", 0): "#3aa655", ("B", 1): "#9ad9a8",
    ("I", 0): "#2b8cbe", ("I", 1): "#a6cee3",
    ("W", 0): "#8e6bbf", ("W", 1): "#cdb8e8",
}
LABELS = {"F": "forward", "B": "backward (full)", "I": "backward input (W deferred)",
          "W": "weight gradient"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _cell(ax: Any, a: Action, x0: float, x1: float, y: float, fontsize: float) -> None:
    from matplotlib.patches import Rectangle

    color = COLORS[(a.kind.value, a.direction)]
    ax.add_patch(Rectangle((x0, y - 0.42), x1 - x0, 0.84, facecolor=color,
                           edgecolor="white", linewidth=0.6))
    if fontsize > 0:
        ax.text((x0 + x1) / 2, y, str(a.microbatch), ha="center", va="center",
                fontsize=fontsize, color="black")


def draw_on(ax: Any, schedule: Schedule, result: SimResult, *, title: str | None = None,
            legend: bool = True, xmax: float | None = None, costs: Any = None) -> None:
    """Draw ``schedule`` with the timings of ``result`` on a matplotlib ``ax``. ``costs`` (a
    :class:`~deeppar.pipeline.simulate.Costs`) only sets how an overlapped pair's box is split
    between its forward and its backward (default: by F 1 : B 2)."""
    from matplotlib.patches import Rectangle

    P = schedule.num_ranks
    span = xmax or result.makespan or 1.0
    # font size from the narrowest cell width in points (figure width known via ax)
    fig = ax.figure
    width_in = fig.get_size_inches()[0] * ax.get_position().width
    pts_per_unit = width_in * 72 / span
    min_w = min((t.end - t.start) for t in result.timeline) if result.timeline else 1
    fontsize = max(0.0, min(9.0, pts_per_unit * min(min_w, 1.0) * 0.55))
    if fontsize < 3.5:
        fontsize = 0  # too small to read: leave the numbers out
    for t in result.timeline:
        y = t.rank
        step = t.step
        if isinstance(step, Overlap):
            f, b = step.forward, step.backward
            wf = _share(step, costs)
            xm = t.start + (t.end - t.start) * wf
            _cell(ax, f, t.start, xm, y, fontsize)
            _cell(ax, b, xm, t.end, y, fontsize)
            ax.add_patch(Rectangle((t.start, y - 0.45), t.end - t.start, 0.9, fill=False,
                                   edgecolor="black", linewidth=1.4))
        else:
            _cell(ax, step, t.start, t.end, y, fontsize)
    ax.set_xlim(0, span)
    ax.set_ylim(P - 0.5, -0.5)
    ax.set_yticks(range(P))
    ax.set_yticklabels([f"rank {r}" for r in range(P)])
    ax.set_xlabel("time")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    bub = max(result.bubble) if result.bubble else 0.0
    ax.set_title(title or f"{schedule.method}: {P} ranks, {schedule.num_chunks} micro-batches"
                 f" - makespan {result.makespan:g}, bubble {bub:g}", fontsize=10, loc="left")
    if legend:
        _legend(ax, schedule)


def _share(step: Overlap, costs: Any = None) -> float:
    """Fraction of an overlapped pair's box drawn as its forward."""
    if isinstance(costs, Costs):
        f = costs.action_time(Kind.F, step.forward.stage)
        b = costs.action_time(step.backward.kind, step.backward.stage)
        if f + b > 0:
            return f / (f + b)
    return 1.0 / (1.0 + {Kind.B: 2.0, Kind.I: 1.0}[step.backward.kind])


def _legend_handles(schedule: Schedule) -> list[Any]:
    from matplotlib.patches import Patch

    kinds = sorted({a.kind.value for _, _, a in schedule.all_actions()}, key="FBIW".index)
    dirs = sorted({a.direction for _, _, a in schedule.all_actions()})
    handles = []
    for k in kinds:
        for d in dirs:
            lab = LABELS[k] + (f", direction {d}" if len(dirs) > 1 else "")
            handles.append(Patch(facecolor=COLORS[(k, d)], label=lab))
    if any(isinstance(s, Overlap) for p in schedule.steps for s in p):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.4,
                             label="overlapped F&B pair"))
    return handles


def _legend(ax: Any, schedule: Schedule) -> None:
    handles = _legend_handles(schedule)
    ax.figure.legend(handles=handles, loc="lower center", ncol=min(5, len(handles)),
                     fontsize=8, frameon=False)


def draw(schedule: Schedule, path: str | Path | None = None, *,
         costs: CostModel | None = None, result: SimResult | None = None,
         title: str | None = None, dpi: int = 150) -> Any:
    """Draw ``schedule`` (timed by ``result`` or by simulating with ``costs``) and save it to
    ``path`` (PNG, or any format matplotlib knows from the suffix). Returns the figure."""
    plt = _plt()
    res = result or simulate(schedule, costs)
    width = min(60.0, max(8.0, 0.28 * res.makespan + 1.5))
    legend_rows = -(-len(_legend_handles(schedule)) // 5)
    bottom = 0.55 + 0.2 * legend_rows + 0.15
    height = 0.5 + 0.42 * schedule.num_ranks + bottom
    fig, ax = plt.subplots(figsize=(width, height))
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.2 / width, top=1 - 0.45 / height,
                        bottom=bottom / height)
    draw_on(ax, schedule, res, title=title, costs=costs)
    if path is not None:
        try:
            save_figure(fig, path, dpi=dpi)
        finally:
            plt.close(fig)
    return fig


def draw_compare(items: Sequence[tuple[Schedule, SimResult]], path: str | Path | None = None,
                 *, costs: Any = None, dpi: int = 120) -> Any:
    """Several schedules one under the other on a common time axis."""
    plt = _plt()
    span = max(r.makespan for _, r in items)
    width = min(60.0, max(10.0, 0.22 * span + 1.5))
    heights = [0.8 + 0.36 * s.num_ranks for s, _ in items]
    fig, axes = plt.subplots(len(items), 1, figsize=(width, sum(heights) + 1.2),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    fig.subplots_adjust(left=0.9 / width, right=1 - 0.2 / width, hspace=0.7,
                        bottom=0.9 / (sum(heights) + 1.2), top=1 - 0.4 / (sum(heights) + 1.2))
    for i, ((s, r), ax) in enumerate(zip(items, axes[:, 0])):
        draw_on(ax, s, r, legend=False, xmax=span, costs=costs)
        if i < len(items) - 1:
            ax.set_xlabel("")
    # one legend for everything
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLORS[(k, 0)], label=LABELS[k]) for k in "FBIW"]
    handles += [Patch(facecolor=COLORS[("F", 1)], label="lighter: direction 1"),
                Patch(facecolor="white", edgecolor="black", linewidth=1.4,
                      label="overlapped F&B pair")]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=8, frameon=False)
    if path is not None:
        try:
            save_figure(fig, path, dpi=dpi)
        finally:
            plt.close(fig)
    return fig


__all__ = ["COLORS", "draw", "draw_compare", "draw_on"]
