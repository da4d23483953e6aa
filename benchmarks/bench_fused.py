"""CPU: the fused F&B engine against F then B on an MoE stage with EP over 2 gloo processes.

Each process holds two MoE stages (2 blocks each: causal attention, 8 experts split over the 2
ranks, top-2, a shared expert). One measured call is the pair "forward of micro-batch i through
stage 0, backward of micro-batch j through stage 1" (j's forward runs before, untimed): overlapped
by the engine, or F then B. Reported per size, on rank 0:

- time of the pair (median and 20/80% quantiles of ``--repeats`` calls, both ways in the same
  run) and their ratio;
- exposed communication from the engine's own timeline (host time blocked in transfer waits)
  for the fused pair;
- the same measured from a ``deeppar.profiling.capture`` trace of one pair each way: the sum of
  the ``comm.*.wait`` ranges (exposed) and of each transfer's span from its start range to the end
  of its wait (in flight), hence the hidden fraction.

2 processes share 2 cores with anything else running, so absolute figures are noisy; there is no
speed target. Usage: ``python benchmarks/bench_fused.py [--repeats N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import Timing, _quantile, ratio, write_json  # noqa: E402

#: (hidden, tokens per micro-batch as batch x seq)
SIZES = [(64, (4, 32)), (128, (4, 64)), (256, (4, 128))]
EXPERTS, TOP_K, LAYERS = 8, 2, 2


def _stats(times: list[float]) -> Timing:
    s = sorted(times)
    return Timing(_quantile(s, 0.5), _quantile(s, 0.2), _quantile(s, 0.8), len(s))


def _stages(hidden: int) -> list[torch.nn.Module]:
    from deeppar.moe.block import MoEBlock, MoEStage

    torch.manual_seed(0)
    return [MoEStage([MoEBlock(hidden, 4, 2 * hidden, EXPERTS, TOP_K,
                               shared_intermediate=hidden) for _ in range(LAYERS)])
            for _ in range(2)]


def _crit(y: torch.Tensor) -> torch.Tensor:
    return y.pow(2).mean()


def _prepare(stages, xj) -> torch.Tensor:
    """Before a pair: clear gradients, run j's forward; returns j's loss."""
    for s in stages:
        s.zero_grad(set_to_none=True)
    return _crit(stages[1](xj.clone().requires_grad_()))


def _pair(stages, xi, loss_j, engine, fused: bool) -> float:
    """One pair; returns its seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    if fused:
        engine.forward_backward(stages[0], [xi], _crit, [], stages[1], loss_j, [], [])
    else:
        _crit(stages[0](xi))
        loss_j.backward()
    return time.perf_counter() - t0


def _trace_comm(path: str) -> tuple[float, float]:
    """(exposed, in flight) communication seconds in a captured trace: the ``comm.*.wait``
    ranges, and each transfer's span from its start range to the end of its wait."""
    from deeppar.profiling import analyze_files

    phases = analyze_files(path).ranks[0].phases
    starts = {p.name: p.cpu_start_us for p in phases
              if p.name.startswith("comm.") and not p.name.endswith(".wait")}
    exposed = flight = 0.0
    for p in phases:
        if p.name.startswith("comm.") and p.name.endswith(".wait"):
            exposed += p.cpu_dur_us
            start = starts.get(p.name[:-len(".wait")])
            if start is not None:
                flight += p.cpu_start_us + p.cpu_dur_us - start
    return exposed * 1e-6, flight * 1e-6


def _worker(rank: int, world: int, port: int, repeats: int, out: str, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=300))
    from deeppar.pipeline.fused import FusedEngine
    from deeppar.profiling import capture

    rows = []
    for hidden, (batch, seq) in SIZES:
        stages = _stages(hidden)
        g = torch.Generator().manual_seed(rank)
        xi, xj = (torch.randn(batch, seq, hidden, generator=g) for _ in range(2))
        engine = FusedEngine()
        times: dict[bool, list[float]] = {True: [], False: []}
        waited: list[float] = []
        for i in range(repeats + 2):
            for fused in (True, False):
                loss_j = _prepare(stages, xj)
                engine.timeline.clear()
                t = _pair(stages, xi, loss_j, engine, fused)
                if i >= 2:
                    times[fused].append(t)
                    if fused:
                        waited.append(sum(e.waited for e in engine.timeline))
        traced = {}
        for fused in (True, False):
            path = os.path.join(out, f"h{hidden}_{'fused' if fused else 'plain'}_r{rank}.json")
            # the profiler's warm-up step is j's forward, its active step the pair alone
            with capture(path, steps=1, warmup=1, analyze=False) as prof:
                loss_j = _prepare(stages, xj)
                prof.step()
                _pair(stages, xi, loss_j, engine, fused)
                prof.step()
            traced[fused] = _trace_comm(path)
        rows.append({
            "hidden": hidden, "tokens_per_microbatch": batch * seq, "experts": EXPERTS,
            "top_k": TOP_K, "layers": LAYERS, "ranks": world,
            "fused": _stats(times[True]).__dict__, "f_then_b": _stats(times[False]).__dict__,
            "fused_exposed_comm_s": sorted(waited)[len(waited) // 2],
            "trace_fused_exposed_s": traced[True][0], "trace_fused_in_flight_s": traced[True][1],
            "trace_plain_exposed_s": traced[False][0],
            "trace_plain_in_flight_s": traced[False][1],
        })
    q.put((rank, rows))
    dist.destroy_process_group()


def run(repeats: int = 10) -> list[dict]:
    """Spawn the 2 gloo processes, measure every size, print the table; rank 0's rows."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_worker, args=(r, 2, port, repeats, out, q))
                 for r in range(2)]
        for p in procs:
            p.start()
        results = dict(q.get(timeout=1800) for _ in procs)
        for p in procs:
            p.join()
    rows = results[0]
    print(f"MoE stage, EP over 2 gloo processes, 1 thread each; {LAYERS} blocks, {EXPERTS} "
          f"experts top-{TOP_K}, fp32; pair = F(i) + B(j) on rank 0")
    print(f"{'hidden':>6} {'tokens':>6} {'F then B ms':>12} {'fused ms':>9} {'speed-up':>9} "
          f"{'exposed ms (engine)':>20} {'trace: plain exposed':>21} {'fused exposed':>14} "
          f"{'fused hidden':>13}")
    for r in rows:
        plain, fused = r["f_then_b"]["median"], r["fused"]["median"]
        flight = r["trace_fused_in_flight_s"]
        hidden_frac = 1 - r["trace_fused_exposed_s"] / flight if flight else 0.0
        print(f"{r['hidden']:>6} {r['tokens_per_microbatch']:>6} {plain * 1e3:>12.2f} "
              f"{fused * 1e3:>9.2f} {ratio(plain, fused):>9} "
              f"{r['fused_exposed_comm_s'] * 1e3:>20.3f} "
              f"{r['trace_plain_exposed_s'] * 1e3:>18.3f} ms "
              f"{r['trace_fused_exposed_s'] * 1e3:>11.3f} ms {hidden_frac:>12.0%}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", default=str(Path(__file__).with_name("bench_fused.json")))
    args = ap.parse_args(argv)
    write_json(args.json, {"benchmark": "fused_fb_cpu", "rows": run(args.repeats)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
