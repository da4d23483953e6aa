"""Expert parallelism on torch.distributed: routing, token permute / unpermute kernels,
dispatch / combine over an EP process group, and an MoE layer built from them."""

from deeppar.moe.dispatch_combine import (
    DispatchLayout,
    PendingTransfer,
    agree_on_routing,
    combine,
    combine_backward_start,
    combine_start,
    dispatch,
    dispatch_backward_start,
    dispatch_start,
    exchange_counts,
)
from deeppar.moe.experts import SwiGLUExperts, expert_major_order
from deeppar.moe.layer import MoELayer, Routing
from deeppar.moe.permute import PermutedTokens, check_topk_ids, permute, unpermute
from deeppar.moe.reference import permute_reference, unpermute_reference
from deeppar.moe.router import Router
from deeppar.moe.sm_budget import (
    ComputePartition,
    compute_partition,
    ep_group,
    green_context_status,
    nccl_cta_budget_status,
)

__all__ = [
    "ComputePartition", "compute_partition", "ep_group", "green_context_status",
    "nccl_cta_budget_status",
    "DispatchLayout", "MoELayer", "PendingTransfer", "PermutedTokens", "Router", "Routing",
    "SwiGLUExperts", "agree_on_routing", "check_topk_ids", "combine", "combine_backward_start",
    "combine_start", "dispatch", "dispatch_backward_start", "dispatch_start", "exchange_counts",
    "expert_major_order", "permute", "permute_reference", "unpermute", "unpermute_reference",
]
