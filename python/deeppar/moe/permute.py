"""Token permute / unpermute for expert parallelism (public wrappers over :mod:`._ops`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from deeppar.moe import _ops


class PermutedTokens(NamedTuple):
    """Result of :func:`permute`."""

    tokens: torch.Tensor  # [T*k, H] rows ordered by destination rank, then expert
    pos: torch.Tensor  # [T, k] int64, row of pair (t, j) in ``tokens``
    rank_counts: torch.Tensor  # [R] int64, rows for each destination rank
    expert_counts: torch.Tensor  # [E] int64, rows for each expert


def _num_sms(num_sms: int | None) -> int:
    if num_sms is None:
        return 0
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 0:
        raise ValueError(f"num_sms must be None or an int >= 0, got {num_sms!r}")
    return num_sms


def check_topk_ids(topk_ids: torch.Tensor, num_experts: int, num_ranks: int = 1) -> None:
    """Raise ValueError/TypeError unless ``topk_ids`` is an int64 ``[T, k]`` tensor of ids in
    ``[0, num_experts)`` with ``k <= num_experts`` and ``num_ranks`` dividing ``num_experts``.
    (Reads the ids' range: one device sync on GPU.)"""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype != torch.int64:
        raise TypeError("topk_ids must be an int64 tensor")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, top_k], got shape {tuple(topk_ids.shape)}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(num_ranks, int) or num_ranks < 1 or num_experts % num_ranks:
        raise ValueError(
            f"num_ranks must be a positive divisor of num_experts={num_experts}, got {num_ranks!r}"
        )
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"top_k={topk_ids.shape[1]} exceeds num_experts={num_experts}")
    if topk_ids.numel() and (
        bool((topk_ids.min() < 0) | (topk_ids.max() >= num_experts))
    ):
        raise ValueError(f"topk_ids holds expert ids outside [0, {num_experts})")


def permute(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    num_ranks: int = 1,
    *,
    backend: str | None = None,
    num_sms: int | None = None,
) -> PermutedTokens:
    """Copy each token once per chosen expert, ordered by destination rank then expert.

    Args:
        x: ``[T, H]`` tokens (differentiable).
        topk_ids: ``[T, k]`` int64 expert ids (from :class:`~deeppar.moe.Router`).
        num_experts: ``E``; rank ``r`` of ``num_ranks`` owns experts ``[r*E/R, (r+1)*E/R)``.
        backend: ``None`` (native kernel of the device, else Triton on CUDA, else reference),
            ``"native"`` (or ``"cpu"``/``"cuda"``), ``"triton"`` or ``"reference"``; names
            and choice as in :func:`deeppar.ops.resolve`.
        num_sms: GPU kernels run on exactly this many persistent blocks (``None``: one wave
            sized by the device); ignored on CPU.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError("x must be a floating-point [tokens, hidden] tensor")
    check_topk_ids(topk_ids, num_experts, num_ranks)
    if topk_ids.shape[0] != x.shape[0] or topk_ids.device != x.device:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} must have one row per token of x "
            f"{tuple(x.shape)}, on the same device"
        )
    permute_op, _ = _ops.resolve_backend(backend, x.device)
    outputs = permute_op(x.contiguous(), topk_ids.contiguous(), num_experts, num_ranks,
                         _num_sms(num_sms))
    return PermutedTokens(*outputs)


def unpermute(
    y: torch.Tensor,
    pos: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    backend: str | None = None,
    num_sms: int | None = None,
) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y[pos[t, j]]`` summed in top-k order.

    Args:
        y: ``[T*k, H]`` expert outputs in permuted order (differentiable).
        pos: ``[T, k]`` int64 from :func:`permute`.
        topk_weights: ``[T, k]`` floating weights (differentiable).
    Returns ``[T, H]`` in ``y``'s dtype (sums kept in float32, float64 for float64 ``y``).
    """
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() != 2:
        raise TypeError("y must be a floating-point [tokens * top_k, hidden] tensor")
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or pos.dim() != 2:
        raise TypeError("pos must be the int64 [tokens, top_k] tensor returned by permute")
    if pos.numel() != y.shape[0]:
        raise ValueError(f"y has {y.shape[0]} rows, pos maps {pos.numel()} (token, slot) pairs")
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
        raise TypeError("topk_weights must be a floating-point tensor")
    if topk_weights.shape != pos.shape:
        raise ValueError(
            f"topk_weights {tuple(topk_weights.shape)} must match pos {tuple(pos.shape)}"
        )
    if pos.device != y.device or topk_weights.device != y.device:
        raise ValueError("y, pos and topk_weights must be on the same device")
    _, unpermute_op = _ops.resolve_backend(backend, y.device)
    return unpermute_op(y.contiguous(), pos.contiguous(), topk_weights.contiguous(),
                        _num_sms(num_sms))
