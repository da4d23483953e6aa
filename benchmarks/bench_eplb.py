"""Benchmark of the EPLB planner backends at the spec's sizes.

Prints, per shape, the median time of ``rebalance_experts`` end to end (argument checks,
planning and ``log2phy`` included; host-observed: on GPU each call is followed by a
synchronize) for each backend, its speed-up over the reference backend measured in the same
run, and the plan's balancedness (mean / max GPU load, averaged over layers) with the spec's
upper bound. Native CPU backends are timed with each intra-op thread count of ``--threads``
(wall time), and their single-thread CPU time per call is printed beside (less disturbed than
wall time when other jobs share the cores); the load average is printed before and after.
Where a GPU is present the GPU backends (``cuda``, ``triton``) run on CUDA tensors; Triton on
the CPU (its interpreter) is only for tests and is left out unless named in ``--backends``.
The rows also go to a JSON file.

    PYTHONPATH=python OMP_WAIT_POLICY=passive python benchmarks/bench_eplb.py \
        [--backends cpu,reference] [--threads 1,2] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import measure, ratio, write_json  # noqa: E402

import deeppar.eplb as eplb  # noqa: E402

# name, (layers, experts, replicas, groups, nodes, gpus)
SHAPES = [
    ("DeepSeek-V3 prefill", (58, 256, 288, 8, 4, 32)),
    ("DeepSeek-V3 decode", (58, 256, 320, 8, 40, 320)),
    ("Qwen3-235B-like", (94, 128, 144, 1, 2, 16)),
    ("Stress", (128, 512, 1024, 64, 16, 128)),
]


def skewed_loads(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """Synthetic token counts per expert: log-normal popularity, a few hot experts per layer."""
    g = torch.Generator().manual_seed(seed)
    loads = torch.exp(torch.randn(layers, experts, generator=g) * 1.2) * 100
    return loads.round()


def cpu_time(fn, repeats: int) -> float:
    """Median single-thread CPU seconds per call (``time.thread_time`` with one intra-op
    thread): what a call costs when it does not wait for a core, unlike wall time on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.thread_time()
            fn()
            samples.append(time.thread_time() - start)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(samples)


def _timed(call, threads: int | None, repeats: int, backend: str, sync) -> object:
    """``measure`` of ``call`` with ``threads`` intra-op threads (None: as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return measure(call, repeats=repeats, warmup=1 if backend == "reference" else 10,
                       sync=sync)
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", help="comma-separated backends (default: all available)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the stress size")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per backend")
    parser.add_argument("--threads", default="1,2",
                        help="intra-op thread counts for native CPU backends (wall time)")
    parser.add_argument("--json", default="out/bench/eplb.json", help="where to write the rows")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = sorted(set(eplb.available(device)) | set(eplb.available("cpu")),
                       key=eplb.BACKENDS.index)
    if args.backends:
        backends = args.backends.split(",")
    else:  # the Triton interpreter is far too slow to time
        backends = [b for b in available if b != "triton" or device == "cuda"]
    for b in backends:
        if b not in available:
            parser.error(f"backend {b!r} is not available here (available: {available})")
    repeats = args.repeats or (20 if args.quick else 200)
    thread_counts = [int(t) for t in args.threads.split(",")]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU"
    load_before = os.getloadavg()
    print(f"EPLB benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{gpu}; median of {repeats} calls (reference: 1-3), [20%, 80%] quantiles; "
          f"load average {load_before[0]:.2f}")
    rows = []
    for name, shape in SHAPES:
        if args.quick and name == "Stress":
            continue
        layers, experts, replicas, groups, nodes, gpus = shape
        weight = skewed_loads(layers, experts)
        p = eplb.plan(weight, replicas, groups, nodes, gpus)
        print(f"\n{name}: {layers} layers, {experts} experts, {groups} groups, {replicas} "
              f"replicas, {nodes} nodes, {gpus} GPUs ({p.policy} policy)")
        print(f"  balancedness: before {p.balancedness_before:.4f}, after {p.balancedness:.4f}, "
              f"upper bound {p.balancedness_bound:.4f}")
        print(f"  {'backend':<10} {'device':<6} {'threads':>7} {'time':>10} {'[20%, 80%]':>20} "
              f"{'vs reference':>13} {'1-thread CPU time':>18}")
        # Native backends first: after the slow Python reference, the CPU thread pool can
        # take a while to wake up on a busy machine.
        times = {}
        for backend in sorted(backends, key=lambda b: b == "reference"):
            on = device if backend in ("cuda", "triton") else "cpu"
            w = weight.to(on)
            reps = (1 if args.quick else 3) if backend == "reference" else repeats
            sync = torch.cuda.synchronize if on == "cuda" else None
            call = partial(eplb.rebalance_experts, w, *shape[2:], backend=backend)
            counts = thread_counts if on == "cpu" and backend != "reference" else [None]
            times[backend] = (on, {n: _timed(call, n, reps, backend, sync) for n in counts})
        ref = times.get("reference", (None, None))[1]
        ref = ref[None] if ref else None
        for backend in backends:
            on, by_threads = times[backend]
            cpu = None
            if on == "cpu" and backend != "reference":
                cpu = cpu_time(partial(eplb.rebalance_experts, weight, *shape[2:],
                                       backend=backend), max(5, repeats // 2))
            for n, t in by_threads.items():
                speedup = ratio(ref.median, t.median) if ref else "-"
                cpu_text = f"{cpu * 1e3:15.3f} ms" if cpu is not None else f"{'-':>18}"
                print(f"  {backend:<10} {on:<6} {n or '-':>7} {t.ms:7.3f} ms  [{t.q20 * 1e3:7.3f}, "
                      f"{t.q80 * 1e3:7.3f}] ms {speedup:>13} {cpu_text}")
                rows.append({"shape": name, "sizes": list(shape), "policy": p.policy,
                             "backend": backend, "device": on, "threads": n, "time": t,
                             "cpu_time": cpu, "balancedness": p.balancedness,
                             "bound": p.balancedness_bound})
    load_after = os.getloadavg()
    print(f"\nload average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    payload = {"torch": torch.__version__, "load_average": [load_before[0], load_after[0]],
               "rows": rows}
    print(f"rows written to {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
