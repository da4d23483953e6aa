"""``deeppar trace``: overlap analysis of torch.profiler traces from the command line.

Only argparse at import time; the analysis (NumPy) and matplotlib load inside the handler.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from deeppar._io import OUTPUT_POLICY

if TYPE_CHECKING:
    from ._parse import Progress


_PROGRESS_MIN_BYTES = 64 << 20  # on a terminal, files from this size on show progress


class _ProgressLines:
    """Reading progress on stderr, one updating line per file: shown with --progress, or on a
    terminal for files of 64 MB and more (``show`` None); ``for_file`` is what
    ``load_traces`` takes, ``end`` closes a line left open (e.g. by an error)."""

    def __init__(self, show: bool | None) -> None:
        import sys

        self.show = show
        self.err = sys.stderr
        self.open_line = False

    def for_file(self, path: str) -> Progress | None:
        import os

        if self.show is False or (self.show is None and not self.err.isatty()):
            return None
        try:
            size = os.stat(path).st_size
        except OSError:
            return None
        if self.show is None and size < _PROGRESS_MIN_BYTES:
            return None
        name = os.path.basename(path)
        last = [-1]

        def report(done: int, total: int | None) -> None:
            step = int(100 * done / total) if total else done >> 26  # % or 64 MB steps
            if step == last[0]:
                return
            last[0] = step
            mb = done / 2**20
            if total:
                line = f"reading {name}: {step:3d}% ({mb:,.1f} of {total / 2**20:,.1f} MB)"
            else:
                line = f"reading {name}: {mb:,.1f} MB"
            self.open_line = not (total and done >= total)
            print(f"\r{line}", end="" if self.open_line else "\n", file=self.err, flush=True)

        return report

    def end(self) -> None:
        if self.open_line:
            print(file=self.err, flush=True)
            self.open_line = False


def _cmd_analyze(args: argparse.Namespace) -> int:
    from deeppar._io import declare_files, dumps_json

    from .analysis import analyze
    from .classify import Classifier
    from .loader import load_traces

    window: tuple[float | None, float | None] = (None, None)
    if args.window:
        if not (args.png or args.html):
            raise ValueError("--window applies to the pictures: give --png and/or --html")
        from ._lanes import parse_window

        window = parse_window(args.window)
    if args.max_mb is not None and args.max_mb <= 0:
        raise ValueError(f"--max-mb must be a positive number of MB, got {args.max_mb}")
    max_bytes = None if args.max_mb is None else int(args.max_mb * 2**20)
    classifier = Classifier.with_patterns(tuple(args.comm_pattern or ()),
                                          tuple(args.compute_pattern or ()))
    declare_files(inputs=args.paths, outputs=(args.png, args.html))
    skipped: list[str] = []
    progress = _ProgressLines(args.progress)
    try:
        traces = load_traces(args.paths, skipped, max_bytes=max_bytes,
                             progress=progress.for_file)
    finally:
        progress.end()
    report = analyze(traces, classifier, phase_fallback=args.phase_fallback)
    report.notes.extend(skipped)
    if args.png:
        from .timeline import write_png

        write_png(args.png, traces, report, classifier, window=window)
    if args.html:
        from .html import write_html

        write_html(args.html, traces, report, classifier, window=window)
    if args.json:
        print(dumps_json(report.to_dict(), indent=1))
    else:
        from .report import format_report

        print(format_report(report, top=args.top, all_phases=args.all_phases), end="")
        for what, path in (("PNG", args.png), ("HTML", args.html)):
            if path:
                print(f"{what} timeline written to {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``trace`` subcommand (with ``analyze``) to the deeppar parser."""
    p = subparsers.add_parser("trace", help="analyze torch.profiler traces (overlap, timelines)")
    sub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    a = sub.add_parser(
        "analyze", help="computation/communication overlap per device, stream, phase",
        description="Overlap of communication and computation kernels in Chrome traces written "
                    "by torch.profiler (plain or .gz; one file per rank, or directories).",
        epilog=OUTPUT_POLICY)
    a.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="trace files or directories")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--png", metavar="PATH", help="write a timeline picture (PNG), time in us")
    a.add_argument("--html", metavar="PATH",
                   help="write a zoomable timeline (self-contained HTML: time axis in us, "
                        "kernel names on hover)")
    a.add_argument("--comm-pattern", action="append", metavar="REGEX",
                   help="kernel names matching REGEX are communication (repeatable, tried first)")
    a.add_argument("--compute-pattern", action="append", metavar="REGEX",
                   help="kernel names matching REGEX are computation (repeatable, tried first)")
    a.add_argument("--phase-fallback", action="store_true",
                   help="attribute kernels launched outside any range on their thread (autograd "
                        "backward threads) to the range open on another thread of the process")
    a.add_argument("--top", type=int, default=12, help="kernel families listed per device")
    a.add_argument("--all-phases", action="store_true",
                   help="list every annotation range instead of the phases added up by name")
    a.add_argument("--window", metavar="START:END",
                   help="draw only this time range in the --png/--html pictures, in "
                        "microseconds from the first activity (either side may be empty)")
    a.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show reading progress on stderr (default: on a terminal, for files "
                        "of 64 MB and more)")
    a.add_argument("--max-mb", type=float, metavar="MB",
                   help="stop with an error after reading this much JSON text from one file "
                        "(default: no limit for plain regular files, 32768 for gzip files, "
                        "FIFOs and devices)")
    a.set_defaults(func=_cmd_analyze)
