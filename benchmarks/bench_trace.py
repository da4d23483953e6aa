"""Speed and memory of ``deeppar trace analyze`` against ``json.load`` of the same file.

Builds DeepSeek's training trace repeated 10x and 50x in time (timestamps shifted by the
trace's length per copy) in a temporary folder, then measures, each in a fresh process:

- wall time of the whole process ``python -m deeppar.profiling analyze FILE --json`` (the
  ``trace`` command alone) and ``python -m deeppar trace analyze FILE --json`` (through the
  dispatcher, which also imports the other areas' command modules) against
  ``python -c 'json.load(...)'``;
- in-process: the analysis alone against ``json.load`` alone: wall time, MB/s and peak memory
  growth over the RSS before the call.

Usage: python benchmarks/bench_trace.py [--quick] [--repeats N] [--trace PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def run_process(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and stdout of a child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, env=env, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr}")
    return wall, res.stdout


def best(cmd: list[str], repeats: int) -> tuple[float, str]:
    runs = [run_process(cmd) for _ in range(repeats)]
    return min(r[0] for r in runs), runs[-1][1]


def measure(path: Path, repeats: int) -> dict[str, float]:
    size_mb = path.stat().st_size / 2**20
    py = sys.executable
    p_json = best([py, "-c", "import json,sys; json.load(open(sys.argv[1]))", str(path)], repeats)
    p_cli = best([py, "-m", "deeppar", "trace", "analyze", str(path), "--json"], repeats)
    p_ours = best([py, "-m", "deeppar.profiling", "analyze", str(path), "--json"], repeats)
    json.loads(p_ours[1])  # the output is one JSON object
    res = {"size_mb": size_mb, "proc_json_s": p_json[0], "proc_ours_s": p_ours[0],
           "proc_cli_s": p_cli[0]}
    for mode in ("json", "analyze"):
        runs = [json.loads(run_process([py, "-c", _INPROC, mode, str(path)])[1])
                for _ in range(repeats)]
        res[f"{mode}_s"] = min(r["wall"] for r in runs)
        res[f"{mode}_growth_mb"] = min(r["growth_mb"] for r in runs)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one small file (2 copies), 1 run")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement (best kept)")
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="source trace (.json.gz)")
    args = ap.parse_args()
    copies = (2,) if args.quick else (10, 50)
    repeats = 1 if args.quick else args.repeats
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; best of {repeats} run(s)")
    header = (f"{'copies':>6} {'MB':>7} | {'process: json.load':>18} {'analyze':>8} {'ratio':>6} "
              f"{'deeppar CLI':>11} {'ratio':>6} | "
              f"{'in-process: json':>16} {'analyze':>8} {'MB/s':>7} {'ratio':>6} | "
              f"{'growth: json':>12} {'analyze':>8} {'x file':>7}")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for n in copies:
            path = Path(tmp) / f"trace_x{n}.json"
            build_repeated(args.trace, n, path)
            r = measure(path, repeats)
            print(f"{n:>6} {r['size_mb']:>7.1f} | {r['proc_json_s']:>17.2f}s "
                  f"{r['proc_ours_s']:>7.2f}s {r['proc_ours_s'] / r['proc_json_s']:>6.2f} "
                  f"{r['proc_cli_s']:>10.2f}s {r['proc_cli_s'] / r['proc_json_s']:>6.2f} | "
                  f"{r['json_s']:>15.2f}s {r['analyze_s']:>7.2f}s "
                  f"{r['size_mb'] / r['analyze_s']:>7.1f} {r['analyze_s'] / r['json_s']:>6.2f} | "
                  f"{r['json_growth_mb']:>10.0f}MB {r['analyze_growth_mb']:>6.0f}MB "
                  f"{r['analyze_growth_mb'] / r['size_mb']:>7.2f}", flush=True)
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
