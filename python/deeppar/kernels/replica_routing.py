"""Triton kernel of replica routing: the physical slot of each (token, logical expert).

Registered as the custom op ``deeppar::route_replicas_triton`` with a fake (shape) function, so
``torch.compile`` traces it and ``torch.library.opcheck`` checks it (also under
``TRITON_INTERPRET=1`` on CPU). Rules are those of ``deeppar.eplb.routing``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    ids_ptr,  # [M] int64 logical expert of each (token, k), row-major over [tokens, k]
    log2phy_ptr,  # [E, X] int64 slots of each expert, valid first, -1 padded
    logcnt_ptr,  # [E] int64 replicas of each expert
    out_ptr,  # [M] int64 out: chosen physical slot (-1 for an id outside [0, E))
    m,
    experts,
    width,
    topk,
    token_offset,
    local_gpu,  # -1: no preference
    slots_per_gpu,
    gpus_per_node,  # 0: no node preference
    BLOCK: tl.constexpr,
    WIDTH: tl.constexpr,  # >= width, a power of 2
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < m
    e = tl.load(ids_ptr + i, mask=inside, other=0)
    ok = inside & (e >= 0) & (e < experts)
    e = tl.where(ok, e, 0)
    cnt = tl.load(logcnt_ptr + e, mask=ok, other=1)
    j = tl.arange(0, WIDTH)
    valid = (j[None, :] < cnt[:, None]) & (j[None, :] < width) & ok[:, None]
    cand = tl.load(log2phy_ptr + e[:, None] * width + j[None, :], mask=valid, other=0)
    tier = valid
    if local_gpu >= 0:
        gpu = cand // slots_per_gpu
        if gpus_per_node > 0:
            near = valid & (gpu // gpus_per_node == local_gpu // gpus_per_node)
            has = tl.sum(near.to(tl.int32), 1) > 0
            tier = tl.where(has[:, None], near, tier)
        here = valid & (gpu == local_gpu)
        has = tl.sum(here.to(tl.int32), 1) > 0
        tier = tl.where(has[:, None], here, tier)
    n = tl.maximum(tl.sum(tier.to(tl.int32), 1), 1).to(tl.int64)
    order = (i // topk + token_offset) % n
    position = tl.cumsum(tier.to(tl.int32), 1) - 1
    pick = tier & (position.to(tl.int64) == order[:, None])
    slot = tl.sum(tl.where(pick, cand, 0), 1)
    tl.store(out_ptr + i, tl.where(ok, slot, -1), mask=inside)


@torch.library.custom_op("deeppar::route_replicas_triton", mutates_args=())
def route_replicas_triton(
    ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    topk: int,
    token_offset: int,
    local_gpu: int,
    slots_per_gpu: int,
    gpus_per_node: int,
) -> torch.Tensor:
    """Slots ``[M]`` for the flat ids ``[M]`` of ``[tokens, topk]`` (see deeppar.eplb.routing);
    ``local_gpu=-1``: no locality, ``gpus_per_node=0``: no node tier."""
    ids = ids.contiguous()
    log2phy = log2phy.contiguous()
    logcnt = logcnt.contiguous()
    out = torch.empty_like(ids)
    m = ids.numel()
    if m == 0:
        return out
    experts, width = log2phy.shape
    block = 256
    _route_kernel[(triton.cdiv(m, block),)](
        ids, log2phy, logcnt, out, m, experts, width, topk, token_offset, local_gpu,
        slots_per_gpu, gpus_per_node, BLOCK=block, WIDTH=triton.next_power_of_2(max(width, 1)),
    )
    return out


@route_replicas_triton.register_fake
def _route_replicas_fake(ids, log2phy, logcnt, topk, token_offset, local_gpu, slots_per_gpu,
                         gpus_per_node):
    return torch.empty_like(ids)
