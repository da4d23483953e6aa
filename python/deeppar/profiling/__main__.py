"""``python -m deeppar.profiling analyze FILE...``: the ``deeppar trace`` commands alone,
without building the other areas' subcommands."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from .cli import register

    parser = argparse.ArgumentParser(prog="python -m deeppar.profiling")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["trace", *(sys.argv[1:] if argv is None else argv)])
    from deeppar.cli import run_command

    return run_command(args, "trace")


if __name__ == "__main__":
    sys.exit(main())
