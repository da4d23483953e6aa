"""Move expert weights between expert-parallel ranks to a new placement, all or nothing.

Rank ``r`` of a group of ``W`` ranks holds the physical slots ``[r * R/W, (r + 1) * R/W)`` of
every layer: per layer, a list (or dict) of tensors whose first dimension is the local slot
(e.g. ``w13 [R/W, 2 * I, H]`` and ``w2 [R/W, H, I]``). Given the placement in use, the new one
and ``source_slot`` (which old slot each new slot copies, as ``migrate`` returns it),
``rearrange_expert_weights`` leaves every rank holding exactly the new placement's weights,
bit for bit.

Phases, each closed by an agreement of every rank (a small ``all_gather_object``) so that all
ranks raise the same error together and nothing is written unless every rank got everything:

1. validate: shapes, ids, that every new slot's source holds its expert, that the new
   placement covers every expert, and that every rank has the same plan (a digest) and the same
   per-slot tensor layout;
2. allocate: receive buffers for the slots that come from another rank, and a staged copy of
   the slots refilled from another slot of the same rank;
3. transfer: one ``dist.batch_isend_irecv`` of all sends (read in place from the old slots) and
   receives, then wait;
4. commit: copy the buffers and staged copies into their slots (no communication, cannot fail
   on a healthy device).

Extra memory on a rank: one slot's bytes (the sum over its per-slot tensors) times the number
of its slots that are received or refilled locally; sends need none. A rank that dies in
phase 3 leaves its peers waiting until the group's timeout; any error raised inside phase 3 is
agreed on and aborts every rank with the old weights intact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deeppar.eplb.migration import check_placement

Weights = Sequence[Sequence[torch.Tensor] | Mapping[str, torch.Tensor]]


@dataclass(frozen=True)
class RearrangeStats:
    """What one rank did."""

    sent: int  # slot copies sent to other ranks
    received: int  # slots received from other ranks
    local_copies: int  # slots refilled from another slot of this rank
    bytes_sent: int
    bytes_received: int
    extra_bytes: int  # receive buffers and staged local copies held at once


def _tensors(layer: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(layer, Mapping):
        return [layer[k] for k in sorted(layer)]
    return list(layer)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _layout(weights: Weights) -> str:
    """Digest of the per-slot shapes and dtypes (must match on every rank)."""
    parts = [(tuple(t.shape[1:]), str(t.dtype)) for layer in weights for t in _tensors(layer)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _agree(group, local_error: str | None, what: str, exc: type[Exception]) -> None:
    """Every rank raises the same ``exc`` if some rank reported an error."""
    errors: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, local_error, group=group)
    for rank, error in enumerate(errors):
        if error is not None:
            raise exc(f"{what} (rank {rank}): {error}")


def _check_local(weights: Weights, current: torch.Tensor, new: torch.Tensor,
                 source: torch.Tensor, world: int) -> tuple[torch.Tensor, ...]:
    """The three maps as CPU int64, checked; ValueError/TypeError naming what is wrong."""
    if not isinstance(new, torch.Tensor) or new.dim() != 2:
        raise ValueError("new_phy2log must be a [layers, replicas] tensor")
    layers, replicas = new.shape
    experts = int(current.max()) + 1 if isinstance(current, torch.Tensor) and current.numel() \
        else 1
    old = check_placement(current, layers, experts, replicas, name="current")
    new = check_placement(new, layers, experts, replicas, name="new")
    if replicas % world:
        raise ValueError(f"num_replicas ({replicas}) must be a multiple of the group size "
                         f"({world})")
    if not isinstance(source, torch.Tensor) or tuple(source.shape) != (layers, replicas) or (
        source.dtype.is_floating_point or source.dtype == torch.bool
    ):
        raise ValueError(f"source_slot must be an integer tensor [{layers}, {replicas}]")
    src = source.detach().to("cpu", torch.int64)
    if int(src.min()) < 0 or int(src.max()) >= replicas:
        raise ValueError(f"source_slot holds a slot outside [0, {replicas})")
    wrong = (old.gather(1, src) != new).nonzero()
    if wrong.numel():
        layer, slot = wrong[0].tolist()
        raise ValueError(f"source_slot[{layer}, {slot}] = {int(src[layer, slot])} does not hold "
                         f"expert {int(new[layer, slot])} in the current placement")
    per_rank = replicas // world
    if len(weights) != layers:
        raise ValueError(f"weights has {len(weights)} layers, the plan {layers}")
    for layer, held in enumerate(weights):
        tensors = _tensors(held)
        if not tensors:
            raise ValueError(f"weights[{layer}] holds no tensor")
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weights[{layer}] must hold tensors, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[0] != per_rank:
                raise ValueError(f"weights[{layer}] has a tensor of shape {tuple(t.shape)}; its "
                                 f"first dimension must be the {per_rank} local slots")
    return old, new, src


def _allocate_buffers(like: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Receive buffers for ``count`` slots of each tensor in ``like``."""
    return [torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in like]


@torch.no_grad()
def rearrange_expert_weights(
    weights: Weights,
    current_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    source_slot: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
) -> RearrangeStats:
    """Rewrite this rank's expert ``weights`` in place from ``current_phy2log [L, R]`` to
    ``new_phy2log [L, R]``; a collective: every rank of ``group`` calls it with the same plan.

    ``source_slot [L, R]``: old slot whose weights each new slot receives (``Migration``'s).
    Raises ValueError on every rank (nothing moved) for a bad or disagreeing plan, and
    RuntimeError on every rank (nothing changed) if a rank fails to allocate or transfer.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    error = None
    digest = layout = ""
    try:
        old, new, src = _check_local(weights, current_phy2log, new_phy2log, source_slot, world)
        digest, layout = _digest(old, new, src), _layout(weights)
    except (ValueError, TypeError) as exc:
        error = str(exc)
    _agree(group, error, "invalid expert transfer plan", ValueError)
    digests: list[tuple[str, str] | None] = [None] * world
    dist.all_gather_object(digests, (digest, layout), group=group)
    if len({d for d, _ in digests}) > 1:
        raise ValueError("ranks disagree on the expert transfer plan: plan digests "
                         + ", ".join(f"rank {r}: {d}" for r, (d, _) in enumerate(digests)))
    if len({lay for _, lay in digests}) > 1:
        raise ValueError("ranks disagree on the expert weight layout (per-slot shapes or "
                         "dtypes differ between ranks)")

    layers, replicas = new.shape
    per_rank = replicas // world
    # Per layer, local slot indices: incoming [(dst, src rank)], local [(dst, src)],
    # outgoing [(src, dst rank)].
    plans = []
    for layer in range(layers):
        incoming, local, outgoing = [], [], []
        for s, from_slot in enumerate(src[layer].tolist()):
            sr, dr = from_slot // per_rank, s // per_rank
            if from_slot == s:  # the slot keeps its expert (checked: old[src] == new)
                continue
            if sr == dr == rank:
                local.append((s - rank * per_rank, from_slot - rank * per_rank))
            elif dr == rank:
                incoming.append((s - rank * per_rank, sr))
            elif sr == rank:
                outgoing.append((from_slot - rank * per_rank, dr))
        plans.append((incoming, local, outgoing))

    # Phase 2: buffers for what arrives and staged copies of what is refilled locally.
    error = None
    buffers: list[list[torch.Tensor]] = []
    staged: list[list[torch.Tensor]] = []
    extra = 0
    try:
        for layer, (incoming, local, _) in enumerate(plans):
            tensors = _tensors(weights[layer])
            buffers.append(_allocate_buffers(tensors, len(incoming)))
            index = [f for _, f in local]
            staged.append([t[index] for t in tensors])  # advanced indexing: a copy
            per_slot = sum(t[0].numel() * t.element_size() for t in tensors)
            extra += per_slot * (len(incoming) + len(local))
    except Exception as exc:  # noqa: BLE001 - any failure (OOM, device error) aborts all ranks
        error = f"{type(exc).__name__}: {exc}"
    _agree(group, error, "expert weight rearrangement aborted, nothing changed",
           RuntimeError)

    # Phase 3: every transfer in one batch, ordered identically on both ends of each pair.
    error = None
    try:
        ops = []
        for layer in range(layers):
            ops += _layer_ops(plans[layer], _tensors(weights[layer]), buffers[layer],
                              src[layer], rank, per_rank, group)
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    _agree(group, error, "expert weight transfer failed, nothing changed", RuntimeError)

    # Phase 4: commit.
    with torch.no_grad():
        for layer, (incoming, local, _) in enumerate(plans):
            tensors = _tensors(weights[layer])
            if incoming:
                index = torch.tensor([d for d, _ in incoming], device=tensors[0].device)
                for t, buf in zip(tensors, buffers[layer]):
                    t.index_copy_(0, index, buf)
            if local:
                index = torch.tensor([d for d, _ in local], device=tensors[0].device)
                for t, copy in zip(tensors, staged[layer]):
                    t.index_copy_(0, index, copy)
    slot_bytes = [sum(t[0].numel() * t.element_size() for t in _tensors(held))
                  for held in weights]
    return RearrangeStats(
        sent=sum(len(p[2]) for p in plans),
        received=sum(len(p[0]) for p in plans),
        local_copies=sum(len(p[1]) for p in plans),
        bytes_sent=sum(b * len(p[2]) for b, p in zip(slot_bytes, plans)),
        bytes_received=sum(b * len(p[0]) for b, p in zip(slot_bytes, plans)),
        extra_bytes=extra,
    )


def _layer_ops(plan, tensors, buffers, src_row, rank, per_rank, group) -> list[dist.P2POp]:
    """P2P ops of one layer, in global new-slot order (the same order on sender and receiver)."""
    incoming, _, _ = plan

    def peer(group_rank: int) -> int:  # P2POp takes global ranks
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    slot_of_buffer = {rank * per_rank + d: j for j, (d, _) in enumerate(incoming)}
    ops = []
    row = src_row.tolist()
    for s, from_slot in enumerate(row):
        sr, dr = from_slot // per_rank, s // per_rank
        if sr == dr:
            continue
        if dr == rank:
            j = slot_of_buffer[s]
            ops += [dist.P2POp(dist.irecv, buf[j], peer(sr), group) for buf in buffers]
        elif sr == rank:
            local = from_slot - rank * per_rank
            ops += [dist.P2POp(dist.isend, t[local].contiguous(), peer(dr), group)
                    for t in tensors]
    return ops
