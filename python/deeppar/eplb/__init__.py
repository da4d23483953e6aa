"""Expert-parallel load balancer (EPLB), drop-in for DeepSeek's ``eplb`` module.

``import deeppar.eplb as eplb`` then ``eplb.rebalance_experts(weight, R, G, N, P)``; the exact
rules (ties included) are in ``specs/eplb.md``. Backends: ``reference`` (plain Python, the
oracle), ``cpu`` (C++), ``cuda`` (CUDA kernel) and ``triton``; all bit-identical.
"""

from deeppar.eplb._backends import BACKENDS, BackendUnavailable, available
from deeppar.eplb.api import (
    balanced_packing,
    rebalance_experts,
    rebalance_experts_hierarchical,
    replicate_experts,
)
from deeppar.eplb.plan import Plan, plan

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "Plan",
    "available",
    "balanced_packing",
    "plan",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]
