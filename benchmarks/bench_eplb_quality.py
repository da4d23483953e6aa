"""Quality of EPLB plans: balancedness of method="deepseek" and method="balanced" against the
spec's upper bound, on the spec's shapes with Zipf and log-normal loads, with times; and the
replicas moved by a plan from scratch vs ``migrate`` after the loads drift.

Each section is a function from the parsed arguments to rows (dicts); ``SECTIONS`` lists them
in print order, and every section's rows go to the JSON under the section's name, so a new
comparison is one more function in that list.

    PYTHONPATH=python python benchmarks/bench_eplb_quality.py [--quick] [--json out.json]
        [--section balancedness|migration]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import measure, ratio, write_json  # noqa: E402
from bench_eplb import SHAPES as SPEC_SHAPES  # noqa: E402
from bench_eplb import cpu_time  # noqa: E402

import deeppar.eplb as eplb  # noqa: E402

# the spec's shapes, name -> (layers, experts, replicas, groups, nodes, gpus), with V3 spread
# over 9 nodes of 8 GPUs after the prefill shape
SHAPES = [SPEC_SHAPES[0], ("DeepSeek-V3, 9 nodes x 8 GPUs", (58, 256, 288, 8, 9, 72)),
          *SPEC_SHAPES[1:]]


def zipf_loads(layers: int, experts: int, seed: int = 0, exponent: float = 0.6,
               tokens: int = 1 << 20) -> torch.Tensor:
    """Token counts per expert: Zipf popularity (rank r gets ~1/r^exponent of the tokens) with
    the ranks shuffled per layer."""
    g = torch.Generator().manual_seed(seed)
    share = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    share /= share.sum()
    order = torch.argsort(torch.rand(layers, experts, generator=g), dim=1)
    return (share[order] * tokens).round().float()


def lognormal_loads(layers: int, experts: int, seed: int = 0, sigma: float = 1.0) -> torch.Tensor:
    """Token counts per expert: log-normal popularity (a few hot experts per layer)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.exp(torch.randn(layers, experts, generator=g) * sigma) * 1000).round()


def node_rule_bound(weight: torch.Tensor, groups: int, nodes: int) -> float:
    """Upper bound on balancedness when each group's replicas stay on one node (hierarchical
    policy, every node has P/N GPUs): a node holding the heaviest group holds at least the
    G/N - 1 lightest others too, and its GPUs share that load; averaged over layers."""
    if groups % nodes or nodes == 1:
        return 1.0
    group_load = weight.double().view(weight.shape[0], groups, -1).sum(-1).sort(dim=1).values
    heaviest_node = group_load[:, -1] + group_load[:, : groups // nodes - 1].sum(dim=1)
    mean_node = group_load.sum(dim=1) / nodes
    return float((mean_node / torch.maximum(heaviest_node, mean_node)).mean())


LOADS: dict[str, Callable[[int, int], torch.Tensor]] = {
    "zipf": zipf_loads,
    "lognormal": lognormal_loads,
}


def cases(quick: bool) -> Iterator[tuple[str, tuple[int, ...], str, torch.Tensor]]:
    """(shape name, sizes, load kind, loads [layers, experts]) of every shape and load kind;
    ``quick`` leaves out the stress shape."""
    for name, shape in SHAPES:
        if quick and name == "Stress":
            continue
        for kind, make in LOADS.items():
            yield name, shape, kind, make(*shape[:2])


def balancedness_section(args: argparse.Namespace) -> list[dict]:
    """Balancedness, distance to the bound, duplicate replicas and time of each method."""
    rows = []
    print("\n== balancedness (mean / max GPU load, averaged over layers; bound: spec's upper "
          "bound)")
    print(f"{'shape':<31} {'loads':<9} {'deepseek':>8} {'balanced':>8} {'bound':>6} "
          f"{'node':>6} {'gap ds':>7} {'gap bal':>7} {'dup ds':>6} {'dup bal':>7} {'t ds':>8} "
          f"{'t bal':>8} {'bal/ds':>7} {'cpu bal':>8}")
    for name, shape, kind, weight in cases(args.quick):
        _, _, replicas, groups, nodes, gpus = shape
        plans = {m: eplb.plan(weight, replicas, groups, nodes, gpus, method=m)
                 for m in eplb.METHODS}
        times = {
            m: measure(partial(eplb.rebalance_experts, weight, *shape[2:], method=m),
                       repeats=args.repeats, warmup=2)
            for m in eplb.METHODS
        }
        # Single-thread CPU time of balanced: what a call costs when it does not wait for a core.
        cpu_bal = cpu_time(partial(eplb.rebalance_experts, weight, *shape[2:], method="balanced"),
                           args.repeats)
        ds, bal = plans["deepseek"], plans["balanced"]
        node_bound = node_rule_bound(weight, groups, nodes)
        row = {
            "shape": name, "sizes": list(shape), "loads": kind, "policy": ds.policy,
            "balancedness": {m: plans[m].balancedness for m in eplb.METHODS},
            "bound": ds.balancedness_bound,
            "node_rule_bound": node_bound,
            "bound_gap": {m: plans[m].bound_gap for m in eplb.METHODS},
            "duplicate_gpus": {m: plans[m].duplicate_gpus for m in eplb.METHODS},
            "time": {m: times[m] for m in eplb.METHODS},
            "cpu_time_balanced": cpu_bal,
        }
        rows.append(row)
        print(f"{name:<31} {kind:<9} {ds.balancedness:8.4f} {bal.balancedness:8.4f} "
              f"{ds.balancedness_bound:6.4f} {node_bound:6.4f} {100 * ds.bound_gap:6.2f}% "
              f"{100 * bal.bound_gap:6.2f}% {ds.duplicate_gpus:6d} {bal.duplicate_gpus:7d} "
              f"{times['deepseek'].ms:6.2f}ms {times['balanced'].ms:6.2f}ms "
              f"{ratio(times['balanced'].median, times['deepseek'].median):>7} "
              f"{1e3 * cpu_bal:6.2f}ms")
    print("node: upper bound with every group on one node (hierarchical policy); gap: max GPU "
          "load above the spec's lower bound, averaged over layers; dup: (layer, GPU) pairs "
          "holding one expert twice or more; bal/ds: balanced's time / deepseek's; cpu bal: "
          "balanced's single-thread CPU time (time.thread_time, one intra-op thread)")
    return rows


def drift(weight: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """The loads times log-normal noise of width ``sigma`` (how loads move between two plans)."""
    g = torch.Generator().manual_seed(seed)
    return weight * torch.exp(torch.randn(weight.shape, generator=g) * sigma)


def _migrate_into(out: dict, *args, **kwargs) -> None:
    out["m"] = eplb.migrate(*args, **kwargs)


def migration_section(args: argparse.Namespace) -> list[dict]:
    """Moved replicas of a plan from scratch vs ``migrate`` after the loads drift.

    The placement in use is the plan (same method) for the loads; the loads then drift and,
    under the new loads: from scratch = ``rebalance_experts`` as it comes; relabel = the same
    plan with its GPUs renumbered to overlap the old placement (free, and what ``migrate``
    falls back to); migrate = ``migrate`` (tolerance 0: on every layer, at least the fresh
    plan's balancedness up to float32 rounding; "worse" counts the layers where it is not).
    A moved replica is a slot whose GPU did not hold its expert (a network transfer)."""
    sigmas = (0.3,) if args.quick else (0.2, 0.5)
    repeats = max(3, args.repeats // 4)
    rows = []
    print("\n== moved replicas after the loads drift by exp(N(0, sigma)): from scratch vs "
          "migrate (balancedness under the new loads)")
    print(f"{'shape':<31} {'loads':<9} {'method':<8} {'sigma':>5} | {'now':>6} {'scratch':>7} "
          f"{'migrate':>7} {'worse':>5} | {'moved: scratch':>14} {'relabel':>7} {'migrate':>7} "
          f"{'ratio':>6} {'vs rel':>6} | {'t scratch':>9} {'t migrate':>9}")
    for name, shape, kind, weight in cases(args.quick):
        for method in eplb.METHODS:
            current, _, _ = eplb.rebalance_experts(weight, *shape[2:], method=method)
            for sigma in sigmas:
                loads = drift(weight, sigma)
                t_scratch = measure(partial(eplb.rebalance_experts, loads, *shape[2:],
                                            method=method), repeats=args.repeats, warmup=1)
                done: dict = {}
                t_migrate = measure(partial(_migrate_into, done, loads, current, *shape[2:],
                                            method=method), repeats=repeats, warmup=1)
                m = done["m"]
                fresh = eplb.plan(loads, *shape[2:], method=method)
                worse = int((m.layer_balancedness.double()
                             < fresh.layer_balancedness * (1 - 1e-6)).sum())
                row = {
                    "shape": name, "sizes": list(shape), "loads": kind, "method": method,
                    "sigma": sigma, "slots": shape[0] * shape[2],
                    "balancedness": {"current": m.balancedness_current,
                                     "scratch": m.balancedness_scratch,
                                     "migrate": m.balancedness},
                    "layers_worse_than_scratch": worse,
                    "moved": {"scratch": int(m.moved_scratch.sum()),
                              "relabelled": int(m.moved_relabelled.sum()),
                              "migrate": int(m.moved.sum())},
                    "layers_from_scratch": int(m.from_scratch.sum()),
                    "time": {"scratch": t_scratch, "migrate": t_migrate},
                }
                rows.append(row)
                moved = row["moved"]
                print(f"{name:<31} {kind:<9} {method:<8} {sigma:5.2f} | "
                      f"{m.balancedness_current:6.4f} {m.balancedness_scratch:7.4f} "
                      f"{m.balancedness:7.4f} {worse:5d} | {moved['scratch']:14d} "
                      f"{moved['relabelled']:7d} {moved['migrate']:7d} "
                      f"{ratio(moved['scratch'], moved['migrate']):>6} "
                      f"{ratio(moved['relabelled'], moved['migrate']):>6} | "
                      f"{t_scratch.ms:7.2f}ms {t_migrate.ms:7.1f}ms")
    print("now: the placement in use under the new loads; worse: layers less balanced than the "
          "fresh plan; ratio: moved from scratch / moved by migrate; vs rel: moved by the "
          f"relabelled fresh plan / moved by migrate; t migrate: median of {repeats} calls")
    return rows


# (JSON key, section): printed and stored in this order.
SECTIONS: list[tuple[str, Callable[[argparse.Namespace], list[dict]]]] = [
    ("balancedness", balancedness_section),
    ("migration", migration_section),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the stress size")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method")
    parser.add_argument("--json", default="out/bench/eplb_quality.json",
                        help="where to write the rows as JSON")
    parser.add_argument("--section", choices=[key for key, _ in SECTIONS], action="append",
                        help="run only this section (repeatable; default: all)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 20
    print(f"EPLB plan quality: torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"times: median of {args.repeats} calls of rebalance_experts on CPU tensors")
    payload = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for key, section in SECTIONS:
        if args.section is None or key in args.section:
            payload[key] = section(args)
    print(f"\nrows written to {write_json(args.json, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
