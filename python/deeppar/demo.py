"""``deeppar demo``: the main job on its built-in defaults, end to end on this machine.

It reports what the installation can do, then runs each area that is present on a built-in
default input and writes its pictures and reports under ``--out`` (default ``out/demo``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path


def _section(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 72 - len(title)))


def _info(out: Path) -> None:
    from deeppar._info import collect_info, format_info

    print(format_info(collect_info()))


def _cli(*argv: str) -> None:
    """Run one ``deeppar`` command as a user would type it (echoed first)."""
    from deeppar.cli import main

    print("$ deeppar " + " ".join(argv))
    code = main(list(argv))
    if code != 0:
        raise SystemExit(f"demo: 'deeppar {' '.join(argv)}' failed with exit code {code}")


def _eplb(out: Path) -> None:
    # DeepSeek-V3 prefill: 58 layers, 256 experts in 8 groups, 288 slots on 4 nodes x 8 GPUs.
    _cli("eplb", "plan", "--demo", "--out", str(out / "eplb_plan.json"),
         "--png", str(out / "eplb_plan.png"))


def _schedules(out: Path) -> None:
    _cli("schedule", "compare", "--ranks", "8", "--chunks", "20",
         "--png", str(out / "schedules_compare.png"))
    _cli("schedule", "simulate", "--method", "dualpipe", "--ranks", "8", "--chunks", "20",
         "--F", "1", "--B", "2", "--W", "1", "--FB", "2.5")


def _deepseek_trace() -> Path | None:
    here = Path(__file__).resolve()
    for candidate in (
        here.parents[2] / "tests" / "data" / "deepseek_v3_train_trace.json.gz",
        here.parents[3] / "shared" / "data" / "deepseek_v3_train_trace.json.gz",
    ):
        if candidate.exists():
            return candidate
    return None


def _trace(out: Path) -> None:
    trace = _deepseek_trace()
    if trace is None:
        print("DeepSeek's published trace is not available in this installation; skipped")
        return
    _cli("trace", "analyze", str(trace), "--png", str(out / "deepseek_trace_timeline.png"),
         "--html", str(out / "deepseek_trace_timeline.html"))


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (title, module that must exist, runner)
_STEPS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("installation", "deeppar._info", _info),
    ("EPLB: expert replicas for DeepSeek-V3 prefill", "deeppar.eplb.cli", _eplb),
    ("pipeline schedules: 8 ranks, 20 micro-batches", "deeppar.pipeline.cli", _schedules),
    ("profiling: DeepSeek-V3 training trace", "deeppar.profiling.cli", _trace),
]


def run_demo(out: Path) -> int:
    """Run every available demo step, writing artefacts under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for title, module, step in _STEPS:
        if not _has(module):
            continue
        _section(title)
        start = time.perf_counter()
        step(out)
        print(f"[{title}: {time.perf_counter() - start:.1f} s]")
    print(f"\nartefacts in {out}/")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", help="run the built-in end-to-end demo")
    p.add_argument("--out", default="out/demo", help="folder for pictures and reports")
    p.set_defaults(func=_cmd_demo)
