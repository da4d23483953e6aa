"""``plan()``: the maps of ``rebalance_experts`` together with how good they are."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deeppar import _native, ops
from deeppar.eplb import api, reference


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor,
              num_gpus: int) -> torch.Tensor:
    """``[L, P]`` float64 load of each GPU: sum over its slots of expert load / replica count.
    The per-slot loads come from the ``slot_loads`` kernel (float32, as planned); the sums per
    GPU are float64 (sums of large float32 loads would overflow to inf and make balancedness
    NaN)."""
    slot = ops.slot_loads(weight.to(torch.float32).contiguous(), phy2log, logcnt)
    slot = slot.to(torch.float64)
    return slot.view(slot.shape[0], num_gpus, -1).sum(-1)


def duplicate_gpus(phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L]`` int64: GPUs per layer that hold two or more replicas of one expert (wasted slots:
    one replica with the summed load would do)."""
    per_gpu = phy2log.view(phy2log.shape[0], num_gpus, -1).sort(dim=-1).values
    repeated = (per_gpu[..., 1:] == per_gpu[..., :-1]).any(dim=-1)
    return repeated.sum(dim=-1)


def identity_loads(weight: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """``[L, P]`` GPU loads with no replication: expert ``e`` on GPU ``e * P // E`` (contiguous,
    as even as possible), the placement one gets without a load balancer."""
    w = weight.to(torch.float64)
    experts = w.shape[1]
    gpu = torch.arange(experts, device=w.device) * num_gpus // experts
    out = torch.zeros(w.shape[0], num_gpus, dtype=torch.float64, device=w.device)
    return out.index_add_(1, gpu, w)


def balancedness(loads: torch.Tensor) -> torch.Tensor:
    """``[L]`` mean / max GPU load per layer (1.0 for an all-zero layer)."""
    top = loads.max(dim=1).values
    ratio = loads.mean(dim=1) / top
    return torch.where(top > 0, ratio, torch.ones_like(ratio))


def max_load_lower_bound(weight: torch.Tensor, num_replicas: int, num_gpus: int) -> torch.Tensor:
    """``[L]`` lower bound on any plan's max GPU load (spec "Quality measure"): the larger of
    total / P and the largest per-replica load after optimal (greedy) replication to R slots
    (the replication is planned in float32 as the planner does; the loads are float64)."""
    w = weight.to(torch.float32).cpu()
    if _native.has_kernel("eplb_replicate", "cpu"):
        _, _, count = torch.ops.deeppar.eplb_replicate(w, num_replicas)
    else:
        _, _, count = reference.replicate_experts(w, num_replicas)
    w = w.to(torch.float64)
    per_replica = (w / count.to(torch.float64)).max(dim=1).values
    return torch.maximum(w.sum(dim=1) / num_gpus, per_replica)


@dataclass(frozen=True)
class Plan:
    """An EPLB plan and its quality. Tensors are on the input's device; metrics on the CPU."""

    weight: torch.Tensor  # [L, E] float32 on the CPU, the loads that were planned for
    phy2log: torch.Tensor  # [L, R] int64, logical expert of each physical slot
    log2phy: torch.Tensor  # [L, E, X] int64, slots of each expert, -1 padded
    logcnt: torch.Tensor  # [L, E] int64, replicas of each expert
    gpu_load: torch.Tensor  # [L, P] float64, load of each GPU under this plan
    gpu_load_before: torch.Tensor  # [L, P] float64, identity placement, no replication
    layer_balancedness: torch.Tensor  # [L] float64, mean / max GPU load
    balancedness: float  # mean over layers of layer_balancedness
    balancedness_before: float  # the same for the identity placement
    balancedness_bound: float  # mean over layers of mean load / lower bound on max load
    max_load_bound: torch.Tensor  # [L] float32, spec's lower bound on any plan's max GPU load
    bound_gap: float  # mean over layers of max GPU load / lower bound - 1 (0: provably optimal)
    duplicate_gpus: int  # (layer, GPU) pairs where a GPU holds one expert twice or more
    policy: str  # "hierarchical" or "global"
    backend: str  # backend that computed the maps
    method: str  # "deepseek" or "balanced"
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def summary(self) -> str:
        """A few human-readable lines."""
        loads = self.gpu_load
        layers, experts = self.logcnt.shape
        return "\n".join([
            f"EPLB plan: {layers} layers, {experts} experts -> {self.num_replicas} replicas, "
            f"{self.num_groups} groups, {self.num_nodes} nodes, {self.num_gpus} GPUs",
            f"policy: {self.policy} (method: {self.method}, backend: {self.backend})",
            f"balancedness before (no replication, expert e on GPU e*P//E): "
            f"{self.balancedness_before:.4f}",
            f"balancedness after: {self.balancedness:.4f} "
            f"(upper bound {self.balancedness_bound:.4f}; max GPU load exceeds the lower bound "
            f"by {100 * self.bound_gap:.2f}% on average)",
            f"GPUs holding one expert twice or more: {self.duplicate_gpus} (over all layers)",
            f"max GPU load: {loads.max(dim=1).values.mean():.4g} "
            f"(before {self.gpu_load_before.max(dim=1).values.mean():.4g}), "
            f"mean GPU load: {loads.mean(dim=1).mean():.4g} (averaged over layers)",
        ])

    def to_dict(self) -> dict:
        """JSON-ready maps and metrics."""
        return {
            "policy": self.policy,
            "backend": self.backend,
            "method": self.method,
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
            "num_nodes": self.num_nodes,
            "num_gpus": self.num_gpus,
            "balancedness": self.balancedness,
            "balancedness_before": self.balancedness_before,
            "balancedness_bound": self.balancedness_bound,
            "bound_gap": self.bound_gap,
            "duplicate_gpus": self.duplicate_gpus,
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "gpu_load": self.gpu_load.tolist(),
        }


def plan(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str | None = None,
    max_replicas: int | None = None,
    method: str = "deepseek",
) -> Plan:
    """Run :func:`rebalance_experts` and measure the plan (see :class:`Plan`)."""
    phy2log, log2phy, logcnt, problem, name = api.plan_maps(
        weight, num_replicas, num_groups, num_nodes, num_gpus,
        backend=backend, max_replicas=max_replicas, method=method,
    )
    w = weight.detach().to("cpu", torch.float32)
    after = gpu_loads(w, phy2log.cpu(), logcnt.cpu(), problem.gpus)
    before = identity_loads(w, problem.gpus)
    per_layer = balancedness(after)
    bound = max_load_lower_bound(w, problem.replicas, problem.gpus)
    mean = w.double().sum(dim=1) / problem.gpus
    bound_ratio = torch.where(bound > 0, mean / bound, torch.ones_like(bound))
    top = after.max(dim=1).values
    gap = torch.where(bound > 0, top / bound - 1, torch.zeros_like(bound))
    return Plan(
        weight=w,
        phy2log=phy2log,
        log2phy=log2phy,
        logcnt=logcnt,
        gpu_load=after,
        gpu_load_before=before,
        layer_balancedness=per_layer,
        balancedness=float(per_layer.mean()),
        balancedness_before=float(balancedness(before).mean()),
        balancedness_bound=float(bound_ratio.mean()),
        max_load_bound=bound,
        bound_gap=float(gap.mean()),
        duplicate_gpus=int(duplicate_gpus(phy2log.cpu(), problem.gpus).sum()),
        policy=problem.policy,
        backend=name,
        method=method,
        num_replicas=problem.replicas,
        num_groups=problem.groups,
        num_nodes=problem.nodes,
        num_gpus=problem.gpus,
    )
