"""``MoELayer``: router -> permute -> dispatch -> local experts -> combine -> unpermute
(+ shared expert), with each piece callable on its own for an overlapping engine."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

from deeppar.moe import dispatch_combine as comm
from deeppar.moe.dispatch_combine import DispatchLayout, PendingTransfer
from deeppar.moe.experts import SwiGLUExperts, expert_major_order
from deeppar.moe.permute import PermutedTokens, permute, unpermute
from deeppar.moe.router import Router


class Routing(NamedTuple):
    """What :meth:`MoELayer.route` decides for a batch of tokens."""

    topk_ids: torch.Tensor  # [T, k] int64
    topk_weights: torch.Tensor  # [T, k] float32


class MoELayer(nn.Module):
    """A DeepSeek-style MoE layer with experts split contiguously over an EP process group.

    Rank ``r`` of ``group`` (``R`` ranks) holds experts ``[r*E/R, (r+1)*E/R)``; router and
    shared expert are replicated. ``forward(x [..., H])`` is synchronous and autograd-aware.
    The pieces, for an engine that runs them one at a time (``x`` is ``[T, H]``)::

        ids, w = layer.route(x)
        permuted, layout = layer.permute(x, ids)          # collectives: agree + count exchange
        recv = layer.dispatch_start(permuted.tokens, layout).wait()
        y = layer.run_experts(recv, layout)
        combined = layer.combine_start(y, layout).wait()
        out = layer.finish(combined, permuted.pos, w, x)  # unpermute + shared expert

    The ``*_start`` transfers record no autograd history; their backward is the transposed
    transfer (:func:`~deeppar.moe.dispatch_combine.dispatch_backward_start`, ...).
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        *,
        group: dist.ProcessGroup | None = None,
        shared_intermediate: int = 0,
        score_func: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool | None = None,
        backend: str | None = None,
        num_sms: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        world, rank = comm.ep_world(group)
        if num_experts % world:
            raise ValueError(f"the EP group size {world} does not divide num_experts={num_experts}")
        self.group, self.ep_size, self.ep_rank = group, world, rank
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.backend, self.num_sms = backend, num_sms
        self.router = Router(hidden, num_experts, top_k, score_func=score_func, n_group=n_group,
                             topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
                             norm_topk_prob=norm_topk_prob, dtype=dtype, device=device)
        local = num_experts // world
        self.first_expert = rank * local
        self.experts = SwiGLUExperts(local, hidden, intermediate, dtype=dtype, device=device)
        self.shared = (
            SwiGLUExperts(1, hidden, shared_intermediate, dtype=dtype, device=device)
            if shared_intermediate else None
        )

    def route(self, x: torch.Tensor) -> Routing:
        return Routing(*self.router(x))

    def permute(self, x: torch.Tensor, topk_ids: torch.Tensor) -> tuple[PermutedTokens,
                                                                          DispatchLayout]:
        """Agree on the routing problem across the EP group (same ValueError on every rank for
        bad input), permute the tokens by destination rank and expert, exchange the counts."""
        comm.agree_on_routing(topk_ids, self.num_experts, x.shape[-1], x.dtype, self.group)
        permuted = permute(x, topk_ids, self.num_experts, self.ep_size, backend=self.backend,
                           num_sms=self.num_sms)
        return permuted, comm.exchange_counts(permuted.expert_counts, self.num_experts, self.group)

    def dispatch_start(self, tokens: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
        return comm.dispatch_start(tokens, layout)

    def run_experts(self, received: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
        """Local experts on the received rows (source rank, then expert order), each expert on
        all of its rows at once in source-rank order; output rows in received order."""
        order = expert_major_order(layout.recv_expert_counts)
        counts = layout.recv_expert_counts.sum(0).tolist()
        if order is None:
            return self.experts(received, counts)
        order = order.to(received.device)
        grouped = self.experts(received.index_select(0, order), counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return grouped.index_select(0, inverse)

    def combine_start(self, expert_out: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
        return comm.combine_start(expert_out, layout)

    def shared_expert(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.shared is None else self.shared.expert(0, x)

    def finish(self, combined: torch.Tensor, pos: torch.Tensor, topk_weights: torch.Tensor,
               x: torch.Tensor) -> torch.Tensor:
        """Unpermute the combined expert outputs (weighted, in top-k order) and add the shared
        expert's output on ``x``."""
        out = unpermute(combined, pos, topk_weights, backend=self.backend, num_sms=self.num_sms)
        shared = self.shared_expert(x)
        return out if shared is None else out + shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.hidden)
        ids, weights = self.route(x)
        permuted, layout = self.permute(x, ids)
        received = comm.dispatch(permuted.tokens, layout)
        combined = comm.combine(self.run_experts(received, layout), layout)
        return self.finish(combined, permuted.pos, weights, x).reshape(shape)
