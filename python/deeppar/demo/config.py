"""Sizes and pieces of the MoE training run, one dataclass shared by ``deeppar demo`` and
``examples/train_moe.py``; the command-line options are generated from its fields' help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields


def _opt(default, help: str):  # noqa: A002 - argparse's word
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """One training run: model sizes, the parallel grid, the schedule and what to show."""

    # parallel grid: world = pp * ep processes
    pp: int = _opt(2, "pipeline-parallel size (DualPipe ranks, even); each pipeline rank holds "
                      "two stages, S_r and S_(pp-1-r)")
    ep: int = _opt(2, "expert-parallel size: processes sharing one pipeline rank's experts; "
                      "they also run data parallel on the dense parts (attention, shared "
                      "expert, router)")
    # model
    layers: int = _opt(4, "transformer layers (split evenly over the pp stages)")
    hidden: int = _opt(32, "hidden size")
    heads: int = _opt(2, "attention heads")
    experts: int = _opt(8, "routed experts per MoE layer (a multiple of ep)")
    top_k: int = _opt(2, "experts per token")
    n_group: int = _opt(2, "expert groups for DeepSeek-V3's group-limited routing")
    topk_group: int = _opt(1, "groups a token may route to")
    expert_hidden: int = _opt(32, "hidden size of each routed and of the shared expert")
    shared_experts: int = _opt(1, "shared experts (every token; several are one wider MLP, "
                                  "as in DeepSeek-V3)")
    vocab: int = _opt(32, "vocabulary of the synthetic next-token task")
    seq: int = _opt(16, "sequence length")
    # training
    steps: int = _opt(20, "training steps")
    chunks: int = _opt(8, "DualPipe micro-batches per step (even, >= 2 * pp; more give more "
                          "overlapped F&B pairs)")
    micro_batch: int = _opt(2, "sequences per micro-batch (per expert-parallel rank)")
    lr: float = _opt(1e-2, "Adam learning rate")
    seed: int = _opt(0, "seed of the model and of the data")
    # pieces
    check: bool = _opt(True, "check the first step against the same model run sequentially "
                             "in one process (rank 0)")
    rebalance_at: int = _opt(-1, "step after which EPLB plans from the recorded loads and the "
                                 "expert weights move between ranks (-1: half-way, 0: never)")
    profile: bool = _opt(True, "capture one step with the profiler and analyse it")
    threads: int = _opt(1, "torch threads per process")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the option for sizes that cannot work."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and f.name != "rebalance_at":
                least = 0 if f.name in ("seed", "shared_experts") else 1
                need(v >= least, f"--{f.name.replace('_', '-')} must be >= {least}, got {v}")
        need(self.pp % 2 == 0, f"--pp must be even for DualPipe, got {self.pp}")
        need(self.layers % self.pp == 0, f"--layers ({self.layers}) must be a multiple of --pp "
             f"({self.pp})")
        need(self.experts % self.ep == 0, f"--experts ({self.experts}) must be a multiple of "
             f"--ep ({self.ep})")
        need(self.chunks % 2 == 0 and self.chunks >= 2 * self.pp, f"--chunks must be even and "
             f">= 2 * pp = {2 * self.pp}, got {self.chunks}")
        need(self.hidden % self.heads == 0, f"--hidden ({self.hidden}) must be a multiple of "
             f"--heads ({self.heads})")
        need(self.experts % self.n_group == 0, f"--experts ({self.experts}) must be a multiple "
             f"of --n-group ({self.n_group})")
        need(self.topk_group <= self.n_group, f"--topk-group ({self.topk_group}) must be <= "
             f"--n-group ({self.n_group})")
        need(self.top_k <= self.topk_group * self.experts // self.n_group,
             f"--top-k ({self.top_k}) must be <= the experts in --topk-group groups "
             f"({self.topk_group * self.experts // self.n_group})")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(-1 <= self.rebalance_at < self.steps, f"--rebalance-at must be -1 (half-way), 0 "
             f"(never) or a step before --steps ({self.steps}), got {self.rebalance_at}")

    @property
    def world(self) -> int:
        return self.pp * self.ep

    @property
    def rebalance_step(self) -> int:
        """Steps run before the rebalance (0: none)."""
        return self.steps // 2 if self.rebalance_at < 0 else self.rebalance_at


def add_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig | None = None) -> None:
    """Add one option per field of :class:`TrainConfig` (``--no-X`` for the switches)."""
    base = defaults or TrainConfig()
    group = parser.add_argument_group("model, grid and training (TrainConfig)")
    for f in fields(TrainConfig):
        name = "--" + f.name.replace("_", "-")
        value = getattr(base, f.name)
        helptext = f.metadata["help"]
        if isinstance(value, bool):
            group.add_argument(name, dest=f.name, default=value,
                               action=argparse.BooleanOptionalAction, help=helptext)
        else:
            group.add_argument(name, dest=f.name, type=type(value), default=value,
                               help=f"{helptext} (default {value})")


def from_args(args: argparse.Namespace) -> TrainConfig:
    """The config the parsed options describe, validated."""
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    cfg.validate()
    return cfg


__all__ = ["TrainConfig", "add_arguments", "from_args"]
