"""Speed and memory of ``deeppar trace analyze`` against ``json.load`` of the same file.

Builds DeepSeek's training trace repeated 10x and 50x in time (timestamps shifted by the
trace's length per copy) in a temporary folder, then measures, each in a fresh process:

- wall and CPU time of the whole process ``python -m deeppar.profiling analyze FILE --json``
  (the ``trace`` command alone) and ``python -m deeppar trace analyze FILE --json`` (through the
  dispatcher, which also imports the other areas' command modules) against
  ``python -c 'json.load(...)'``;
- in-process: the analysis alone against ``json.load`` alone: wall time, MB/s and peak memory
  growth over the RSS before the call.

Process wall times are medians (with 20%/80% quantiles) from ``_timing.measure``; the rows
are also written as JSON (``--json``, default ``benchmarks/results/bench_trace.json``).

Usage: python benchmarks/bench_trace.py [--quick] [--repeats N] [--trace PATH] [--json PATH]
                                        [--pythonpath DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _timing import measure, write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT / "python" / "deeppar" / "data" / "deepseek_v3_train_trace.json.gz"

_INPROC = r"""
import json, resource, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
mode, path = sys.argv[1], sys.argv[2]
if mode == "analyze":
    from deeppar.profiling import analyze_files
before = rss_mb()
t = time.perf_counter()
if mode == "analyze":
    rep = analyze_files(path)
else:
    with open(path) as f:
        doc = json.load(f)
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"wall": wall, "growth_mb": peak - before}))
"""


def build_repeated(src: Path, copies: int, out: Path) -> None:
    """Write ``copies`` copies of the trace's events, each shifted by the trace length."""
    with gzip.open(src, "rt") as f:
        doc = json.load(f)
    events = doc.pop("traceEvents")
    times = [e["ts"] + e.get("dur", 0) for e in events if isinstance(e.get("ts"), (int, float))]
    first = min(e["ts"] for e in events if isinstance(e.get("ts"), (int, float)))
    period = max(times) - first + 1000
    with open(out, "w") as f:
        head = json.dumps(doc, indent=2)[:-2]  # drop the closing "\n}"
        f.write(head + ',\n  "traceEvents": [\n')
        sep = ""
        for k in range(copies):
            for e in events:
                if k and e.get("ph") == "M":
                    continue
                if isinstance(e.get("ts"), (int, float)):
                    e = dict(e, ts=e["ts"] + k * period)
                    if "correlation" in e.get("args", {}):
                        corr = e["args"]["correlation"] + k * 10_000_000
                        e["args"] = dict(e["args"], correlation=corr)
                    if e.get("cat") in ("ac2g",) and "id" in e:
                        e["id"] = e["id"] + k * 10_000_000
                f.write(sep + "  " + json.dumps(e))
                sep = ",\n"
        f.write("\n  ]\n}\n")


PYTHONPATH = str(ROOT / "python")  # the package the child processes import


def run_process(cmd: list[str]) -> str:
    """Run a child process; its stdout."""
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    res = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr}")
    return res.stdout


def process_seconds(cmd: list[str], repeats: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds (user + system) of the whole child process.

    CPU time hardly depends on other jobs sharing the machine, wall time does."""
    cpu: list[float] = []

    def once() -> None:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run_process(cmd)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)

    wall = measure(once, repeats=repeats, warmup=1).median
    return wall, statistics.median(cpu[1:])


def measure_file(path: Path, repeats: int) -> dict[str, float]:
    size_mb = path.stat().st_size / 2**20
    py = sys.executable
    json.loads(run_process([py, "-m", "deeppar.profiling", "analyze", str(path), "--json"]))
    res: dict[str, float] = {"size_mb": size_mb}
    for key, cmd in (("json", [py, "-c", "import json,sys; json.load(open(sys.argv[1]))"]),
                     ("ours", [py, "-m", "deeppar.profiling", "analyze"]),
                     ("cli", [py, "-m", "deeppar", "trace", "analyze"])):
        args = [str(path)] + (["--json"] if key != "json" else [])
        res[f"proc_{key}_s"], res[f"cpu_{key}_s"] = process_seconds(cmd + args, repeats)
    for mode in ("json", "analyze"):
        runs = [json.loads(run_process([py, "-c", _INPROC, mode, str(path)]))
                for _ in range(repeats)]
        res[f"{mode}_s"] = sorted(r["wall"] for r in runs)[len(runs) // 2]
        res[f"{mode}_growth_mb"] = max(r["growth_mb"] for r in runs)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small file (2 copies), 1 run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per measurement (median)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="source trace (.json.gz)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" /
                    "bench_trace.json", help="where to write the rows as JSON")
    ap.add_argument("--pythonpath", default=str(ROOT / "python"),
                    help="package directory the measured processes import (compare versions)")
    args = ap.parse_args()
    global PYTHONPATH
    PYTHONPATH = args.pythonpath
    copies = (2,) if args.quick else (10, 50)
    repeats = 1 if args.quick else args.repeats
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median of {repeats} "
          f"process run(s) after one warm-up; peak growth: the largest of {repeats}")
    header = (f"{'copies':>6} {'MB':>7} | {'process: json.load':>18} {'analyze':>8} {'ratio':>6} "
              f"{'deeppar CLI':>11} {'ratio':>6} | "
              f"{'in-process: json':>16} {'analyze':>8} {'MB/s':>7} {'ratio':>6} | "
              f"{'growth: json':>12} {'analyze':>8} {'x file':>7} | "
              f"{'CPU s: json':>11} {'analyze':>8} {'ratio':>6} {'CLI ratio':>9}")
    print(header)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in copies:
            path = Path(tmp) / f"trace_x{n}.json"
            build_repeated(args.trace, n, path)
            r = measure_file(path, repeats)
            r["copies"] = n
            r["proc_ratio"] = r["proc_ours_s"] / r["proc_json_s"]
            r["cli_ratio"] = r["proc_cli_s"] / r["proc_json_s"]
            r["growth_x_file"] = r["analyze_growth_mb"] / r["size_mb"]
            r["cpu_ratio"] = r["cpu_ours_s"] / r["cpu_json_s"]
            r["cpu_cli_ratio"] = r["cpu_cli_s"] / r["cpu_json_s"]
            rows.append(r)
            print(f"{n:>6} {r['size_mb']:>7.1f} | {r['proc_json_s']:>17.2f}s "
                  f"{r['proc_ours_s']:>7.2f}s {r['proc_ours_s'] / r['proc_json_s']:>6.2f} "
                  f"{r['proc_cli_s']:>10.2f}s {r['proc_cli_s'] / r['proc_json_s']:>6.2f} | "
                  f"{r['json_s']:>15.2f}s {r['analyze_s']:>7.2f}s "
                  f"{r['size_mb'] / r['analyze_s']:>7.1f} {r['analyze_s'] / r['json_s']:>6.2f} | "
                  f"{r['json_growth_mb']:>10.0f}MB {r['analyze_growth_mb']:>6.0f}MB "
                  f"{r['analyze_growth_mb'] / r['size_mb']:>7.2f} | "
                  f"{r['cpu_json_s']:>10.2f}s {r['cpu_ours_s']:>7.2f}s {r['cpu_ratio']:>6.2f} "
                  f"{r['cpu_cli_ratio']:>9.2f}", flush=True)
            path.unlink()
    write_json(args.json, {"benchmark": "bench_trace", "repeats": repeats,
                           "pythonpath": PYTHONPATH, "rows": rows})
    print(f"rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
