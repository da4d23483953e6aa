"""Plain PyTorch token permute / unpermute (argsort + index ops): the reference every kernel is
tested against, and the fallback when no kernel can run.

Semantics shared by every backend:

* ``permute`` orders the ``T * k`` (token, slot) pairs by expert id, stably (by token, then
  slot). Experts are split contiguously over ``R`` ranks, so expert order is also
  destination-rank order. ``pos[t, j]`` is the row of pair ``(t, j)`` in the permuted tokens.
* ``unpermute`` returns ``out[t] = sum_j w[t, j] * y[pos[t, j]]``, summed left to right over
  ``j`` in the accumulation dtype (float64 for float64 data, float32 otherwise), then rounded
  once to ``y``'s dtype. ``acc = w0 * y0`` starts the sum (not ``0 + w0 * y0``).
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def permute_reference(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_ranks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [T, H]``, ``topk_ids [T, k]`` -> (tokens ``[T*k, H]``, pos ``[T, k]``, rank counts
    ``[R]``, expert counts ``[E]``), counts and pos int64."""
    tokens, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # pair index of each permuted row
    permuted = x.index_select(0, order // k) if k else x.new_empty((0, x.shape[1]))
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)
    expert_counts = torch.bincount(flat, minlength=num_experts)
    rank_counts = expert_counts.view(num_ranks, num_experts // num_ranks).sum(1)
    return permuted, pos.view(tokens, k), rank_counts, expert_counts


def unpermute_reference(y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y [T*k, H]`` (permuted order), ``pos [T, k]``, ``weights [T, k]`` -> ``[T, H]``."""
    tokens, k = pos.shape
    acc_dtype = accumulation_dtype(y.dtype)
    w = weights.to(acc_dtype)
    if k == 0:
        return y.new_zeros((tokens, y.shape[1]))
    acc = w[:, 0, None] * y.index_select(0, pos[:, 0]).to(acc_dtype)
    for j in range(1, k):
        acc = acc + w[:, j, None] * y.index_select(0, pos[:, j]).to(acc_dtype)
    return acc.to(y.dtype)


def unpermute_backward(
    grad_out: torch.Tensor, y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``unpermute`` w.r.t. ``y`` and ``weights`` (one formula for every backend,
    so their gradients agree bit for bit): ``grad_y[pos[t, j]] = w[t, j] * grad_out[t]`` and
    ``grad_w[t, j] = <grad_out[t], y[pos[t, j]]>``, both in the accumulation dtype."""
    tokens, k = pos.shape
    acc_dtype = accumulation_dtype(y.dtype)
    flat_pos = pos.reshape(-1)
    src = torch.empty_like(flat_pos)
    src[flat_pos] = torch.arange(flat_pos.numel(), device=pos.device)
    g = grad_out.to(acc_dtype)
    grad_y = (weights.reshape(-1).to(acc_dtype)[src, None] * g.index_select(0, src // max(k, 1)))
    gathered = y.index_select(0, flat_pos).to(acc_dtype).view(tokens, k, y.shape[1])
    grad_w = (gathered * g[:, None, :]).sum(-1)
    return grad_y.to(y.dtype), grad_w.to(weights.dtype)
