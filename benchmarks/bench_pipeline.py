"""Step time of deeppar's DualPipeV and ZBV against torch.distributed.pipelining's
``ScheduleDualPipeV`` and ``ScheduleZBVZeroBubble`` on the same stages (losses checked equal),
and (``--methods-table``) of DualPipe / DualPipeV against 1F1B (and ZB1P) with the measured
bubble against the one simulated from the measured step durations.

Torch comparison (default): 2 ranks, stages of 3 x (Linear + GELU) of width ``--sizes``
(256 and 1024), micro-batches of 8 rows, 8 micro-batches per step; both sides defer the weight
gradients of the I steps to W steps. Columns: ``torch ms`` and ``deeppar ms`` (median step over
rounds that alternate the two), ``deeppar/torch`` (< 1 is faster), ``cpu ms`` (CPU time of
rank 0's process per step: the work done, less sensitive than wall time to a loaded machine).

Runs on GPUs with NCCL when at least ``--ranks`` GPUs are visible, otherwise on CPU processes
with gloo (one thread each). Every method runs through the same runtime from its schedule IR;
weight gradients are deferrable (``defer_weight_grads``) so I/W steps do real work.

    python benchmarks/bench_pipeline.py                  # torch comparison, ~1 minute on CPU
    python benchmarks/bench_pipeline.py --methods-table --quick
    python benchmarks/bench_pipeline.py --methods-table --ranks 4 --chunks 16 --hidden 512

Columns: ``step ms`` (median over the timed steps), ``vs 1f1b`` (1F1B's step time divided by
this method's, > 1 is faster), ``bubble meas`` (1 - busy / (ranks * makespan) of the recorded
timeline), ``bubble sim`` (the simulator's bubble fraction replaying the measured durations with
the schedule's dependencies and no communication cost), ``param/dev`` (parameters per rank).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _timing import measure, write_json  # noqa: E402

METHODS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def make_blocks(n: int, d: int, device: torch.device) -> list[nn.Module]:
    torch.manual_seed(0)
    return [Block(d).to(device) for _ in range(n)]


def local_stages(method: str, blocks: list[nn.Module], P: int, rank: int) -> list[nn.Module]:
    """This rank's stages of the same model (``blocks``) for ``method``."""
    from deeppar.pipeline import defer_weight_grads

    def stage(k: int, n_stages: int) -> nn.Module:
        per = len(blocks) // n_stages
        return defer_weight_grads(nn.Sequential(*blocks[k * per:(k + 1) * per]))

    if method in ("1f1b", "zb1p"):
        return [stage(rank, P)]
    if method == "dualpipe":
        import copy

        return [stage(rank, P), copy.deepcopy(stage(P - 1 - rank, P))]
    return [stage(rank, 2 * P), stage(2 * P - 1 - rank, 2 * P)]


def _inputs(method: str, P: int, rank: int, x: torch.Tensor, y: torch.Tensor):
    if method == "dualpipe":
        half = x.shape[0] // 2
        if rank == 0:
            return x[:half], y[half:]
        if rank == P - 1:
            return x[half:], y[:half]
        return None, None
    first = 0
    last = 0 if method == "dualpipev" else P - 1
    return (x if rank == first else None), (y if rank == last else None)


def worker(rank: int, P: int, port: int, args: argparse.Namespace, q) -> None:
    from deeppar.pipeline import PipelineRuntime, simulate
    from deeppar.pipeline.timeline import bubble, to_measured_costs

    cuda = args.backend == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=P, timeout=timedelta(seconds=120))
    n_blocks = 2 * P * args.blocks
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.chunks * args.mb, args.seq, args.hidden, generator=g).to(device)
    y = torch.randn(args.chunks * args.mb, args.seq, args.hidden, generator=g).to(device)
    rows = []
    for method in args.methods:
        blocks = make_blocks(n_blocks, args.hidden, device)
        stages = local_stages(method, blocks, P, rank)
        pipe = PipelineRuntime(stages, method=method, record_timeline=True, device=device)
        inp, lab = _inputs(method, P, rank, x, y)
        times = []
        for i in range(args.warmup + args.steps):
            pipe.zero_grad(set_to_none=True)
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            pipe.step(inp, num_chunks=args.chunks, criterion=F.mse_loss, labels=(lab,))
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        steps = pipe.gather_timeline()
        if rank == 0:
            sched = pipe.schedule(args.chunks)
            sim = simulate(sched, to_measured_costs(steps))
            meas = bubble(steps)
            rows.append({
                "method": method,
                "step_ms": statistics.median(times) * 1e3,
                "bubble_meas": meas["bubble_fraction"],
                "bubble_sim": sum(sim.bubble) / (P * sim.makespan) if sim.makespan else 0.0,
                "params": sum(p.numel() for s in stages for p in s.parameters()),
            })
        del pipe, stages, blocks
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


# ------------------------------------------------------------------ against torch.pipelining
#: (deeppar method, torch schedule class name) compared on the same stages
PAIRS = (("dualpipev", "ScheduleDualPipeV"), ("zbv", "ScheduleZBVZeroBubble"))


def linear_gelu_stage(d: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(d, d), nn.GELU())])


def torch_worker(rank: int, P: int, port: int, args: argparse.Namespace, q) -> None:
    """Every size and pair on one gloo group: deeppar and torch steps alternate in rounds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=P, timeout=timedelta(seconds=300))
    rows = []
    for d in args.sizes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.chunks * args.mb, d, generator=g)
        y = torch.randn(args.chunks * args.mb, d, generator=g)
        for method, torch_name in PAIRS:
            row = compare_pair(rank, P, args, x, y, method, torch_name)
            if rank == 0:
                rows.append(row)
    if rank == 0:
        q.put(rows)
    dist.destroy_process_group()


def compare_pair(rank: int, P: int, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor,
                 method: str, torch_name: str) -> dict:
    """One deeppar method against one torch schedule on copies of the same stages."""
    import copy

    from torch.distributed.pipelining import PipelineStage, schedules

    from deeppar.pipeline import PipelineRuntime, defer_weight_grads

    d = x.shape[-1]
    ids = (rank, 2 * P - 1 - rank)  # V placement: rank 0 holds the first and last stage
    mods = [linear_gelu_stage(d, k) for k in ids]
    ours = PipelineRuntime([defer_weight_grads(copy.deepcopy(m)) for m in mods], method=method)
    stages = [PipelineStage(copy.deepcopy(m), k, 2 * P, torch.device("cpu"))
              for m, k in zip(mods, ids)]
    theirs = getattr(schedules, torch_name)(stages, n_microbatches=args.chunks,
                                             loss_fn=F.mse_loss, scale_grads=False)
    losses: dict[str, torch.Tensor | None] = {}

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        loss, _ = ours.step(x if rank == 0 else None, num_chunks=args.chunks,
                            criterion=F.mse_loss, labels=(y if rank == 0 else None,))
        losses["deeppar"] = loss
        dist.barrier()

    def step_theirs() -> None:
        for st in stages:
            st.submod.zero_grad(set_to_none=True)
        got: list[torch.Tensor] = []
        if rank == 0:
            theirs.step(x, target=y, losses=got)
        else:
            theirs.step()
        losses["torch"] = torch.stack(got) if got else None
        dist.barrier()

    step_ours()
    step_theirs()
    a, b = losses["deeppar"], losses["torch"]
    if rank == 0 and (a is None or b is None or not torch.allclose(a, b, rtol=0, atol=1e-6)):
        raise AssertionError(f"{method} vs {torch_name} at hidden {d}: losses differ: "
                             f"{a} vs {b}")
    medians: dict[str, list[float]] = {"deeppar": [], "torch": []}
    cpu: dict[str, list[float]] = {"deeppar": [], "torch": []}
    order = (("deeppar", step_ours), ("torch", step_theirs))
    for r in range(args.rounds):
        for name, fn in (order if r % 2 == 0 else order[::-1]):
            c0 = time.process_time()
            medians[name].append(measure(fn, repeats=args.steps, warmup=1).median)
            cpu[name].append((time.process_time() - c0) / (args.steps + 1))
    ms = {k: statistics.median(v) * 1e3 for k, v in medians.items()}
    cpu_ms = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
    return {"hidden": d, "method": method, "torch_schedule": torch_name,
            "torch_ms": ms["torch"], "deeppar_ms": ms["deeppar"],
            "ratio": ms["deeppar"] / ms["torch"],
            "torch_cpu_ms": cpu_ms["torch"], "deeppar_cpu_ms": cpu_ms["deeppar"],
            "losses_equal": bool(a is not None and b is not None and torch.equal(a, b))}


def _spawn(target, nprocs: int, args: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, nprocs, port, args, q), daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    try:
        return q.get(timeout=900)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def compare_with_torch(args: argparse.Namespace) -> int:
    rows = _spawn(torch_worker, 2, args)
    print(f"deeppar vs torch.distributed.pipelining: 2 gloo ranks (1 thread each), stages of "
          f"3 x (Linear+GELU), {args.chunks} micro-batches of {args.mb} rows, torch "
          f"{torch.__version__}; median of {args.rounds} rounds x {args.steps} steps")
    print(f"{'hidden':>6} {'deeppar':<10} {'torch schedule':<22} {'torch ms':>9} "
          f"{'deeppar ms':>10} {'deeppar/torch':>13} {'cpu ms torch':>12} {'deeppar':>8} "
          f"{'losses':>7}")
    for r in rows:
        print(f"{r['hidden']:>6} {r['method']:<10} {r['torch_schedule']:<22} "
              f"{r['torch_ms']:>9.2f} {r['deeppar_ms']:>10.2f} {r['ratio']:>12.2f}x "
              f"{r['torch_cpu_ms']:>12.2f} {r['deeppar_cpu_ms']:>8.2f} "
              f"{'equal' if r['losses_equal'] else 'close':>7}")
    if args.json:
        write_json(args.json, {"benchmark": "pipeline_vs_torch", "torch": torch.__version__,
                               "chunks": args.chunks, "mb": args.mb, "rows": rows})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--chunks", type=int, default=16, help="micro-batches per step")
    ap.add_argument("--mb", type=int, default=2, help="micro-batch size")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=1, help="blocks per DualPipeV stage")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--quick", action="store_true", help="small run, < 1 minute on CPU")
    ap.add_argument("--methods-table", action="store_true",
                    help="deeppar's methods against 1F1B instead of the torch comparison")
    ap.add_argument("--sizes", default="256,1024",
                    help="torch comparison: stage widths (comma-separated)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="torch comparison: alternating timing rounds")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if not args.methods_table:
        args.sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
        if argv is None or "--chunks" not in argv:
            args.chunks = 8
        if argv is None or "--mb" not in argv:
            args.mb = 8
        if args.quick:
            args.sizes, args.rounds, args.steps = [256], 2, 3
        return compare_with_torch(args)
    if args.quick:
        args.ranks, args.chunks, args.hidden, args.seq, args.steps = 2, 8, 128, 16, 2
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if "1f1b" not in args.methods:
        args.methods.insert(0, "1f1b")
    if args.ranks < 2 or args.ranks % 2:
        ap.error("--ranks must be even and >= 2 (DualPipe pairs ranks)")
    if args.chunks < 2 * args.ranks or args.chunks % 2:
        ap.error("--chunks must be even and >= 2 * ranks")
    args.backend = "nccl" if torch.cuda.device_count() >= args.ranks else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args, q), daemon=True)
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    try:
        rows = q.get(timeout=600)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    dev = "GPU/NCCL" if args.backend == "nccl" else "CPU/gloo (1 thread per rank)"
    print(f"ranks={args.ranks} chunks={args.chunks} mb={args.mb} seq={args.seq} "
          f"hidden={args.hidden} blocks={2 * args.ranks * args.blocks} on {dev}")
    base = next(r["step_ms"] for r in rows if r["method"] == "1f1b")
    print(f"{'method':<10} {'step ms':>9} {'vs 1f1b':>8} {'bubble meas':>12} {'bubble sim':>11} "
          f"{'param/dev':>10}")
    for r in rows:
        print(f"{r['method']:<10} {r['step_ms']:>9.1f} {base / r['step_ms']:>8.2f} "
              f"{r['bubble_meas']:>12.3f} {r['bubble_sim']:>11.3f} {r['params']:>10d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
