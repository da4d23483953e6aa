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


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# (title, module that must exist, runner)
_STEPS: list[tuple[str, str, Callable[[Path], None]]] = [
    ("installation", "deeppar._info", _info),
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
