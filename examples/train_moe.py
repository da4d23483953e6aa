"""Train a small DeepSeek-style MoE with DualPipe, expert parallelism, EPLB and profiling.

One process per rank, the rank layout from the environment, so it runs unchanged under
torchrun on one machine or many (torchrun's rendezvous):

    torchrun --nproc-per-node 4 examples/train_moe.py --pp 2 --ep 2 --steps 24
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        examples/train_moe.py --pp 4 --ep 4 --layers 8

The world size must equal --pp x --ep; process g is pipeline rank g // ep and expert-parallel
rank g % ep (an expert-parallel group stays inside a node when ep divides the processes per
node). gloo on CPU, NCCL when every local process has a GPU. ``deeppar demo`` runs the same
training on 4 local processes that it spawns itself.
"""

from __future__ import annotations

import argparse
import sys

from deeppar.demo import add_arguments, from_args, main_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/train_moe",
                        help="folder for pictures, traces and reports (created if missing)")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        cfg = from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    if not main_process(cfg, args.out):
        sys.exit(1)  # process 0 printed which claim failed


if __name__ == "__main__":
    main()
