"""Step time of DualPipe / DualPipeV against 1F1B (and ZB1P) on the same model and micro-batches,
and the measured bubble against the one simulated from the measured step durations.

Runs on GPUs with NCCL when at least ``--ranks`` GPUs are visible, otherwise on CPU processes
with gloo (one thread each). Every method runs through the same runtime from its schedule IR;
weight gradients are deferrable (``defer_weight_grads``) so I/W steps do real work.

    python benchmarks/bench_pipeline.py --quick          # < 1 minute on CPU
    python benchmarks/bench_pipeline.py --ranks 4 --chunks 16 --hidden 512

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
    args = ap.parse_args(argv)
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
