"""The ``deeppar`` command line.

Each area registers its own subcommand from ``deeppar/<area>/cli.py`` through a
``register(subparsers)`` function. Those modules import only argparse-level things at module
level, so ``deeppar trace ...`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# (subcommand, module that defines register(subparsers))
_AREAS = (
    ("eplb", "deeppar.eplb.cli"),
    ("schedule", "deeppar.pipeline.cli"),
    ("trace", "deeppar.profiling.cli"),
    ("demo", "deeppar.demo"),
)


def _cmd_info(args: argparse.Namespace) -> int:
    from deeppar._info import collect_info, format_info
    from deeppar._io import dumps_json

    data = collect_info()
    print(dumps_json(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every available area's subcommands, or only the area ``only``.

    Running one subcommand registers only its own area, so that ``deeppar trace`` does not pay
    for importing the areas built on torch.
    """
    from deeppar import __version__
    from deeppar._io import OUTPUT_POLICY

    parser = argparse.ArgumentParser(
        prog="deeppar", description=__doc__.splitlines()[0],
        epilog="Exit status: 0 success, 2 error (one line on stderr), 141 standard output "
        f"closed early (e.g. | head), 130 interrupted. {OUTPUT_POLICY}")
    parser.add_argument("--version", action="version", version=f"deeppar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p_info = sub.add_parser("info", help="versions, compiled and usable backends, GPU")
    p_info.add_argument("--json", action="store_true", help="print a JSON object")
    p_info.set_defaults(func=_cmd_info)
    for name, module_name in _AREAS:
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):  # area not in this build
                continue
            raise
        module.register(sub)
    return parser


def run_command(args: argparse.Namespace, name: str) -> int:
    """Run a parsed command's handler with the CLI's error handling and exit codes.

    0: success; 2: an error (bad input, a file that cannot be read or written, matplotlib
    missing for a picture), printed as one line; 141 (128 + SIGPIPE, what a shell reports for
    a tool stopped by a closed pipe): standard output closed early (``| head``), silently;
    130: interrupted (Ctrl-C).
    """
    from deeppar._io import PLOT_EXTRA, command_scope

    try:
        with command_scope():
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # before OSError: a BrokenPipeError is an OSError
        _silence_stdout()
        return 141
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib" and not (exc.name or "").startswith("matplotlib."):
            raise
        print(f"deeppar {name}: error: matplotlib is needed for pictures: {PLOT_EXTRA}",
              file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing file, permissions, disk
        print(f"deeppar {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _silence_stdout() -> None:
    """Point standard output at /dev/null so that the interpreter's final flush of what is
    still buffered does not raise a second BrokenPipeError."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (e.g. captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deeppar`` console script (exit codes: :func:`run_command`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in {name for name, _ in _AREAS} | {"info"} else None
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    return run_command(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
