"""EPLB inside the training: loads recorded from the routers, plans, and the expert weights
moved between the expert-parallel ranks mid-training.

Every MoE layer's router is hooked: the logical expert ids it picks are counted by a
:class:`~deeppar.eplb.recorder.LoadRecorder`, then mapped to the physical slot that holds the
expert under the placement in use (:func:`~deeppar.eplb.routing.route_to_replicas`), so the
MoE layer dispatches to slots. One slot per expert here (``replicas == experts``): the plans
decide which rank holds which expert. Slot ``s`` lives on expert-parallel rank
``s // (experts / ep)``, the MoE layer's contiguous split.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig


def log2phy_of(phy2log: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [L, E, X], logcnt [L, E])`` of a placement ``phy2log [L, R]``: every slot of
    each expert in increasing slot order, -1 padded."""
    layers, slots = phy2log.shape
    logcnt = torch.zeros(layers, experts, dtype=torch.long)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    width = int(logcnt.max())
    log2phy = torch.full((layers, experts, width), -1, dtype=torch.long)
    for layer in range(layers):
        for slot, expert in enumerate(phy2log[layer].tolist()):
            row = log2phy[layer, expert]
            row[int((row >= 0).sum())] = slot
    return log2phy, logcnt


class ExpertBalancer:
    """The placement in use, the load recorder, and the router hooks of this process.

    ``layers`` are ``(global layer index, MoE layer)`` pairs of every MoE layer this process
    holds (both DualPipe stages: a layer may appear twice, once per stage copy).
    """

    def __init__(self, cfg: TrainConfig, layers: Iterable[tuple[int, nn.Module]],
                 device: torch.device) -> None:
        from deeppar.eplb.recorder import LoadRecorder

        self.cfg = cfg
        self.layers = list(layers)
        self.recorder = LoadRecorder(cfg.layers, cfg.experts, window=max(cfg.steps, 1),
                                     device=device)
        self.recording = True
        self.phy2log = torch.arange(cfg.experts).repeat(cfg.layers, 1)  # identity at first
        self._maps(device)
        for index, moe in self.layers:
            moe.router.register_forward_hook(functools.partial(self._route, index))

    def _maps(self, device: torch.device) -> None:
        log2phy, logcnt = log2phy_of(self.phy2log, self.cfg.experts)
        self.log2phy, self.logcnt = log2phy.to(device), logcnt.to(device)

    def _route(self, layer: int, module: nn.Module, inputs: Any, output: Any) -> Any:
        """Router forward hook: count the logical ids, return physical slots instead."""
        from deeppar.eplb.routing import route_to_replicas

        ids, weights = output
        if self.recording:
            self.recorder.record(ids, layer=layer)
        return route_to_replicas(ids, self.log2phy[layer], self.logcnt[layer]), weights

    def loads(self) -> torch.Tensor:
        """``[layers, experts]`` loads recorded by every process (a collective)."""
        loads = self.recorder.loads()
        dist.all_reduce(loads)
        return loads.cpu()

    def plans(self, loads: torch.Tensor) -> dict[str, Any]:
        """The planner's answers for ``loads``: ``deepseek`` and ``balanced`` plans from
        scratch and the migration-aware plan from the placement in use (``None`` for a
        method this installation lacks, with the reason in ``missing``)."""
        from deeppar import eplb

        c = self.cfg
        args = (loads, c.experts, c.n_group, 1, c.ep)
        out: dict[str, Any] = {"missing": []}
        out["deepseek"] = eplb.plan(*args)
        try:
            out["balanced"] = eplb.plan(*args, method="balanced")
        except TypeError:
            out["balanced"] = None
            out["missing"].append("EPLB method='balanced' (deeppar.eplb.plan has no method "
                                  "argument in this installation)")
        from deeppar.eplb.migration import migrate

        out["migration"] = migrate(loads, self.phy2log, *args[1:])
        return out

    def move_experts(self, new_phy2log: torch.Tensor, source_slot: torch.Tensor,
                     optimizer: torch.optim.Optimizer, group: Any) -> Any:
        """Move this process's expert weights, and the optimizer's state of them, to the new
        placement (a collective of the expert-parallel group, all or nothing), then route by
        it. Returns the :class:`~deeppar.eplb.rearrange.RearrangeStats`."""
        from deeppar.eplb.rearrange import rearrange_expert_weights

        weights, rows = [], []
        for index, moe in self.layers:
            per_slot = []
            for p in moe.experts.parameters():
                per_slot.append(p.data)
                state = optimizer.state.get(p, {})
                per_slot += [state[k] for k in sorted(state) if isinstance(state[k], torch.Tensor)
                             and state[k].dim() > 0 and state[k].shape[0] == p.shape[0]]
            weights.append(per_slot)
            rows.append(index)
        stats = rearrange_expert_weights(weights, self.phy2log[rows], new_phy2log[rows],
                                         source_slot[rows], group=group)
        self.phy2log = new_phy2log.clone().cpu()
        self._maps(self.log2phy.device)
        return stats

    def balancedness(self, loads: torch.Tensor, phy2log: torch.Tensor | None = None) -> float:
        """Mean over layers of mean / max expert-parallel rank load under a placement."""
        from deeppar.eplb.planning import balancedness, gpu_loads

        phy = self.phy2log if phy2log is None else phy2log
        _, logcnt = log2phy_of(phy, self.cfg.experts)
        return float(balancedness(gpu_loads(loads, phy, logcnt, self.cfg.ep)).mean())

    def applied_plan(self, plans: dict[str, Any]) -> Any:
        """The migration as a :class:`~deeppar.eplb.planning.Plan` (for its picture): the
        ``deepseek`` plan of the same loads with the migration's maps and the figures that
        follow from them; its "before" is the contiguous placement the run starts from."""
        from deeppar.eplb.planning import balancedness, gpu_loads

        base, mig = plans["deepseek"], plans["migration"]
        after = gpu_loads(base.weight, mig.phy2log, mig.logcnt, self.cfg.ep)
        per_layer = balancedness(after)
        top = after.max(dim=1).values
        bound = base.max_load_bound.to(top.dtype)
        gap = torch.where(bound > 0, top / bound - 1, torch.zeros_like(bound))
        return replace(base, phy2log=mig.phy2log, log2phy=mig.log2phy, logcnt=mig.logcnt,
                       gpu_load=after, layer_balancedness=per_layer,
                       balancedness=float(per_layer.mean()), bound_gap=float(gap.mean()),
                       method="migration-aware")


__all__ = ["ExpertBalancer", "log2phy_of"]
