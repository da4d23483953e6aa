"""Simulated comparison of the pipeline schedules, and the speed of the schedule tools.

For a few (stages, micro-batches, costs) settings, prints every method's makespan, largest
per-rank bubble, the published bubble where there is one, peak activations, and the makespan
ratio to 1F1B on the same devices (``--basis devices``) or the same model cut
(``--basis stages``, the published table's convention). Then times ``build`` + ``validate`` +
``simulate`` for a large DualPipe schedule (actions simulated per second).

Usage: python benchmarks/bench_schedule.py [--basis stages|devices] [--quick]
"""

from __future__ import annotations

import argparse
import time

from deeppar.pipeline.cli import compare_rows
from deeppar.pipeline.schedules import build
from deeppar.pipeline.simulate import Costs, simulate
from deeppar.pipeline.validate import check

SETTINGS = [
    # (stages/ranks, micro-batches, costs, label)
    (8, 20, Costs(F=1, B=2, W=1), "F=1 B=2 W=1 (I = F, no overlap gain)"),
    (8, 20, Costs(F=1, B=2, W=1, FB=2.4), "F=1 B=2 W=1 FB=2.4 (overlap hides 20%)"),
    (8, 20, Costs(F=1, B=2.6, W=1.2, FB=3.0, comm=0.05),
     "F=1 B=2.6 W=1.2 FB=3.0 comm=0.05 (I != F: published formula off)"),
    (16, 64, Costs(F=1, B=2, W=1, FB=2.4), "F=1 B=2 W=1 FB=2.4"),
]


def table(ranks: int, chunks: int, costs: Costs, basis: str) -> None:
    rows = compare_rows(ranks, chunks, costs, basis)
    ref = next((r for r in rows if r["method"] == "1f1b" and "error" not in r), None)
    print(f"{'method':<10} {'devices':>7} {'params':>6} {'makespan':>9} {'bubble':>7} "
          f"{'published':>9} {'peak act':>8} {'vs 1f1b':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<10} n/a ({r['error']})")
            continue
        pub = f"{r['published_bubble']:.4g}" if "published_bubble" in r else "-"
        ratio = r["makespan"] / ref["makespan"] if ref else float("nan")
        print(f"{r['method']:<10} {r['devices']:>7} {r['params_per_device']:>5}x "
              f"{r['makespan']:>9.4g} {r['max_bubble']:>7.4g} {pub:>9} "
              f"{max(r['peak_activations']):>8} {ratio:>7.3f}x")


def speed(quick: bool) -> None:
    P, N = (8, 64) if quick else (16, 512)
    t0 = time.perf_counter()
    s = build("dualpipe", P, N)
    t1 = time.perf_counter()
    assert check(s) == []
    t2 = time.perf_counter()
    res = simulate(s, Costs(F=1, B=2, W=1, FB=2.4))
    t3 = time.perf_counter()
    n = sum(len(p) for p in s.steps)
    print(f"dualpipe ranks={P} chunks={N}: {n} steps; build {1e3 * (t1 - t0):.1f} ms, "
          f"validate {1e3 * (t2 - t1):.1f} ms, simulate {1e3 * (t3 - t2):.1f} ms "
          f"({n / (t3 - t2) / 1e3:.0f}k steps/s), makespan {res.makespan:g}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--basis", choices=("stages", "devices"), default="stages")
    ap.add_argument("--quick", action="store_true", help="first setting only, small timing")
    args = ap.parse_args()
    for ranks, chunks, costs, label in SETTINGS[:1] if args.quick else SETTINGS:
        print(f"\n== {ranks} {'stages' if args.basis == 'stages' else 'devices'}, "
              f"{chunks} micro-batches, {label}")
        table(ranks, chunks, costs, args.basis)
    print()
    speed(args.quick)


if __name__ == "__main__":
    main()
