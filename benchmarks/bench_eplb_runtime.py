"""Benchmark of the EPLB runtime pieces: load recorder and replica routing vs plain torch.

Recorder: one step of every layer's router ids ``[layers, tokens, k]`` counted by
``LoadRecorder`` (window and decay, all layers in one call or one call per layer; on the CPU the
native ``expert_counts_add_`` op) against plain torch (one ``bincount`` per layer, which reads
the ids' maximum back to the host on a GPU).
Routing: ``route_to_replicas`` (native op, vectorised torch path, the Triton kernel on a GPU;
with and without locality) against the same rule written in plain torch (``vs plain``: the
candidate replicas per expert when locality is asked, then one gather), and against the floor
``log2phy[ids, 0]``, a gather that sends every token to an expert's first replica (no
spreading: a different, cheaper result; ``vs floor``). Sizes: DeepSeek-V3
(58 layers, 256 experts, top-8, plan of the prefill shape), prefill 4096 tokens per rank and
decode 128 tokens per rank. Each time is the median over rounds (every variant timed in turn
in each round) of the per-round median.

    PYTHONPATH=python python benchmarks/bench_eplb_runtime.py [--device cuda] [--quick]
        [--json out/bench/eplb_runtime.json]

On a CPU shared with other busy processes, run it with ``OMP_WAIT_POLICY=passive``: spinning
OpenMP workers otherwise slow every parallel torch op by 10-100x there (baseline included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import measure, ratio, write_json  # noqa: E402

import deeppar.eplb as eplb  # noqa: E402
from deeppar import _native  # noqa: E402

LAYERS, EXPERTS, TOPK = 58, 256, 8
PLAN = (288, 8, 4, 32)  # replicas, groups, nodes, gpus of DeepSeek-V3 prefill
TOKENS = {"prefill": 4096, "decode": 128}


def router_ids(layers: int, tokens: int, device: str, seed: int = 0) -> torch.Tensor:
    """Top-k ids with a skewed expert popularity (as a router would give)."""
    g = torch.Generator().manual_seed(seed)
    popularity = torch.exp(torch.randn(EXPERTS, generator=g))
    flat = torch.multinomial(popularity, layers * tokens * TOPK, replacement=True, generator=g)
    return flat.view(layers, tokens, TOPK).to(device)


def measure_rounds(fns: dict[str, Callable[[], object]], rounds: int, repeats: int, sync,
                   min_time: float = 0.0) -> dict[str, float]:
    """Seconds per call of each function: the median, over ``rounds`` rounds that time every
    function in turn, of each round's median (a burst of load on a shared machine then hits
    one round of every variant rather than all of one)."""
    medians: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(measure(fn, repeats=repeats, sync=sync,
                                         min_time=min_time).median)
    return {name: statistics.median(values) for name, values in medians.items()}


def bench_recorder(device: str, rounds: int, repeats: int, sync) -> list[dict]:
    rows = []
    for phase, tokens in TOKENS.items():
        ids = router_ids(LAYERS, tokens, device)
        counts = torch.zeros(LAYERS, EXPERTS, device=device)

        def plain(ids=ids, counts=counts) -> None:
            for layer in range(LAYERS):
                counts[layer] += torch.bincount(ids[layer].flatten(), minlength=EXPERTS)

        fns = {"plain bincount per layer": plain}
        for mode, per_layer in (({"window": 1000}, False), ({"decay": 0.99}, False),
                                ({"window": 1000}, True)):
            rec = eplb.LoadRecorder(LAYERS, EXPERTS, device=device, **mode)

            def step(rec=rec, ids=ids, per_layer=per_layer) -> None:
                if per_layer:  # as a forward pass would: one call per MoE layer
                    for layer in range(LAYERS):
                        rec.record(ids[layer], layer=layer)
                else:
                    rec.record(ids)
                rec.step()

            name = f"LoadRecorder {next(iter(mode))}={next(iter(mode.values()))}"
            fns[name + (", record per layer" if per_layer else "")] = step
        times = measure_rounds(fns, rounds, repeats, sync)
        base = times["plain bincount per layer"]
        rows += [{"what": "recorder", "phase": phase, "variant": name, "ms": t * 1e3,
                  "vs_plain": base / t, "tokens_per_s": tokens / t}
                 for name, t in times.items()]
    return rows


def plain_spread(ids: torch.Tensor, table: torch.Tensor, count: torch.Tensor,
                 token_offset: int) -> torch.Tensor:
    """The spreading rule written as a user would in plain torch: token ``t`` takes replica
    ``(t + token_offset) % count[e]`` of its expert ``e`` in ``table``."""
    order = torch.arange(ids.shape[0], device=ids.device)[:, None] + token_offset
    return table[ids, order % count[ids]]


def bench_routing(device: str, rounds: int, repeats: int, sync) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    weight = torch.exp(torch.randn(1, EXPERTS, generator=g) * 1.2)
    _, log2phy, logcnt = eplb.rebalance_experts(weight, *PLAN)
    table, cnt = log2phy[0].to(device), logcnt[0].to(device)
    slots_per_gpu, gpus_per_node = PLAN[0] // PLAN[3], PLAN[3] // PLAN[2]
    locality = {"local_gpu": 3, "slots_per_gpu": slots_per_gpu, "gpus_per_node": gpus_per_node}
    backends = ["native", "torch"]
    if device == "cuda" and _native.triton_usable(device):
        backends.append("triton")
    offset = 7
    floor_name = "plain gather log2phy[ids, 0] (no spreading)"
    rows = []
    for phase, tokens in TOKENS.items():
        ids = router_ids(1, tokens, device, seed=2)[0]
        fns = {floor_name: lambda ids=ids: table[ids, 0]}
        baseline = {}  # variant -> the plain-torch variant computing the same result
        for local in (False, True):
            kw = locality if local else {}
            where = " + GPU/node locality" if local else ""

            def plain(ids=ids, kw=kw) -> torch.Tensor:
                # with locality, the candidate replicas of each expert first (vectorised torch)
                slots, count = (eplb.routing.replica_candidates(table, cnt, **kw) if kw
                                else (table, cnt))
                return plain_spread(ids, slots, count, offset)

            plain_name = "plain torch spread (same result)" + where
            fns[plain_name] = plain
            baseline[plain_name] = plain_name
            for backend in backends:

                def route(backend=backend, ids=ids, kw=kw) -> torch.Tensor:
                    return eplb.route_to_replicas(ids, table, cnt, token_offset=offset,
                                                  backend=backend, **kw)

                if not torch.equal(route(), plain()):
                    raise AssertionError(f"route_to_replicas {backend} differs from plain torch")
                fns[f"route_to_replicas {backend}{where}"] = route
                baseline[f"route_to_replicas {backend}{where}"] = plain_name
        baseline[floor_name] = "plain torch spread (same result)"
        times = measure_rounds(fns, rounds, repeats, sync, min_time=0.1)
        rows += [{"what": "routing", "phase": phase, "variant": name, "ms": t * 1e3,
                  "vs_plain": times[baseline[name]] / t, "vs_floor": times[floor_name] / t,
                  "tokens_per_s": tokens / t}
                 for name, t in times.items()]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="one round, fewer repeats")
    parser.add_argument("--json", type=Path,
                        default=Path("out/bench/eplb_runtime.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    rounds, repeats = (1, 5) if args.quick else (5, 30)
    print(f"EPLB runtime benchmark: torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"threads, device {args.device}; median over {rounds} rounds of the median of "
          f">= {repeats} runs; ratio = plain / this (higher is faster); vs plain: against "
          "plain torch computing the same result, vs floor: against log2phy[ids, 0]")
    rows = (bench_recorder(args.device, rounds, repeats, sync)
            + bench_routing(args.device, rounds, repeats, sync))
    print(f"\n{'what':<9} {'phase':<8} {'variant':<52} {'time':>10} {'vs plain':>9} "
          f"{'vs floor':>9} {'tokens/s':>10}")
    for r in rows:
        floor = ratio(1.0, 1.0 / r["vs_floor"]) if "vs_floor" in r else "-"
        print(f"{r['what']:<9} {r['phase']:<8} {r['variant']:<52} {r['ms']:7.3f} ms "
              f"{ratio(1.0, 1.0 / r['vs_plain']):>9} {floor:>9} {r['tokens_per_s']:10.3g}")
    write_json(args.json, {"device": args.device, "torch": torch.__version__,
                           "layers": LAYERS, "experts": EXPERTS, "topk": TOPK,
                           "tokens": TOKENS, "rows": rows})
    print(f"\nrows written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
