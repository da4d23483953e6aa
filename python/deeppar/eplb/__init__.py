"""Expert-parallel load balancer (EPLB), drop-in for DeepSeek's ``eplb`` module.

``import deeppar.eplb as eplb`` then ``eplb.rebalance_experts(weight, R, G, N, P)``; the exact
rules (ties included) are in ``specs/eplb.md``. Backends: ``reference`` (plain Python, the
oracle), ``cpu`` (C++), ``cuda`` (CUDA kernel) and ``triton``; all bit-identical.
``method="balanced"`` plans a better placement with the same replica counts (one C++ algorithm, run
on the CPU and, one thread per layer, on the GPU).

Around the planner: ``LoadRecorder`` (per-layer expert loads counted on the device),
``migrate`` (a new plan that moves few replicas, with its transfer plan),
``rearrange_expert_weights`` (moves expert weights between ranks, all or nothing) and
``route_to_replicas`` (each token's physical slot).

Names load on first use, so that ``deeppar.eplb.cli`` (imported by the command-line parser)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BACKENDS": "deeppar.eplb._backends",
    "BackendUnavailable": "deeppar.eplb._backends",
    "METHODS": "deeppar.eplb._backends",
    "available": "deeppar.eplb._backends",
    "balanced_packing": "deeppar.eplb.api",
    "rebalance_experts": "deeppar.eplb.api",
    "rebalance_experts_hierarchical": "deeppar.eplb.api",
    "replicate_experts": "deeppar.eplb.api",
    "Plan": "deeppar.eplb.planning",
    "plan": "deeppar.eplb.planning",
    "LoadRecorder": "deeppar.eplb.recorder",
    "Migration": "deeppar.eplb.migration",
    "migrate": "deeppar.eplb.migration",
    "RearrangeStats": "deeppar.eplb.rearrange",
    "rearrange_expert_weights": "deeppar.eplb.rearrange",
    "route_to_replicas": "deeppar.eplb.routing",
}

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "LoadRecorder",
    "METHODS",
    "Migration",
    "Plan",
    "RearrangeStats",
    "available",
    "balanced_packing",
    "migrate",
    "plan",
    "rearrange_expert_weights",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
    "route_to_replicas",
]

if TYPE_CHECKING:
    from deeppar.eplb._backends import BACKENDS, METHODS, BackendUnavailable, available
    from deeppar.eplb.api import (
        balanced_packing,
        rebalance_experts,
        rebalance_experts_hierarchical,
        replicate_experts,
    )
    from deeppar.eplb.migration import Migration, migrate
    from deeppar.eplb.planning import Plan, plan
    from deeppar.eplb.rearrange import RearrangeStats, rearrange_expert_weights
    from deeppar.eplb.recorder import LoadRecorder
    from deeppar.eplb.routing import route_to_replicas


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deeppar.eplb' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
