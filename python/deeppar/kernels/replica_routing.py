"""Triton kernel of replica routing: the physical slot of each (token, logical expert).

Registered as the custom op ``deeppar::route_replicas_triton`` with a fake (shape) function, so
``torch.compile`` traces it and ``torch.library.opcheck`` checks it (also under
``TRITON_INTERPRET=1`` on CPU). Rules are those of ``deeppar.eplb.routing``; the candidate
table comes from ``replica_candidates`` there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    ids_ptr,  # [M] int logical expert of each (token, k), row-major over [tokens, k]
    table_ptr,  # [E, X] int64 candidate slots of each expert, compacted
    count_ptr,  # [E] int64 candidates of each expert (>= 1)
    out_ptr,  # [M] int64 out: chosen physical slot (-1 for an id outside [0, E))
    m,
    experts,
    width,
    topk,
    token_offset,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = i < m
    e = tl.load(ids_ptr + i, mask=inside, other=0).to(tl.int64)
    ok = inside & (e >= 0) & (e < experts)
    n = tl.maximum(tl.load(count_ptr + e, mask=ok, other=1), 1)
    j = (i // topk + token_offset) % n
    slot = tl.load(table_ptr + e * width + j, mask=ok, other=-1)
    tl.store(out_ptr + i, slot, mask=inside)


@torch.library.custom_op("deeppar::route_replicas_triton", mutates_args=())
def route_replicas_triton(
    ids: torch.Tensor, table: torch.Tensor, count: torch.Tensor, topk: int, token_offset: int
) -> torch.Tensor:
    """Slots ``[M]`` int64 for the flat ids ``[M]`` of ``[tokens, topk]``: token ``t`` takes
    candidate ``(t + token_offset) % count[e]`` of its expert ``e`` in ``table [E, X]``."""
    ids = ids.contiguous()
    table = table.contiguous()
    count = count.contiguous()
    out = torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
    m = ids.numel()
    if m == 0:
        return out
    experts, width = table.shape
    block = 1024
    _route_kernel[(triton.cdiv(m, block),)](
        ids, table, count, out, m, experts, width, topk, token_offset, BLOCK=block,
    )
    return out


@route_replicas_triton.register_fake
def _route_replicas_fake(ids, table, count, topk, token_offset):
    return torch.empty(ids.shape, dtype=torch.int64, device=ids.device)
