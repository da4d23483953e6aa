"""``deeppar demo``: train a small DeepSeek-style MoE with DualPipe, expert parallelism, EPLB
and profiling, as one system, on 4 local processes (a PP 2 x EP 2 grid).

The same training runs under ``torchrun`` (``examples/train_moe.py``): :func:`main_process`
is what every process runs; the demo only spawns the processes itself.

Modules: :mod:`.config` (sizes and pieces), :mod:`.layout` (rank grid and groups),
:mod:`.task` (synthetic next-token data), :mod:`.model` (MoE transformer stages),
:mod:`.train` (one process of the run), :mod:`.reference` (the one-process check),
:mod:`.report` (progress, summary, pictures).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .config import TrainConfig, add_arguments, from_args

DESCRIPTION = """\
Train a small DeepSeek-style MoE transformer on a synthetic next-token task as one system, on
pp x ep local processes (default 4: PP 2 x EP 2; gloo on CPU, NCCL with a GPU per process):

  1. DualPipe over the pipeline ranks, every overlapped F&B pair run by the fused engine, the
     routed experts sharded over the expert-parallel ranks (their all-to-alls overlapped);
  2. the first step checked against the same model run in one process (--no-check: skip);
  3. EPLB after --rebalance-at steps: loads recorded from the routers, deepseek, balanced and
     migration-aware plans, expert weights moved between ranks, losses checked unchanged;
  4. the last step profiled and analysed (--no-profile: skip);
  5. the measured step replayed by the schedule simulator;
  6. a summary, summary.json and pictures in --out (exit status 1 if a check fails).

The same training runs under torchrun: examples/train_moe.py."""


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)), flush=True)


def finish(result, out: Path) -> bool:
    """Process 0 after training: the checks, the summary table, ``summary.json`` and the
    pictures. Returns whether every claim of the run holds."""
    from deeppar._io import write_json

    from .report import claims, draw_losses, draw_schedule, summary_json, summary_lines

    if result.first_step is not None:
        _section("first step against the same model in one process")
        for line in result.first_step.lines():
            print(line)

    if result.eplb:
        _section(f"EPLB after step {result.eplb['step']} (deeppar.eplb)")
        for line in result.eplb["lines"]:
            print(line)
    if result.profile:
        _section("profiled step (deeppar.profiling)")
        for line in result.profile["lines"]:
            print(line)
    _section("summary")
    for line in summary_lines(result):
        print(line)
    _section("pictures")
    files = list(result.files)
    path = out / "loss.png"
    draw_losses(result, path)
    files.insert(0, ("loss curve", str(path)))
    if result.timeline:
        path = out / "schedule_timeline.png"
        draw_schedule(result, path)
        files.insert(1, ("DualPipe step as run and simulated", str(path)))
    if result.eplb:
        from deeppar.eplb.plot import draw_plan

        path = out / "eplb_placement.png"
        draw_plan(result.eplb["plan"], path)
        files.insert(2, ("EPLB placement before/after the move", str(path)))
    path = out / "summary.json"
    write_json(path, summary_json(result), indent=1, what="the run's summary")
    files.append(("losses, checks and figures (JSON)", str(path)))
    for what, p in files:
        print(f"  {what:<38} {p}")
    failed = [name for name, ok in claims(result).items() if not ok]
    if failed:
        print(f"\nFAILED: {'; '.join(failed)}")
    print(flush=True)
    return not failed


def main_process(cfg: TrainConfig, out: str) -> bool:
    """What every process runs (under torchrun or spawned by the demo). Returns False on
    process 0 when a claim of the run does not hold."""
    from .train import train

    result = train(cfg, out)
    return finish(result, Path(out)) if result is not None else True


def run_demo(cfg: TrainConfig, out: Path) -> int:
    """Spawn ``cfg.world`` local processes and train."""
    from .layout import spawn_local

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _section(f"MoE training on {cfg.world} local processes (PP {cfg.pp} x EP {cfg.ep})")
    print(f"model: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.experts} routed experts "
          f"(top-{cfg.top_k}, {cfg.n_group} groups, {cfg.topk_group} per token) + "
          f"{cfg.shared_experts} shared; {cfg.steps} steps of {cfg.chunks} micro-batches x "
          f"{cfg.micro_batch} sequences x {cfg.seq} tokens per data shard", flush=True)
    summary = out / "summary.json"
    if summary.exists():
        summary.unlink()  # a stale one must not pass for this run's
    spawn_local(cfg.world, main_process, cfg, str(out))
    print(f"[demo: {time.perf_counter() - start:.1f} s; artefacts in {out}/]")
    failed = [k for k, ok in json.loads(summary.read_text())["claims"].items() if not ok]
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from deeppar._io import require_matplotlib

    require_matplotlib("the demo's pictures")  # one clear line now, not a traceback later
    return run_demo(from_args(args), Path(args.out))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    import textwrap

    from deeppar._io import OUTPUT_POLICY

    p = subparsers.add_parser(
        "demo", help="train a small MoE with DualPipe, expert parallelism, EPLB and profiling",
        description=DESCRIPTION, epilog=textwrap.fill(OUTPUT_POLICY, 92),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="folder for pictures and reports "
                   "(created if missing)")
    add_arguments(p)
    p.set_defaults(func=_cmd_demo)


__all__ = ["TrainConfig", "add_arguments", "finish", "from_args", "main_process", "register",
           "run_demo"]
