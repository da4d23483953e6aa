"""Dispatch / combine of permuted tokens over an expert-parallel process group.

Order of collectives, the same on every rank: (1) :func:`agree_on_routing` all-gathers a small
fixed-size vector of each rank's routing problem (error code, experts, top-k, hidden, dtype), so
bad input raises the same ValueError on every rank before any payload moves; (2)
:func:`exchange_counts` sends each rank the per-expert row counts it will receive
(``all_to_all_single``); (3) the payload moves with ``all_to_all_single`` and split sizes.

``dispatch_start`` / ``combine_start`` (and their transposes, ``dispatch_backward_start`` /
``combine_backward_start``) start a transfer and return a :class:`PendingTransfer` whose
``wait()`` gives the received tensor, so computation can run in between; they do not record
autograd history. :func:`dispatch` and :func:`combine` are the synchronous, autograd-aware
versions. ``group=None`` means the default group when torch.distributed is initialised and a
single process (no collectives, transfers are identities) otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# Error codes a rank reports in agree_on_routing; every rank turns the gathered codes into the
# same message.
_OK, _BAD_IDS_TENSOR, _TOPK_TOO_LARGE, _GROUP_NOT_DIVIDING, _IDS_OUT_OF_RANGE = range(5)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def ep_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of ``group``; (1, 0) for a single process without torch.distributed."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _collective_device(group: dist.ProcessGroup | None) -> torch.device:
    """CUDA for NCCL groups (their tensors must live there), CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class DispatchLayout:
    """Who sends how many rows to whom, for one dispatch and its combine."""

    group: dist.ProcessGroup | None
    num_experts: int
    send_splits: tuple[int, ...]  # rows this rank sends to each EP rank
    recv_splits: tuple[int, ...]  # rows this rank receives from each EP rank
    recv_expert_counts: torch.Tensor  # [R, E/R] int64 (CPU): rows from each rank per local expert

    @property
    def num_ranks(self) -> int:
        return len(self.send_splits)

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.num_ranks

    @property
    def num_received(self) -> int:
        return sum(self.recv_splits)


def _local_error(topk_ids: torch.Tensor, num_experts: int, num_ranks: int) -> int:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dtype != torch.int64 or (
        topk_ids.dim() != 2
    ):
        return _BAD_IDS_TENSOR
    if topk_ids.shape[1] > num_experts:
        return _TOPK_TOO_LARGE
    if num_experts % num_ranks:
        return _GROUP_NOT_DIVIDING
    if topk_ids.numel() and bool((topk_ids.min() < 0) | (topk_ids.max() >= num_experts)):
        return _IDS_OUT_OF_RANGE
    return _OK


def agree_on_routing(
    topk_ids: torch.Tensor,
    num_experts: int,
    hidden: int,
    dtype: torch.dtype,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Check the routing problem on every rank of ``group`` and raise the same ValueError on all
    of them when any rank's input is bad or the ranks disagree (experts, top-k, hidden, dtype).
    One ``all_gather`` of 6 integers per rank; no collective for a single process."""
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    world, _ = ep_world(group)
    code = _local_error(topk_ids, num_experts, world)
    top_k = topk_ids.shape[1] if code != _BAD_IDS_TENSOR else -1
    dtype_id = _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)
    mine = [code, num_experts, top_k, hidden, dtype_id, world]
    if world == 1:
        rows = [mine]
    else:
        device = _collective_device(group)
        local = torch.tensor(mine, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        rows = [g.tolist() for g in gathered]
    _raise_if_bad(rows)


def _raise_if_bad(rows: list[list[int]]) -> None:
    """Turn every rank's [code, experts, top_k, hidden, dtype, world] into one message."""
    worst = max(row[0] for row in rows)
    if worst != _OK:
        ranks = [r for r, row in enumerate(rows) if row[0] == worst]
        _, experts, top_k, _, _, world = rows[ranks[0]]
        what = {
            _BAD_IDS_TENSOR: "topk_ids must be an int64 [tokens, top_k] tensor",
            _TOPK_TOO_LARGE: f"top_k={top_k} exceeds num_experts={experts}",
            _GROUP_NOT_DIVIDING: (
                f"the EP group size {world} does not divide num_experts={experts}"
            ),
            _IDS_OUT_OF_RANGE: f"topk_ids holds expert ids outside [0, {experts})",
        }[worst]
        raise ValueError(f"{what} (on EP rank(s) {ranks})")
    for index, name in ((1, "num_experts"), (2, "top_k"), (3, "hidden size"), (4, "dtype")):
        values = [row[index] for row in rows]
        if len(set(values)) > 1:
            if name == "dtype":
                values = [str(_DTYPES[v]) if v < len(_DTYPES) else "other" for v in values]
            raise ValueError(f"EP ranks disagree on {name}: {values} (by rank)")


def exchange_counts(
    expert_counts: torch.Tensor,
    num_experts: int,
    group: dist.ProcessGroup | None = None,
) -> DispatchLayout:
    """Send each EP rank the number of rows it will receive for each of its experts.

    ``expert_counts`` ``[E]`` int64 non-negative (from :func:`~deeppar.moe.permute`). Call
    :func:`agree_on_routing` first (it agrees on ``num_experts``). A rank whose counts are not
    such a tensor sends -1 in their place, so every rank finds it in what it receives and raises
    the same ValueError. Returns the layout of the payload transfers.
    """
    world, _ = ep_world(group)
    if num_experts % world:
        raise ValueError(f"the EP group size {world} does not divide num_experts={num_experts}")
    well_formed = (isinstance(expert_counts, torch.Tensor) and expert_counts.dtype == torch.int64
                   and expert_counts.shape == (num_experts,))
    send = (expert_counts.view(world, num_experts // world) if well_formed
            else torch.full((world, num_experts // world), -1, dtype=torch.int64))
    if world == 1:
        recv = send.cpu()
    else:
        device = _collective_device(group)
        send_dev = send.to(device).contiguous()
        recv_dev = torch.empty_like(send_dev)
        dist.all_to_all_single(recv_dev, send_dev, group=group)
        recv = recv_dev.cpu()
    bad_ranks = [r for r in range(world) if bool((recv[r] < 0).any())]
    if bad_ranks:
        raise ValueError(f"expert_counts must be an int64 [{num_experts}] tensor of non-negative "
                         f"counts on every EP rank (not so on EP rank(s) {bad_ranks})")
    return DispatchLayout(
        group=group,
        num_experts=num_experts,
        send_splits=tuple(send.sum(1).tolist()),
        recv_splits=tuple(recv.sum(1).tolist()),
        recv_expert_counts=recv,
    )


class PendingTransfer:
    """An all-to-all in flight; ``wait()`` returns the received tensor (once done)."""

    def __init__(self, output: torch.Tensor, work: dist.Work | None, source: torch.Tensor) -> None:
        self._output, self._work = output, work
        self._source = source  # kept alive until the transfer completes

    def is_completed(self) -> bool:
        return self._work is None or self._work.is_completed()

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work, self._source = None, None
        return self._output


def _start(x: torch.Tensor, send: tuple[int, ...], recv: tuple[int, ...],
           layout: DispatchLayout) -> PendingTransfer:
    if x.dim() != 2 or x.shape[0] != sum(send):
        raise ValueError(f"expected a [{sum(send)}, hidden] tensor to send, got {tuple(x.shape)}")
    if layout.num_ranks == 1:
        return PendingTransfer(x, None, x)
    x = x.contiguous()
    out = x.new_empty((sum(recv), x.shape[1]))
    work = dist.all_to_all_single(out, x, list(recv), list(send), group=layout.group,
                                  async_op=True)
    return PendingTransfer(out, work, x)


def dispatch_start(tokens: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
    """Send the permuted ``tokens`` ``[sum(send_splits), H]`` to their experts' ranks; the
    result holds the rows received, ordered by source rank, then local expert."""
    return _start(tokens, layout.send_splits, layout.recv_splits, layout)


def combine_start(expert_out: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
    """Send expert outputs ``[num_received, H]`` (in received order) back to their tokens'
    ranks; the result is in the permuted order of the original dispatch."""
    return _start(expert_out, layout.recv_splits, layout.send_splits, layout)


def dispatch_backward_start(grad_received: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
    """Backward of a dispatch: gradients of the received rows travel back (a combine-like
    transfer) and arrive as the gradient of the permuted tokens."""
    return combine_start(grad_received, layout)


def combine_backward_start(grad_combined: torch.Tensor, layout: DispatchLayout) -> PendingTransfer:
    """Backward of a combine: gradients of the combined rows travel to the experts' ranks (a
    dispatch-like transfer) and arrive as the gradient of the expert outputs."""
    return dispatch_start(grad_combined, layout)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: DispatchLayout, forward_dispatch: bool):
        ctx.layout, ctx.forward_dispatch = layout, forward_dispatch
        start = dispatch_start if forward_dispatch else combine_start
        return start(x, layout).wait()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = combine_start if ctx.forward_dispatch else dispatch_start
        return start(grad.contiguous(), ctx.layout).wait(), None, None


def dispatch(tokens: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """Synchronous, autograd-aware :func:`dispatch_start` (backward: a combine transfer)."""
    return _AllToAll.apply(tokens, layout, True)


def combine(expert_out: torch.Tensor, layout: DispatchLayout) -> torch.Tensor:
    """Synchronous, autograd-aware :func:`combine_start` (backward: a dispatch transfer)."""
    return _AllToAll.apply(expert_out, layout, False)
