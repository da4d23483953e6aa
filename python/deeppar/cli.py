"""The ``deeppar`` command line.

Each area registers its own subcommand from ``deeppar/<area>/cli.py`` through a
``register(subparsers)`` function. Those modules import only argparse-level things at module
level, so ``deeppar trace ...`` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import json
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

    data = collect_info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with every available area's subcommands, or only the area ``only``.

    Running one subcommand registers only its own area, so that ``deeppar trace`` does not pay
    for importing the areas built on torch.
    """
    from deeppar import __version__

    parser = argparse.ArgumentParser(prog="deeppar", description=__doc__.splitlines()[0])
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deeppar`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    only = first if first in {name for name, _ in _AREAS} | {"info"} else None
    parser = build_parser(only=only)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing file, permissions, disk
        print(f"deeppar {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
