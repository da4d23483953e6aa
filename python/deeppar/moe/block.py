"""An MoE transformer block (and a stack of them) that declares its sub-steps for the fused F&B
engine: ``attn`` (RMSNorm, causal self-attention, residual, RMSNorm, routing, permute and the
count exchange), ``dispatch``, ``mlp`` (local experts and the shared expert), ``combine`` and
``post`` (un-permute, weighted top-k sum, residual).

``MoEBlock.forward`` / ``MoEStage.forward`` run those sub-steps in order, so a pipeline's F then
B and its fused F&B run the same code; :meth:`MoEBlock.reference` is the same block as one plain
autograd graph over :class:`~deeppar.moe.MoELayer`'s synchronous path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from deeppar.moe import dispatch_combine as comm
from deeppar.moe.dispatch_combine import DispatchLayout, PendingTransfer
from deeppar.moe.layer import MoELayer
from deeppar.moe.permute import unpermute
from deeppar.pipeline.fused import forward_substeps
from deeppar.pipeline.substeps import Comm, Compute, LayerSubSteps, StageSubSteps


class _Received:
    """A pending transfer of one tensor seen as the engine's transfer: ``wait()`` gives a
    tuple with one entry per input of the sub-step (None for the layout)."""

    def __init__(self, pending: PendingTransfer, layout: DispatchLayout, grads: bool) -> None:
        self.pending, self.layout, self.grads = pending, layout, grads

    def wait(self) -> tuple[torch.Tensor | None, ...]:
        out = self.pending.wait()
        return (out, None) if self.grads else (out,)


def _dispatch(tokens: torch.Tensor, layout: DispatchLayout) -> _Received:
    return _Received(comm.dispatch_start(tokens, layout), layout, grads=False)


def _dispatch_backward(transfer: _Received, grad: torch.Tensor) -> _Received:
    return _Received(comm.dispatch_backward_start(grad.contiguous(), transfer.layout),
                     transfer.layout, grads=True)


def _combine(expert_out: torch.Tensor, layout: DispatchLayout) -> _Received:
    return _Received(comm.combine_start(expert_out, layout), layout, grads=False)


def _combine_backward(transfer: _Received, grad: torch.Tensor) -> _Received:
    return _Received(comm.combine_backward_start(grad.contiguous(), transfer.layout),
                     transfer.layout, grads=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``[batch, seq, hidden]``."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"heads={heads} must divide hidden={hidden}")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, h))


class MoEBlock(nn.Module):
    """``h = x + attn(norm1(x))``, ``out = h + moe(norm2(h))`` on ``x [batch, seq, hidden]``;
    the MoE layer's experts are split over ``group`` (see :class:`~deeppar.moe.MoELayer`)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, num_experts: int,
                 top_k: int, *, shared_intermediate: int = 0,
                 group: dist.ProcessGroup | None = None, **moe_kw) -> None:
        super().__init__()
        self.hidden = hidden
        self.attn_norm = nn.RMSNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads)
        self.moe_norm = nn.RMSNorm(hidden)
        self.moe = MoELayer(hidden, intermediate, num_experts, top_k, group=group,
                            shared_intermediate=shared_intermediate, **moe_kw)

    # ---------------------------------------------------------------- the sub-steps
    def attn_step(self, x: torch.Tensor) -> tuple:
        """attn: attention with residual, then routing and permute (with the count exchange,
        a blocking collective on the EP group)."""
        h = x + self.attn(self.attn_norm(x))
        xm = self.moe_norm(h).reshape(-1, self.hidden)
        ids, weights = self.moe.route(xm)
        permuted, layout = self.moe.permute(xm, ids)
        return h, xm, permuted.tokens, permuted.pos, weights, layout

    def mlp_step(self, received: torch.Tensor, layout: DispatchLayout,
                 xm: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """mlp: the local experts on the received rows, and the shared expert."""
        out = self.moe.run_experts(received, layout)
        if self.moe.shared is None:
            return (out,)
        # through the module's forward (one expert, all rows), so the engine sees the call
        return out, self.moe.shared(xm, [xm.shape[0]])

    def post_step(self, h: torch.Tensor, combined: torch.Tensor, pos: torch.Tensor,
                  weights: torch.Tensor, *shared: torch.Tensor) -> torch.Tensor:
        """post: weighted top-k sum of the combined rows (+ shared expert), residual."""
        out = unpermute(combined, pos, weights, backend=self.moe.backend,
                        num_sms=self.moe.num_sms)
        if shared:
            out = out + shared[0]
        return h + out.reshape(h.shape)

    def declare(self) -> LayerSubSteps:
        """This block's sub-steps; the bag names are reused by every block of a stage."""
        shared = ("shared",) if self.moe.shared is not None else ()
        experts = (self.moe.experts,) + ((self.moe.shared,) if shared else ())
        return LayerSubSteps(self, (
            Compute("attn", self.attn_step, ("x",),
                    ("h", "xm", "tokens", "pos", "weights", "layout"),
                    modules=(self.attn_norm, self.attn, self.moe_norm, self.moe.router),
                    deferred=(self.attn,)),
            Comm("dispatch", _dispatch, _dispatch_backward, ("tokens", "layout"), ("recv",)),
            Compute("mlp", self.mlp_step, ("recv", "layout", "xm"), ("expert_out", *shared),
                    modules=experts, deferred=experts),
            Comm("combine", _combine, _combine_backward, ("expert_out", "layout"),
                 ("combined",)),
            Compute("post", self.post_step, ("h", "combined", "pos", "weights", *shared),
                    ("x",)),
        ))

    def substeps(self) -> StageSubSteps:
        return StageSubSteps(("x",), (self.declare(),), ("x",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_substeps(self, x)  # type: ignore[return-value]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same block as one autograd graph (MoELayer's synchronous path)."""
        h = x + self.attn(self.attn_norm(x))
        return h + self.moe(self.moe_norm(h))


class MoEStage(nn.Module):
    """A pipeline stage of MoE blocks: declares every block's sub-steps, so the pipeline runs
    its ``Overlap`` pairs on the fused engine."""

    def __init__(self, blocks: Sequence[MoEBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def substeps(self) -> StageSubSteps:
        return StageSubSteps(("x",), tuple(b.declare() for b in self.blocks), ("x",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_substeps(self, x)  # type: ignore[return-value]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b.reference(x)
        return x


__all__ = ["CausalSelfAttention", "MoEBlock", "MoEStage"]
