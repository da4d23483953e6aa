"""Triton kernels of the MoE token permute / unpermute (semantics in ``deeppar.moe.reference``).

Every kernel runs on a fixed grid of ``num_sms`` persistent programs (0: one per SM of the
device), so a communication stream can hold a known number of SMs. Permute is a stable counting
sort in two launches: each program counts the experts of its contiguous chunk of (token, slot)
pairs; then each program derives its chunk's first row per expert from all counts, ranks its
pairs in order (a one-hot cumulative sum per tile) and copies their rows. Unpermute walks the
tokens with a stride of the grid size and sums the top-k rows in slot order.

Loops with runtime bounds are ``while`` loops: Triton's interpreter, where scalars are
1-element arrays, cannot ``range`` over them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _count_kernel(
    ids_ptr,  # [N] int64 expert id of each (token, slot) pair
    hist_ptr,  # [G, E] int64 out: pairs of each expert in each program's chunk
    pairs,
    per_chunk,
    experts,
    BLOCK: tl.constexpr,
    EXPERTS_P2: tl.constexpr,
):
    pid = tl.program_id(0)
    start = pid * per_chunk
    stop = tl.minimum(pairs, start + per_chunk)
    expert = tl.arange(0, EXPERTS_P2)
    counts = tl.zeros([EXPERTS_P2], dtype=tl.int64)
    first = start
    while first < stop:
        idx = first + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + idx, mask=idx < stop, other=-1)
        counts += tl.sum((ids[:, None] == expert[None, :]).to(tl.int64), axis=0)
        first += BLOCK
    tl.store(hist_ptr + pid * experts + expert, counts, mask=expert < experts)


@triton.jit
def _scatter_kernel(
    x_ptr,  # [T, H] tokens
    ids_ptr,  # [N] int64
    hist_ptr,  # [G, E] int64 from _count_kernel
    out_ptr,  # [N, H] permuted rows
    pos_ptr,  # [N] int64 out: row of each pair
    rank_counts_ptr,  # [R] int64 out
    expert_counts_ptr,  # [E] int64 out
    pairs,
    per_chunk,
    experts,
    ranks,
    experts_per_rank,
    hidden,
    top_k,
    num_programs,
    BLOCK: tl.constexpr,
    EXPERTS_P2: tl.constexpr,
    RANKS_P2: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    expert = tl.arange(0, EXPERTS_P2)
    valid = expert < experts
    totals = tl.zeros([EXPERTS_P2], dtype=tl.int64)
    before = tl.zeros([EXPERTS_P2], dtype=tl.int64)
    g = pid * 0
    while g < num_programs:
        chunk_counts = tl.load(hist_ptr + g * experts + expert, mask=valid, other=0)
        totals += chunk_counts
        before += tl.where(g < pid, chunk_counts, 0)
        g += 1
    next_row = tl.cumsum(totals, axis=0) - totals + before
    if pid == 0:
        tl.store(expert_counts_ptr + expert, totals, mask=valid)
        rank = tl.arange(0, RANKS_P2)
        owner = expert // experts_per_rank
        per_rank = tl.sum(tl.where(owner[:, None] == rank[None, :], totals[:, None], 0), axis=0)
        tl.store(rank_counts_ptr + rank, per_rank, mask=rank < ranks)
    start = pid * per_chunk
    stop = tl.minimum(pairs, start + per_chunk)
    first = start
    while first < stop:
        idx = first + tl.arange(0, BLOCK)
        first += BLOCK
        mask = idx < stop
        ids = tl.load(ids_ptr + idx, mask=mask, other=-1)
        onehot = (ids[:, None] == expert[None, :]).to(tl.int64)
        earlier_same = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        row = tl.sum(onehot * next_row[None, :], axis=1) + earlier_same
        next_row += tl.sum(onehot, axis=0)
        tl.store(pos_ptr + idx, row, mask=mask)
        token = idx // top_k
        h0 = pid * 0
        while h0 < hidden:
            h = h0 + tl.arange(0, BLOCK_H)
            h0 += BLOCK_H
            m = mask[:, None] & (h[None, :] < hidden)
            vals = tl.load(x_ptr + token[:, None] * hidden + h[None, :], mask=m)
            tl.store(out_ptr + row[:, None] * hidden + h[None, :], vals, mask=m)


@triton.jit
def _round_to_bfloat16(x):
    """float32 rounded to the nearest bfloat16 value, ties to even, still as float32, so that
    the cast that follows is exact (Triton's interpreter truncates when it casts)."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _unpermute_kernel(
    y_ptr,  # [T*k, H] rows in permuted order
    pos_ptr,  # [T, k] int64
    w_ptr,  # [T, k] weights
    out_ptr,  # [T, H]
    tokens,
    top_k,
    hidden,
    num_programs,
    ACC_F64: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    acc_dtype = tl.float64 if ACC_F64 else tl.float32
    t = tl.program_id(0).to(tl.int64)
    while t < tokens:
        h0 = t * 0
        while h0 < hidden:
            h = h0 + tl.arange(0, BLOCK_H)
            h0 += BLOCK_H
            m = h < hidden
            row = tl.load(pos_ptr + t * top_k)
            w = tl.load(w_ptr + t * top_k).to(acc_dtype)
            acc = w * tl.load(y_ptr + row * hidden + h, mask=m, other=0.0).to(acc_dtype)
            j = t * 0 + 1
            while j < top_k:
                row = tl.load(pos_ptr + t * top_k + j)
                w = tl.load(w_ptr + t * top_k + j).to(acc_dtype)
                acc = acc + w * tl.load(y_ptr + row * hidden + h, mask=m, other=0.0).to(acc_dtype)
                j += 1
            if ROUND_BF16:
                acc = _round_to_bfloat16(acc)
            out = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + t * hidden + h, out, mask=m)
        t += num_programs


def default_grid(device: torch.device) -> int:
    """Programs per launch when ``num_sms`` is 0: one per SM (4 under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@torch.library.custom_op("deeppar::moe_permute_triton", mutates_args=())
def moe_permute_triton(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_ranks: int, num_sms: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton ``moe_permute`` (see ``deeppar.moe.permute``) on ``num_sms`` programs."""
    x, ids = x.contiguous(), topk_ids.contiguous()
    tokens, top_k = ids.shape
    hidden, pairs = x.shape[1], ids.numel()
    out = x.new_empty((pairs, hidden))
    pos = ids.new_empty((tokens, top_k))
    rank_counts = ids.new_zeros((num_ranks,))
    expert_counts = ids.new_zeros((num_experts,))
    if pairs == 0:
        return out, pos, rank_counts, expert_counts
    grid = num_sms or default_grid(x.device)
    per_chunk = triton.cdiv(pairs, grid)
    experts_p2 = triton.next_power_of_2(num_experts)
    block = max(16, min(128, 8192 // experts_p2))
    hist = ids.new_empty((grid, num_experts))
    _count_kernel[(grid,)](ids, hist, pairs, per_chunk, num_experts, BLOCK=block,
                           EXPERTS_P2=experts_p2)
    _scatter_kernel[(grid,)](
        x, ids, hist, out, pos, rank_counts, expert_counts, pairs, per_chunk, num_experts,
        num_ranks, num_experts // num_ranks, hidden, top_k, grid, BLOCK=block,
        EXPERTS_P2=experts_p2, RANKS_P2=triton.next_power_of_2(num_ranks),
        BLOCK_H=min(256, triton.next_power_of_2(max(hidden, 1))),
    )
    return out, pos, rank_counts, expert_counts


@torch.library.custom_op("deeppar::moe_unpermute_triton", mutates_args=())
def moe_unpermute_triton(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, num_sms: int
) -> torch.Tensor:
    """Triton ``moe_unpermute`` (see ``deeppar.moe.unpermute``) on ``num_sms`` programs."""
    y, pos, weights = y.contiguous(), pos.contiguous(), weights.contiguous()
    tokens, top_k = pos.shape
    hidden = y.shape[1]
    if top_k == 0:
        return y.new_zeros((tokens, hidden))
    out = y.new_empty((tokens, hidden))
    if tokens == 0 or hidden == 0:
        return out
    grid = num_sms or default_grid(y.device)
    _unpermute_kernel[(grid,)](
        y, pos, weights, out, tokens, top_k, hidden, grid, ACC_F64=y.dtype == torch.float64,
        ROUND_BF16=y.dtype == torch.bfloat16,
        BLOCK_H=min(1024, triton.next_power_of_2(hidden)),
    )
    return out
