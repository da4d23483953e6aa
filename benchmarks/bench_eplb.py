"""Benchmark of the EPLB planner backends at the spec's sizes.

Prints, per shape, the median time of each backend (host-observed: on GPU each call is followed
by a synchronize), its speed-up over the reference backend measured in the same run, and the
plan's balancedness (mean / max GPU load, averaged over layers) with the spec's upper bound.
Where a GPU is present the GPU backends (``cuda``, ``triton``) run on CUDA tensors; Triton on
the CPU (its interpreter) is only for tests and is left out unless named in ``--backends``.

    PYTHONPATH=python python benchmarks/bench_eplb.py [--backends cpu,reference] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import deeppar.eplb as eplb

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


def time_backend(weight, shape, backend: str, repeats: int) -> float:
    """Median seconds per call of ``rebalance_experts`` with ``backend``."""
    _, _, replicas, groups, nodes, gpus = shape
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, backend=backend)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, backend=backend)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", help="comma-separated backends (default: all available)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the stress size")
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
    repeats = 5 if args.quick else 30
    gpu = torch.cuda.get_device_name() if device == "cuda" else "no GPU"
    print(f"EPLB benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{gpu}; median of {repeats} runs (reference: 1-3)")
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
        print(f"  {'backend':<10} {'device':<6} {'time':>12} {'vs reference':>14}")
        # Native backends first: after the slow Python reference, the CPU thread pool can
        # take a while to wake up on a busy machine.
        times = {}
        for backend in sorted(backends, key=lambda b: b == "reference"):
            on = device if backend in ("cuda", "triton") else "cpu"
            reps = (1 if args.quick else 3) if backend == "reference" else repeats
            times[backend] = (on, time_backend(weight.to(on), shape, backend, reps))
        ref_time = times.get("reference", (None, None))[1]
        for backend in backends:
            on, t = times[backend]
            speedup = f"{ref_time / t:13.1f}x" if ref_time else f"{'-':>14}"
            print(f"  {backend:<10} {on:<6} {t * 1e3:9.3f} ms {speedup}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
