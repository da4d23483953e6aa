"""Benchmarks of communication / computation overlap for expert parallelism.

Sections (``--section``, default all that can run here):

* ``permute-cpu``: token permute + unpermute at 4096 tokens x top-8 x hidden 2048 (fp32), the
  native CPU kernels against the plain-torch reference (argsort + index ops) measured in the
  same run; results are checked equal before timing.
* ``gpu``: (CUDA only) a chain of bf16 GEMMs on the compute stream while permute / unpermute run
  on a communication stream with ``k`` SMs (``num_sms=k``; the compute stream gets the other SMs
  through a green context when torch has them). Reports T_gemm(SMs-k), T_comm(k), T_overlapped,
  R_max = T_overlapped / max(T_gemm, T_comm), the hidden fraction of T_comm, and the permute /
  unpermute bandwidth against a device-to-device copy at 4096 x 8 x 7168 bf16.
* ``fb-cpu``: the fused F&B engine against F then B on an MoE stage with EP over 2 gloo
  processes (``bench_fused.py``): pair times, exposed communication from the engine's timeline
  and from a ``deeppar.profiling.capture`` trace.

    PYTHONPATH=python python benchmarks/bench_overlap.py [--section permute-cpu] [--quick]

Rows are printed and written as JSON (``--json``, default ``out/bench_overlap.json``).
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from typing import Any

import torch
from _timing import Timing, measure, ratio, write_json

from deeppar import _native
from deeppar.moe import _ops, permute, permute_reference, unpermute, unpermute_reference

Rows = list[dict[str, Any]]


def routed_problem(tokens: int, top_k: int, hidden: int, experts: int, dtype: torch.dtype,
                   device: str, seed: int = 0):
    """Tokens, distinct top-k expert ids per token (skewed popularity) and weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    popularity = torch.rand(experts, generator=gen) ** 2
    scores = torch.rand(tokens, experts, generator=gen) * popularity
    ids = scores.topk(top_k, dim=-1).indices
    weights = torch.rand(tokens, top_k, generator=gen)
    return x.to(device), ids.to(device), weights.to(device)


def _gbps(nbytes: int, timing: Timing) -> float:
    return nbytes / timing.median / 1e9


# ----------------------------------------------------------------------------- CPU permute


def section_permute_cpu(args: argparse.Namespace) -> Rows:
    tokens, top_k, hidden, experts, ranks = 4096, 8, 2048, 256, 8
    if not _native.has_kernel("moe_permute", "cpu"):
        print("permute-cpu: no native CPU kernel (extension not built); section skipped")
        return []
    x, ids, w = routed_problem(tokens, top_k, hidden, experts, torch.float32, "cpu")
    got = permute(x, ids, experts, ranks, backend="native")
    want = permute_reference(x, ids, experts, ranks)
    same = all(torch.equal(a, b) for a, b in zip(got, want))
    out_native = unpermute(got.tokens, got.pos, w, backend="native")
    same = same and torch.equal(out_native, unpermute_reference(want[0], want[1], w))
    if not same:
        raise SystemExit("permute-cpu: native and reference results differ")
    repeats = 5 if args.quick else 20
    cases: dict[str, Callable[[], Any]] = {
        "permute/reference": lambda: permute_reference(x, ids, experts, ranks),
        "permute/native": lambda: permute(x, ids, experts, ranks, backend="native"),
        "unpermute/reference": lambda: unpermute_reference(got.tokens, got.pos, w),
        "unpermute/native": lambda: unpermute(got.tokens, got.pos, w, backend="native"),
        "both/reference": lambda: unpermute_reference(
            permute_reference(x, ids, experts, ranks)[0], got.pos, w),
        "both/native": lambda: unpermute(
            permute(x, ids, experts, ranks, backend="native").tokens, got.pos, w,
            backend="native"),
    }
    timings = {name: measure(fn, repeats=repeats, warmup=2) for name, fn in cases.items()}
    row_bytes = hidden * 4
    moved = {"permute": 2 * tokens * top_k * row_bytes,  # read + write every routed row
             "unpermute": tokens * top_k * row_bytes + tokens * row_bytes}
    moved["both"] = moved["permute"] + moved["unpermute"]
    print(f"\n== permute-cpu: {tokens} tokens x top-{top_k} x hidden {hidden} fp32, {experts} "
          f"experts over {ranks} ranks; {torch.get_num_threads()} threads; results equal: {same}")
    print(f"{'op':<12}{'reference ms':>14}{'native ms':>12}{'speed-up':>10}{'native GB/s':>13}")
    rows: Rows = []
    for op in ("permute", "unpermute", "both"):
        ref, nat = timings[f"{op}/reference"], timings[f"{op}/native"]
        print(f"{op:<12}{ref.ms:>14.2f}{nat.ms:>12.2f}{ratio(ref.median, nat.median):>10}"
              f"{_gbps(moved[op], nat):>13.1f}")
        rows.append({"section": "permute-cpu", "op": op, "tokens": tokens, "top_k": top_k,
                     "hidden": hidden, "dtype": "float32", "reference": ref, "native": nat,
                     "speedup": ref.median / nat.median, "native_gbps": _gbps(moved[op], nat),
                     "equal": same})
    return rows


# ----------------------------------------------------------------------------- GPU overlap


def _comm_backend() -> str:
    return "native" if _native.has_kernel("moe_permute", "cuda") else "triton"


def section_gpu(args: argparse.Namespace) -> Rows:
    if not torch.cuda.is_available():
        print("\n== gpu: no CUDA device visible; the GPU mode did not run")
        return []
    from deeppar.moe.sm_budget import compute_partition

    tokens, top_k, hidden, experts, ranks = 4096, 8, 7168, 256, 8
    device = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    backend = _comm_backend()
    x, ids, w = routed_problem(tokens, top_k, hidden, experts, torch.bfloat16, device)
    p = permute(x, ids, experts, ranks, backend=backend)  # validates the ids once
    # the operators themselves from here on: no per-call id check (a host sync)
    permute_op, unpermute_op = _ops.resolve_backend(backend, torch.device(device))
    a = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    b = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
    repeats = 5 if args.quick else 20
    sync = torch.cuda.synchronize
    rows: Rows = []

    # bandwidth of permute / unpermute with every SM, against a device-to-device copy
    elem = 2
    copy_src = torch.empty(tokens * top_k, hidden, device=device, dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    t_copy = measure(lambda: copy_dst.copy_(copy_src), repeats=repeats, sync=sync)
    t_perm = measure(lambda: permute_op(x, ids, experts, ranks, 0), repeats=repeats, sync=sync)
    t_unperm = measure(lambda: unpermute_op(p.tokens, p.pos, w, 0), repeats=repeats, sync=sync)
    copy_gbps = _gbps(2 * tokens * top_k * hidden * elem, t_copy)
    perm_gbps = _gbps(2 * tokens * top_k * hidden * elem, t_perm)
    unperm_gbps = _gbps((tokens * top_k + tokens) * hidden * elem, t_unperm)
    print(f"\n== gpu: {torch.cuda.get_device_name(0)} ({sms} SMs), backend {backend}, "
          f"{tokens} x top-{top_k} x {hidden} bf16")
    print(f"d2d copy {copy_gbps:.0f} GB/s; permute {perm_gbps:.0f} GB/s "
          f"({perm_gbps / copy_gbps:.0%} of copy); unpermute {unperm_gbps:.0f} GB/s "
          f"({unperm_gbps / copy_gbps:.0%} of copy)")
    rows.append({"section": "gpu", "op": "bandwidth", "copy_gbps": copy_gbps,
                 "permute_gbps": perm_gbps, "unpermute_gbps": unperm_gbps,
                 "permute_vs_copy": perm_gbps / copy_gbps,
                 "unpermute_vs_copy": unperm_gbps / copy_gbps, "backend": backend})

    print(f"{'k':>4}{'T_gemm ms':>11}{'T_comm ms':>11}{'T_overlap ms':>14}{'R_max':>8}"
          f"{'hidden':>8}  compute partition")
    comm_stream = torch.cuda.Stream()
    for k in (8, 16, 24, 32):
        part = compute_partition(k)
        compute_stream = part.stream

        def gemms(stream=compute_stream):
            with torch.cuda.stream(stream):
                h = a
                for _ in range(args.gemms):
                    h = h @ b
            return h

        def comm(k=k):
            with torch.cuda.stream(comm_stream):
                tokens_k, pos_k, _, _ = permute_op(x, ids, experts, ranks, k)
                unpermute_op(tokens_k, pos_k, w, k)

        def both():
            gemms()
            comm()

        t_gemm = measure(gemms, repeats=repeats, sync=sync)
        t_comm = measure(comm, repeats=repeats, sync=sync)
        t_both = measure(both, repeats=repeats, sync=sync)
        r_max = t_both.median / max(t_gemm.median, t_comm.median)
        hidden_fraction = max(0.0, min(1.0, (t_gemm.median + t_comm.median - t_both.median)
                                       / t_comm.median))
        where = f"green context, {part.sms} SMs" if part.partitioned else part.reason
        print(f"{k:>4}{t_gemm.ms:>11.3f}{t_comm.ms:>11.3f}{t_both.ms:>14.3f}{r_max:>8.3f}"
              f"{hidden_fraction:>8.0%}  {where}")
        rows.append({"section": "gpu", "op": "overlap", "k": k, "t_gemm": t_gemm,
                     "t_comm": t_comm, "t_overlapped": t_both, "r_max": r_max,
                     "hidden_fraction": hidden_fraction, "partitioned": part.partitioned,
                     "partition_note": where, "gemms": args.gemms})
    return rows


def section_fb_cpu(args: argparse.Namespace) -> Rows:
    import bench_fused

    return [{"section": "fb-cpu", **row} for row in bench_fused.run(3 if args.quick else 10)]


SECTIONS: dict[str, Callable[[argparse.Namespace], Rows]] = {
    "permute-cpu": section_permute_cpu,
    "gpu": section_gpu,
    "fb-cpu": section_fb_cpu,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="section to run (repeatable; default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--gemms", type=int, default=8, help="GEMMs in the GPU compute chain")
    parser.add_argument("--json", default="out/bench_overlap.json", help="where to write rows")
    args = parser.parse_args(argv)
    print(f"bench_overlap: torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads, "
          f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    rows: Rows = []
    for name in args.section or list(SECTIONS):
        rows += SECTIONS[name](args)
    path = write_json(args.json, {"benchmark": "bench_overlap", "torch": torch.__version__,
                                  "rows": rows})
    print(f"\nrows written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
