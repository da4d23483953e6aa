"""``deeppar trace``: overlap analysis of torch.profiler traces from the command line.

Only argparse at import time; the analysis (NumPy) and matplotlib load inside the handler.
"""

from __future__ import annotations

import argparse

from deeppar._io import OUTPUT_POLICY


def _cmd_analyze(args: argparse.Namespace) -> int:
    from deeppar._io import declare_files, dumps_json

    from .analysis import analyze
    from .classify import Classifier
    from .loader import load_traces

    classifier = Classifier.with_patterns(tuple(args.comm_pattern or ()),
                                          tuple(args.compute_pattern or ()))
    declare_files(inputs=args.paths, outputs=(args.png, args.html))
    skipped: list[str] = []
    traces = load_traces(args.paths, skipped)
    report = analyze(traces, classifier, phase_fallback=args.phase_fallback)
    report.notes.extend(skipped)
    if args.png:
        from .timeline import write_png

        write_png(args.png, traces, report, classifier)
    if args.html:
        from .html import write_html

        write_html(args.html, traces, report, classifier)
    if args.json:
        print(dumps_json(report.to_dict(), indent=1))
    else:
        from .report import format_report

        print(format_report(report, top=args.top), end="")
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
    a.add_argument("--png", metavar="PATH", help="write a timeline picture (PNG)")
    a.add_argument("--html", metavar="PATH", help="write a zoomable timeline (self-contained HTML)")
    a.add_argument("--comm-pattern", action="append", metavar="REGEX",
                   help="kernel names matching REGEX are communication (repeatable, tried first)")
    a.add_argument("--compute-pattern", action="append", metavar="REGEX",
                   help="kernel names matching REGEX are computation (repeatable, tried first)")
    a.add_argument("--phase-fallback", action="store_true",
                   help="attribute kernels launched outside any range on their thread (autograd "
                        "backward threads) to the range open on another thread of the process")
    a.add_argument("--top", type=int, default=12, help="kernel families listed per device")
    a.set_defaults(func=_cmd_analyze)
