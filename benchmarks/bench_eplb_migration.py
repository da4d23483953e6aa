"""Benchmark of migration-aware rebalancing: moved replicas, scratch vs ``migrate``.

For each shape of the spec and each load kind (Zipf, log-normal), the placement in use is the
plan for some loads; the loads then drift (times log-normal noise of width ``sigma``) and we
compare, under the drifted loads:

* from scratch: ``rebalance_experts`` on the new loads, taken as it comes (what a server does
  today), and the same plan with its GPUs relabelled to overlap the old placement;
* ``migrate``: relabelling plus a warm-start search from the placement in use, never worse than
  the fresh plan's balancedness on any layer (tolerance 0).

Moved replicas = slots whose expert their GPU did not hold before (a network transfer); the
ratio is scratch / migrate. Times are medians, host-observed.

    PYTHONPATH=python python benchmarks/bench_eplb_migration.py [--quick] [--method balanced]
        [--json benchmarks/results/bench_eplb_migration.json]
"""

from __future__ import annotations

import argparse
import sys
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


def zipf_loads(layers: int, experts: int, seed: int, exponent: float = 1.0) -> torch.Tensor:
    """Zipf popularity, a random expert order per layer."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1
    return 1e5 / ranks.float() ** exponent


def lognormal_loads(layers: int, experts: int, seed: int, width: float = 1.2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(layers, experts, generator=g) * width) * 100


def drift(weight: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return weight * torch.exp(torch.randn(weight.shape, generator=g) * sigma)


def migration_row(name: str, shape: tuple, kind: str, old_loads: torch.Tensor, sigma: float,
                  repeats: int, method: str | None) -> dict:
    """Scratch vs ``migrate`` after the loads ``old_loads`` drift by ``sigma``."""
    layers, experts, replicas, groups, nodes, gpus = shape
    extra = {} if method is None else {"method": method}
    current, _, _ = eplb.rebalance_experts(old_loads, replicas, groups, nodes, gpus, **extra)
    loads = drift(old_loads, sigma, seed=1)
    t_scratch = measure(lambda: eplb.rebalance_experts(loads, replicas, groups, nodes, gpus,
                                                       **extra), repeats=repeats, warmup=1)
    result = {}

    def run() -> None:
        result["m"] = eplb.migrate(loads, current, replicas, groups, nodes, gpus, method=method)

    t_migrate = measure(run, repeats=repeats, warmup=0)
    m = result["m"]
    return {
        "shape": name, "loads": kind, "sigma": sigma, "method": method or "default",
        "balancedness_current": m.balancedness_current,
        "balancedness_scratch": m.balancedness_scratch,
        "balancedness_migrate": m.balancedness,
        "moved_scratch": int(m.moved_scratch.sum()),
        "moved_relabelled": int(m.moved_relabelled.sum()),
        "moved_migrate": int(m.moved.sum()),
        "slots": layers * replicas,
        "layers_from_scratch": int(m.from_scratch.sum()),
        "ms_scratch": t_scratch.ms, "ms_migrate": t_migrate.ms,
    }


def migration_rows(shapes, sigmas, repeats: int, method: str | None) -> list[dict]:
    """One row per (shape, load kind, sigma): balancedness, moved replicas and times."""
    rows = []
    for name, shape in shapes:
        layers, experts = shape[:2]
        for kind, make in (("zipf", zipf_loads), ("lognormal", lognormal_loads)):
            old_loads = make(layers, experts, seed=0)
            for sigma in sigmas:
                rows.append(migration_row(name, shape, kind, old_loads, sigma, repeats, method))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'shape':<20} {'loads':<9} {'sigma':>5} | {'balancedness: now':>17} {'scratch':>7} "
          f"{'migrate':>7} | {'moved: scratch':>14} {'relabel':>7} {'migrate':>7} "
          f"{'ratio':>6} | {'ms: scratch':>11} {'migrate':>8}")
    for r in rows:
        print(f"{r['shape']:<20} {r['loads']:<9} {r['sigma']:5.2f} | "
              f"{r['balancedness_current']:17.4f} {r['balancedness_scratch']:7.4f} "
              f"{r['balancedness_migrate']:7.4f} | {r['moved_scratch']:14d} "
              f"{r['moved_relabelled']:7d} {r['moved_migrate']:7d} "
              f"{ratio(r['moved_scratch'], r['moved_migrate']):>6} | "
              f"{r['ms_scratch']:11.2f} {r['ms_migrate']:8.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, one sigma, skip the stress shape")
    parser.add_argument("--method", help="planning method passed to the planner")
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/bench_eplb_migration.json"))
    args = parser.parse_args(argv)
    shapes = [s for s in SHAPES if not (args.quick and s[0] == "Stress")]
    sigmas = (0.3,) if args.quick else (0.2, 0.5)
    repeats = 1 if args.quick else 3
    print(f"EPLB migration benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads; loads drift by exp(N(0, sigma)); median of {repeats} runs; ratio = moved "
          "from scratch / moved by migrate\n")
    rows = migration_rows(shapes, sigmas, repeats, args.method)
    print_rows(rows)
    write_json(args.json, {"torch": torch.__version__, "rows": rows})
    print(f"\nrows written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
