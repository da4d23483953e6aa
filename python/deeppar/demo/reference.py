"""The same model run sequentially in one process: the check of the distributed first step.

Micro-batch by micro-batch, the stages run one after another on every data shard's slice, and
each loss is back-propagated at once, so the gradients are the sums the distributed step
makes. The distributed step must give bit-identical losses and the same gradients up to
summation order (cosine distance < 1e-12 in float64, as the runtime tests define).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from . import model as M
from .config import TrainConfig
from .task import NextTokenTask

GRAD_TOLERANCE = 1e-12  # cosine distance, float64 arithmetic (tests/test_runtime*.py)


@dataclass
class FirstStepCheck:
    """Outcome of comparing the distributed first step with the sequential run."""

    losses: int = 0  # micro-batch losses compared
    losses_identical: bool = False
    max_loss_diff: float = 0.0
    grads: int = 0  # parameter tensors compared
    max_cos_distance: float = 0.0
    worst: str = ""
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.losses_identical and self.losses > 0 and not self.missing
                and self.max_cos_distance < GRAD_TOLERANCE)

    def lines(self) -> list[str]:
        same = "bit-identical to" if self.losses_identical else "DIFFERENT FROM"
        out = [f"first step: {self.losses} micro-batch losses {same} the sequential "
               f"one-process run (max |diff| {self.max_loss_diff:.3g})",
               f"first step: {self.grads} gradient tensors, max cosine distance "
               f"{self.max_cos_distance:.2e} ({self.worst}); tolerance {GRAD_TOLERANCE:g}"]
        if self.missing:
            out.append(f"first step: gradients missing for {', '.join(self.missing[:5])}")
        return out


def cos_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - cos(a, b) in float64, symmetric in the norms (0 when both are zero)."""
    a, b = a.double(), b.double()
    den = (a * a + b * b).sum().item()
    return 0.0 if den == 0.0 else 1.0 - 2.0 * (a * b).sum().item() / den


def sequential_first_step(cfg: TrainConfig, task: NextTokenTask
                          ) -> tuple[dict[tuple[int, int], torch.Tensor], dict[str, torch.Tensor]]:
    """Losses ``{(shard, micro-batch): loss}`` and gradients ``{name: grad}`` of step 0."""
    moe = M.MoEParts.build(cfg)  # one process: every expert local
    stages = M.build_stages(cfg, moe)
    batches = [task.batch(0, shard, cfg.chunks * cfg.micro_batch) for shard in range(cfg.ep)]
    losses: dict[tuple[int, int], torch.Tensor] = {}
    for m in range(cfg.chunks):
        for shard, (x, y) in enumerate(batches):
            h = x.chunk(cfg.chunks)[m]
            for stage in stages:
                h = stage(h)
            loss = M.criterion(h, y.chunk(cfg.chunks)[m])
            loss.backward()
            losses[(shard, m)] = loss.detach()
    grads = {moe.global_name(k, n): p.grad.detach().clone()
             for k, stage in enumerate(stages) for n, p in stage.named_parameters()
             if p.grad is not None}
    return losses, grads


def compare_first_step(cfg: TrainConfig, task: NextTokenTask, gathered: list[Any]
                       ) -> FirstStepCheck:
    """Compare what every process sent (``{"losses": {(shard, mb): float}, "grads": {name:
    grad}}``) with :func:`sequential_first_step`."""
    want_losses, want_grads = sequential_first_step(cfg, task)
    check = FirstStepCheck()
    got_losses = {k: v for g in gathered for k, v in g["losses"].items()}
    diffs = [abs(got_losses[k] - want_losses[k].item()) for k in want_losses if k in got_losses]
    check.losses = len(diffs)
    # float32 losses travel as Python floats (exact): equal floats are equal bits
    check.losses_identical = len(diffs) == len(want_losses) and all(d == 0.0 for d in diffs)
    check.max_loss_diff = max(diffs, default=float("nan"))
    got_grads: dict[str, torch.Tensor] = {}
    for g in gathered:
        got_grads.update(g["grads"])
    for name, want in want_grads.items():
        if name not in got_grads:
            check.missing.append(name)
            continue
        d = cos_distance(got_grads[name], want)
        check.grads += 1
        if d >= check.max_cos_distance:
            check.max_cos_distance, check.worst = d, name
    return check


__all__ = ["FirstStepCheck", "GRAD_TOLERANCE", "compare_first_step", "cos_distance",
           "sequential_first_step"]
