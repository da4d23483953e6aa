"""The permute / unpermute operators of every backend, with fakes and autograd.

* native: ``torch.ops.deeppar.moe_permute`` / ``moe_unpermute`` (schemas in ``csrc/ops.cpp``,
  kernels in ``csrc/cpu`` and ``csrc/cuda``), present when the extension is built;
* triton: ``deeppar::moe_permute_triton`` / ``moe_unpermute_triton`` (``deeppar.kernels``);
* reference: ``deeppar::moe_permute_reference`` / ``moe_unpermute_reference``, plain PyTorch.

All three get the same fake (shape) functions and the same backward, which calls the backend's
own unpermute for the permute's gradient and :func:`unpermute_backward` for the unpermute's, so
gradients agree bit for bit wherever the forward does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deeppar import _native, ops
from deeppar.moe.reference import permute_reference, unpermute_backward, unpermute_reference

OpPair = tuple[Callable[..., Any], Callable[..., Any]]


def _permute_fake(x, topk_ids, num_experts, num_ranks, num_sms):
    tokens, k = topk_ids.shape
    return (
        x.new_empty((tokens * k, x.shape[1])),
        topk_ids.new_empty((tokens, k), dtype=torch.int64),
        topk_ids.new_empty((num_ranks,), dtype=torch.int64),
        topk_ids.new_empty((num_experts,), dtype=torch.int64),
    )


def _unpermute_fake(y, pos, weights, num_sms):
    return y.new_empty((pos.shape[0], y.shape[1]))


def register_pair(permute_op, unpermute_op, *, fakes: bool) -> OpPair:
    """Give a (permute, unpermute) operator pair its fakes (when ``fakes``) and autograd."""
    if fakes:
        torch.library.register_fake(permute_op, _permute_fake)
        torch.library.register_fake(unpermute_op, _unpermute_fake)

    def permute_setup(ctx, inputs, output):
        ctx.num_sms = inputs[4]
        ctx.save_for_backward(output[1])

    def permute_backward(ctx, grad_tokens, *_):
        (pos,) = ctx.saved_tensors
        ones = torch.ones(pos.shape, dtype=torch.float32, device=pos.device)
        grad_x = unpermute_op(grad_tokens.contiguous(), pos, ones, ctx.num_sms)
        return grad_x, None, None, None, None

    def unpermute_setup(ctx, inputs, output):
        y, pos, weights, _ = inputs
        ctx.save_for_backward(y, pos, weights)

    def unpermute_backward_fn(ctx, grad_out):
        y, pos, weights = ctx.saved_tensors
        grad_y, grad_w = unpermute_backward(grad_out, y, pos, weights)
        return grad_y, None, grad_w, None

    torch.library.register_autograd(permute_op, permute_backward, setup_context=permute_setup)
    torch.library.register_autograd(
        unpermute_op, unpermute_backward_fn, setup_context=unpermute_setup
    )
    return permute_op, unpermute_op


@torch.library.custom_op("deeppar::moe_permute_reference", mutates_args=())
def _permute_reference_op(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, num_ranks: int, num_sms: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    permuted, pos, rank_counts, expert_counts = permute_reference(
        x, topk_ids, num_experts, num_ranks
    )
    return permuted, pos, rank_counts, expert_counts


@torch.library.custom_op("deeppar::moe_unpermute_reference", mutates_args=())
def _unpermute_reference_op(
    y: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor, num_sms: int
) -> torch.Tensor:
    return unpermute_reference(y, pos, weights)


REFERENCE_OPS: OpPair = register_pair(_permute_reference_op, _unpermute_reference_op, fakes=True)


def _native_pair() -> OpPair | None:
    if not _native.NATIVE_LOADED:
        return None
    try:
        pair = (torch.ops.deeppar.moe_permute.default, torch.ops.deeppar.moe_unpermute.default)
    except AttributeError:  # an extension built before these ops existed
        return None
    return register_pair(*pair, fakes=True)


NATIVE_OPS: OpPair | None = _native_pair()
_triton_ops: OpPair | None = None


def triton_ops() -> OpPair:
    """The Triton operator pair (imports triton on first use)."""
    global _triton_ops
    if _triton_ops is None:
        from deeppar.kernels.moe_permute import moe_permute_triton, moe_unpermute_triton

        _triton_ops = register_pair(moe_permute_triton, moe_unpermute_triton, fakes=True)
    return _triton_ops


def resolve_backend(backend: str | None, device: torch.device) -> OpPair:
    """The operator pair that :func:`deeppar.ops.resolve` picks for ``backend`` on ``device``
    (``None``: the device's native kernel, else Triton on CUDA, else the reference)."""
    name = ops.resolve(ops.MOE_PERMUTE, backend, device)
    if name == "triton":
        return triton_ops()
    if name == "reference":
        return REFERENCE_OPS
    assert NATIVE_OPS is not None  # resolve() found the native kernel registered
    return NATIVE_OPS
