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
import torch.nn as nn

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


def _moe_over_shards(moe: nn.Module, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    """One MoE layer holding every expert, on the tokens of all data shards at once, as the
    expert-parallel group sees them: each shard routes its own tokens; each expert runs on
    its rows of every shard together, in shard order (the order in which an expert's rank
    receives them); each shard un-permutes its rows and adds its shared expert."""
    from deeppar.moe import exchange_counts, permute, unpermute

    flat = [y.reshape(-1, y.shape[-1]) for y in ys]
    routes = [moe.route(y) for y in flat]
    ids = torch.cat([r.topk_ids for r in routes])
    permuted = permute(torch.cat(flat), ids, moe.num_experts, 1)
    layout = exchange_counts(permuted.expert_counts, moe.num_experts)
    expert_out = moe.run_experts(permuted.tokens, layout)
    outs, start = [], 0
    for y, r in zip(flat, routes):
        n = y.shape[0]
        pos = permuted.pos[start:start + n]
        # this shard's rows, in (token, choice) order: what its combine brings back
        rows = expert_out.index_select(0, pos.reshape(-1))
        own = torch.arange(rows.shape[0], device=rows.device).view_as(pos)
        out = unpermute(rows, own, r.topk_weights)
        shared = moe.shared_expert(y)
        outs.append(out if shared is None else out + shared)
        start += n
    return [o.view_as(y) for o, y in zip(outs, ys)]


def _stage_over_shards(stage: M.Stage, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``stage`` on every shard's micro-batch, as plain autograd code: per shard except
    inside the MoE layers (the same operations as the block's sub-steps)."""
    for layer in stage.layers:
        block = layer.block
        if layer.embed is not None:
            xs = [layer.embed(x) for x in xs]
        hs = [x + block.attn(block.attn_norm(x)) for x in xs]
        moe_out = _moe_over_shards(block.moe, [block.moe_norm(h) for h in hs])
        xs = [h + o for h, o in zip(hs, moe_out)]
        if layer.head is not None:
            xs = [layer.head(layer.norm(x)) for x in xs]
    return xs


def sequential_first_step(cfg: TrainConfig, task: NextTokenTask, stages: list[M.Stage],
                          device: torch.device | None = None
                          ) -> tuple[dict[tuple[int, int], float], dict[str, torch.Tensor]]:
    """Losses ``{(shard, micro-batch): loss}`` and gradients ``{name: grad}`` (on the CPU) of
    step 0 of ``stages`` (every expert in one process, on ``device``), micro-batch after
    micro-batch."""
    batches = [tuple(t.to(device) for t in task.batch(0, shard, cfg.chunks * cfg.micro_batch))
               for shard in range(cfg.ep)]
    losses: dict[tuple[int, int], float] = {}
    for m in range(cfg.chunks):
        hs = [x.chunk(cfg.chunks)[m] for x, _ in batches]
        for stage in stages:
            hs = _stage_over_shards(stage, hs)
        per_shard = [M.criterion(h, y.chunk(cfg.chunks)[m]) for h, (_, y) in zip(hs, batches)]
        for shard, loss in enumerate(per_shard):
            losses[(shard, m)] = loss.item()
        # one backward for the micro-batch: the shards share the MoE layers' graph
        torch.autograd.backward(per_shard)
    grads = {f"S{stage.index}.{n}": p.grad.detach().cpu().clone()
             for stage in stages for n, p in stage.named_parameters() if p.grad is not None}
    return losses, grads


def compare_first_step(want: tuple[dict, dict], gathered: list[Any]) -> FirstStepCheck:
    """Compare what every process sent (``{"losses": {(shard, mb): float}, "grads": {name:
    (first expert, grad)}}``) with ``want``, the result of :func:`sequential_first_step`."""
    want_losses, want_grads = want
    check = FirstStepCheck()
    got_losses = {k: v for g in gathered for k, v in g["losses"].items()}
    diffs = [abs(got_losses[k] - want_losses[k]) for k in want_losses if k in got_losses]
    check.losses = len(diffs)
    # float32 losses travel as Python floats (exact): equal floats are equal bits
    check.losses_identical = len(diffs) == len(want_losses) and all(d == 0.0 for d in diffs)
    check.max_loss_diff = max(diffs, default=float("nan"))
    # expert banks arrive in slices (one per expert-parallel rank): put them back together
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    for g in gathered:
        for name, (first, grad) in g["grads"].items():
            pieces.setdefault(name, {})[first] = grad
    got_grads = {n: torch.cat([p[k] for k in sorted(p)]) if len(p) > 1 else next(iter(p.values()))
                 for n, p in pieces.items()}
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
