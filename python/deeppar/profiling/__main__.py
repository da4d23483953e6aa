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
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        sys.stderr.close()
        return 0
    except (ValueError, TypeError, OSError) as exc:  # OSError: missing file, permissions
        print(f"deeppar trace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
