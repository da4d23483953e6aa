"""What the training run shows: a progress bar while it trains, then a summary table and the
pictures in the output folder (each path printed)."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import TrainConfig


class Progress:
    """A plain-text progress bar with the loss of each step: redrawn in place on a terminal,
    one line per step otherwise (logs, pipes)."""

    def __init__(self, total: int, width: int = 24, stream: Any = None) -> None:
        self.total, self.width = total, width
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()

    def update(self, done: int, loss: float, seconds: float, note: str = "") -> None:
        fill = round(self.width * done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        line = (f"step {done:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} "
                f"({seconds * 1e3:.0f} ms){'  ' + note if note else ''}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"trained in {time.perf_counter() - self.start:.1f} s\n")
        self.stream.flush()


@dataclass
class RunResult:
    """Everything process 0 learnt from the run, for the summary and the pictures."""

    config: TrainConfig
    layout: str
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    first_step: Any = None  # reference.FirstStepCheck
    eplb: Any = None  # rebalance outcome (dict)
    profile: Any = None  # profiled-step outcome (dict)
    schedule: Any = None  # the DualPipe schedule that ran
    timeline: list[Any] = field(default_factory=list)  # measured TimedSteps, microseconds
    missing: list[str] = field(default_factory=list)  # pieces this installation lacks
    files: list[tuple[str, str]] = field(default_factory=list)  # (what, path)


def eplb_outcome(step: int, loads: Any, plans: dict[str, Any], before: dict, after: dict,
                 moved_slots: int, moved_bytes: int) -> dict[str, Any]:
    """What the rebalance did, as lines to print and a summary row."""
    mig = plans["migration"]
    identical = bool(before) and before == after and all(
        a == b for a, b in ((before[k], after[k]) for k in before))
    total = [int(loads.sum().item()), loads.shape[0], loads.shape[1]]
    lines = [f"loads recorded over {step} steps: {total[0]} token choices, {total[1]} layers x "
             f"{total[2]} experts (per-layer max/min expert load "
             f"{float((loads.max(1).values / loads.min(1).values.clamp_min(1)).mean()):.2f})",
             f"deepseek plan (from scratch): balancedness {plans['deepseek'].balancedness:.4f} "
             f"(bound {plans['deepseek'].balancedness_bound:.4f})"]
    if plans.get("balanced") is not None:
        b = plans["balanced"]
        lines.append(f"balanced plan (from scratch): balancedness {b.balancedness:.4f}")
    else:
        lines.append("balanced plan: not available in this installation")
    lines.append("migration-aware plan from the placement in use (the one applied):")
    lines += [f"  {line}" for line in mig.summary().splitlines()]
    lines.append(f"expert weights and their Adam state moved between ranks: {moved_slots} "
                 f"slots received over all processes ({moved_bytes} bytes), all or nothing")
    lines.append(f"held-out losses before and after the move: "
                 f"{'bit-identical' if identical else 'DIFFERENT'} ({len(before)} micro-batches)")
    summary = (f"balancedness {mig.balancedness_current:.3f} -> {mig.balancedness:.3f}, "
               f"{int(mig.moved.sum())} replicas moved (from scratch "
               f"{int(mig.moved_scratch.sum())}), losses "
               f"{'unchanged' if identical else 'CHANGED'} by the move")
    return {"step": step, "lines": lines, "summary": summary, "identical": identical,
            "balancedness_before": mig.balancedness_current,
            "balancedness_after": mig.balancedness, "moved": int(mig.moved.sum())}


def _ms(steps: list[Any], unit_ms: float = 1.0) -> list[Any]:
    """Measured steps (microseconds) in units of ``unit_ms`` milliseconds."""
    from deeppar.pipeline.simulate import TimedStep

    k = 1e3 * unit_ms
    return [TimedStep(s.rank, s.index, s.step, s.start / k, s.end / k) for s in steps]


def measured_result(schedule: Any, steps: list[Any], unit_ms: float = 1.0) -> Any:
    """The measured timeline as a :class:`~deeppar.pipeline.simulate.SimResult` (in units of
    ``unit_ms`` milliseconds), so the schedule pictures can draw the step as it ran."""
    from deeppar.pipeline.simulate import SimResult, peak_activations

    steps = sorted(_ms(steps, unit_ms), key=lambda t: (t.start, t.rank))
    ranks = schedule.num_ranks
    makespan = max((s.end for s in steps), default=0.0)
    busy = [sum(s.duration for s in steps if s.rank == r) for r in range(ranks)]
    return SimResult(schedule, makespan, busy, [makespan - b for b in busy],
                     [peak_activations(schedule, r) for r in range(ranks)], steps)


def simulated_result(schedule: Any, steps: list[Any], unit_ms: float = 1.0) -> Any:
    """The schedule replayed by the simulator with the measured step durations (in units of
    ``unit_ms`` milliseconds)."""
    from deeppar.pipeline import simulate
    from deeppar.pipeline.timeline import to_measured_costs

    return simulate(schedule, to_measured_costs(_ms(steps, unit_ms)))


def draw_losses(result: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from deeppar._io import save_figure

    fig, ax = plt.subplots(figsize=(7, 3.6))
    try:
        steps = list(range(1, len(result.losses) + 1))
        ax.plot(steps, result.losses, marker="o", markersize=3, label="training loss")
        if result.eplb and result.eplb.get("step"):
            ax.axvline(result.eplb["step"] + 0.5, color="tab:red", linestyle="--",
                       label="EPLB: experts moved")
        ax.set_xlabel("step")
        ax.set_ylabel("next-token cross-entropy")
        c = result.config
        ax.set_title(f"MoE {c.layers} layers x {c.experts} experts, DualPipe PP {c.pp} x "
                     f"EP {c.ep}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)


def draw_schedule(result: RunResult, path: Path) -> tuple[Any, Any]:
    """The step as it ran (measured) above the simulator's replay of the same durations."""
    import matplotlib.pyplot as plt

    from deeppar._io import save_figure
    from deeppar.pipeline.draw import draw_compare

    span_ms = max(s.end for s in result.timeline) / 1e3
    # a time unit that keeps the picture readable (draw_compare sizes it by the span)
    unit = next(u for u in (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, float("inf"))
                if span_ms / u <= 60 or u == float("inf"))
    unit = unit if unit != float("inf") else span_ms / 60
    measured = measured_result(result.schedule, result.timeline, unit)
    simulated = simulated_result(result.schedule, result.timeline, unit)
    fig = draw_compare([(result.schedule, measured), (result.schedule, simulated)])
    try:
        axes = fig.axes
        axes[0].set_title(f"DualPipe step as run, {result.config.chunks} micro-batches: "
                          f"makespan {measured.makespan * unit:.1f} ms", fontsize=10, loc="left")
        axes[1].set_title(f"simulated from the measured step durations: makespan "
                          f"{simulated.makespan * unit:.1f} ms", fontsize=10, loc="left")
        axes[-1].set_xlabel(f"time (units of {unit:g} ms)")
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return measured, simulated


def claims(result: RunResult) -> dict[str, bool]:
    """The run's checkable claims (only those of the pieces that ran)."""
    out: dict[str, bool] = {}
    if len(result.losses) >= 2:
        out["loss falls"] = result.losses[-1] < result.losses[0]
    if result.first_step is not None:
        out["first step losses bit-identical to one process"] = \
            result.first_step.losses_identical
        out["first step gradients match one process"] = result.first_step.ok
    if result.eplb:
        out["losses unchanged by the expert move"] = result.eplb["identical"]
    return out


def summary_json(result: RunResult) -> dict[str, Any]:
    """What ``summary.json`` holds: the claims and the figures behind them."""
    data: dict[str, Any] = {"layout": result.layout, "losses": result.losses,
                            "step_seconds": result.step_seconds, "claims": claims(result),
                            "missing": result.missing}
    if result.first_step is not None:
        fs = result.first_step
        data["first_step"] = {"losses": fs.losses, "losses_identical": fs.losses_identical,
                              "max_loss_diff": fs.max_loss_diff, "grads": fs.grads,
                              "max_cos_distance": fs.max_cos_distance, "ok": fs.ok}
    if result.eplb:
        data["eplb"] = {k: v for k, v in result.eplb.items() if k not in ("plan", "lines")}
    if result.profile:
        data["profile"] = {"summary": result.profile["summary"],
                           "engine_overlap": result.profile["overlap"],
                           "gpu": result.profile["gpu"]}
    if result.timeline:
        data["step_ms"] = {"measured": measured_result(result.schedule,
                                                       result.timeline).makespan,
                           "simulated": simulated_result(result.schedule,
                                                         result.timeline).makespan}
    return data


def summary_lines(result: RunResult) -> list[str]:
    """The summary table, one claim per row with what shows it."""
    rows: list[tuple[str, str]] = []
    if result.losses:
        first, last = result.losses[0], result.losses[-1]
        rows.append(("training loss", f"{first:.3f} -> {last:.3f} in {len(result.losses)} "
                                      f"steps ({'falls' if last < first else 'DOES NOT FALL'})"))
    fs = result.first_step
    if fs is not None:
        rows.append(("first step vs one process", ("losses bit-identical" if fs.losses_identical
                                                   else "losses DIFFER")
                     + f", grads max cos dist {fs.max_cos_distance:.1e}"))
    if result.eplb:
        e = result.eplb
        rows.append((f"EPLB after step {e['step']}", e["summary"]))
        if "after_move" in e:
            a = e["after_move"]
            rows.append(("loads after the move", f"balancedness {a['old_placement']:.3f} "
                         f"under the old placement, {a['new_placement']:.3f} under the new"))
    if result.profile:
        rows.append(("profiled step", result.profile["summary"]))
    if result.timeline:
        measured = measured_result(result.schedule, result.timeline)
        simulated = simulated_result(result.schedule, result.timeline)
        rows.append(("step: measured vs simulated", f"{measured.makespan:.1f} ms vs "
                     f"{simulated.makespan:.1f} ms (ratio "
                     f"{measured.makespan / max(simulated.makespan, 1e-9):.2f})"))
    for what in result.missing:
        rows.append(("not in this installation", what))
    width = max((len(a) for a, _ in rows), default=0)
    return [f"  {a:<{width}}  {b}" for a, b in rows]


__all__ = ["Progress", "RunResult", "claims", "draw_losses", "draw_schedule", "eplb_outcome",
           "measured_result", "simulated_result", "summary_json", "summary_lines"]
