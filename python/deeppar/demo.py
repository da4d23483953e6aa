"""``deeppar demo``: the main job on its built-in defaults, end to end on this machine.

It reports what the installation can do, then runs each area that is present on a built-in
default input and writes its pictures and reports under ``--out`` (default ``out/demo``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))


def _info(out: Path) -> None:
    from deeppar._info import collect_info, format_info

    print(format_info(collect_info()))


def _cli(*argv: str) -> None:
    """Run one ``deeppar`` command as a user would type it (echoed first)."""
    from deeppar.cli import main

    print("$ deeppar " + " ".join(argv))
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"demo: 'deeppar {' '.join(argv)}' failed with exit code {code}")


def _eplb(out: Path) -> None:
    # DeepSeek-V3 prefill: 58 layers, 256 experts in 8 groups, 288 slots on 4 nodes x 8 GPUs.
    _cli("eplb", "plan", "--demo", "--out", str(out / "eplb_plan.json"),
         "--png", str(out / "eplb_plan.png"))


def _schedules(out: Path) -> None:
    _cli("schedule", "compare", "--ranks", "8", "--chunks", "20",
         "--png", str(out / "schedules_compare.png"))
    _cli("schedule", "simulate", "--method", "dualpipe", "--ranks", "8", "--chunks", "20",
         "--F", "1", "--B", "2", "--W", "1", "--FB", "2.5")


def _dualpipev_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One rank of the DualPipeV demo: a 4-stage MLP on 2 gloo processes (CPU)."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from deeppar.pipeline import DualPipeV, defer_weight_grads, simulate
    from deeppar.pipeline.timeline import to_measured_costs, write_chrome_trace
    from deeppar.profiling import capture

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    hidden, batch, chunks = 1024, 256, 2 * world * 2
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()) for _ in range(2 * world)]
    reference = [nn.Sequential(*(s[i] for i in range(len(s)))) for s in stages]
    local = (stages[rank], stages[2 * world - 1 - rank])
    pipe = DualPipeV(tuple(defer_weight_grads(m) for m in local), record_timeline=True)
    x, y = torch.randn(batch, hidden), torch.randn(batch, hidden)
    criterion = nn.MSELoss()
    inputs, labels = ((x,), (y,)) if rank == 0 else ((), ())

    def train_step() -> torch.Tensor | None:
        for stage in local:
            stage.zero_grad()
        loss, _ = pipe.step(*inputs, num_chunks=chunks, criterion=criterion, labels=labels)
        return loss

    with capture(Path(out) / f"dualpipev_rank{rank}.json", steps=1, warmup=1) as prof:
        for _ in range(prof.total_steps):  # the first step also discovers the p2p shapes
            train_step()
            prof.step()
    loss = train_step()  # unprofiled, for the timeline
    timeline = pipe.gather_timeline()
    if rank == 0:
        with torch.no_grad():
            want = torch.stack([
                criterion(torch.nn.Sequential(*reference)(xc), yc)
                for xc, yc in zip(x.chunk(chunks), y.chunk(chunks))
            ])
        same = torch.equal(loss, want)
        print(f"DualPipeV, 2 ranks x 2 stages, {chunks} micro-batches: losses "
              f"{'bit-identical to' if same else 'DIFFERENT FROM'} the sequential model")
        print(f"weight-gradient work deferred into W steps: "
              f"{pipe.weight_grad_store.executed} closures")
        write_chrome_trace(pipe.schedule(chunks), timeline,
                           str(Path(out) / "dualpipev_timeline.json"))
        sim = simulate(pipe.schedule(chunks), to_measured_costs(timeline))
        busy = {r: sum(t.duration for t in timeline if t.rank == r) for r in range(world)}
        span = max(t.end for t in timeline) - min(t.start for t in timeline)
        for r in range(world):
            print(f"rank {r}: measured bubble {1 - busy[r] / span:.2f} of the step, "
                  f"simulated from the measured durations {sim.bubble[r] / sim.makespan:.2f}")
        print("(the measured bubble also holds p2p waits and Python time between steps, which "
              "the simulation leaves out)")
        dev = prof.report.ranks[0]
        print(f"profiled step written to {prof.path} ({len(dev.devices)} GPU device(s) in it: "
              "on a CPU machine the trace has no GPU kernels to analyze)")
        if not same:
            raise SystemExit("demo: DualPipeV losses differ from the sequential model")
    dist.destroy_process_group()


def _runtime(out: Path) -> None:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_dualpipev_worker, args=(2, str(Path(tmp) / "init"), str(out)), nprocs=2)


def _trace(out: Path) -> None:
    from deeppar.data import sample_trace

    trace = sample_trace()
    # Backward kernels are launched from autograd's thread, outside the annotated ranges:
    # --phase-fallback gives them to the range open on the main thread at that time.
    _cli("trace", "analyze", str(trace), "--phase-fallback",
         "--png", str(out / "deepseek_trace_timeline.png"),
         "--html", str(out / "deepseek_trace_timeline.html"))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (title, module that must exist, runner)
_STEPS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("installation", "deeppar._info", _info),
    ("EPLB: expert replicas for DeepSeek-V3 prefill", "deeppar.eplb.cli", _eplb),
    ("pipeline schedules: 8 ranks, 20 micro-batches", "deeppar.pipeline.cli", _schedules),
    ("DualPipeV on 2 CPU processes (gloo), profiled", "deeppar.pipeline.runtime", _runtime),
    ("profiling: DeepSeek-V3 training trace", "deeppar.profiling.cli", _trace),
]


def run_demo(out: Path) -> int:
    """Run every available demo step, writing artefacts under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for title, module, step in _STEPS:
        if not _has(module):
            continue
        _section(title)
        start = time.perf_counter()
        step(out)
        print(f"[{title}: {time.perf_counter() - start:.1f} s]")
    print(f"\nartefacts in {out}/")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from deeppar._io import require_matplotlib

    require_matplotlib("the demo's pictures")  # one clear line now, not a traceback later
    return run_demo(Path(args.out))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    from deeppar._io import OUTPUT_POLICY

    p = subparsers.add_parser("demo", help="run the built-in end-to-end demo",
                              epilog=OUTPUT_POLICY)
    p.add_argument("--out", default="out/demo",
                   help="folder for pictures and reports (created if missing)")
    p.set_defaults(func=_cmd_demo)
