"""Plain Python EPLB planner that follows ``specs/eplb.md`` line by line: the oracle.

Every number is a numpy float32 scalar, so each addition and division is one correctly rounded
float32 operation, exactly as the native kernels compute it. Rows are independent and are
planned one after another; this is slow and meant for checking, not for production.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def pack_row(weights: list[np.float32], num_packs: int) -> tuple[list[int], list[int]]:
    """Balanced packing of one row: (pack index, rank in pack) of each item."""
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:  # spec rule 1: item i goes to pack i with rank 0
        return list(range(n)), [0] * n
    # Heaviest first; equal weights: lowest index first.
    order = sorted(range(n), key=lambda i: (-weights[i], i))
    pack_weight = [F32(0.0)] * num_packs
    pack_items = [0] * num_packs
    pack, rank = [0] * n, [0] * n
    for item in order:
        # Lightest pack that still has room; ties: lowest pack index.
        best = min(
            (p for p in range(num_packs) if pack_items[p] < per_pack),
            key=lambda p: (pack_weight[p], p),
        )
        pack[item] = best
        rank[item] = pack_items[best]
        pack_items[best] += 1
        pack_weight[best] = F32(pack_weight[best] + weights[item])
    return pack, rank


def replicate_row(
    weights: list[np.float32], num_slots: int
) -> tuple[list[int], list[int], list[int]]:
    """Replication of one row: (expert of each slot, replica rank of each slot, count per
    expert)."""
    n = len(weights)
    slot_expert = list(range(n))
    slot_rank = [0] * n
    count = [1] * n
    for _ in range(n, num_slots):
        # Largest weight/count; ties: fewer replicas, then lowest expert index.
        best = max(range(n), key=lambda e: (F32(weights[e] / F32(count[e])), -count[e], -e))
        slot_expert.append(best)
        slot_rank.append(count[best])
        count[best] += 1
    return slot_expert, slot_rank, count


def hierarchical_row(
    weights: list[np.float32], num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[list[int], list[int], list[int]]:
    """Hierarchical policy for one layer: (phy2log, replica rank of each slot, logcnt)."""
    experts = len(weights)
    group_size = experts // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = experts // num_nodes
    slots_per_node = num_replicas // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_replicas // num_gpus

    # Step 1: group loads (float32, left to right), packed onto the nodes.
    group_load = []
    for g in range(num_groups):
        total = F32(0.0)
        for k in range(group_size):
            total = F32(total + weights[g * group_size + k])
        group_load.append(total)
    group_node, group_rank = pack_row(group_load, num_nodes)

    # Step 2: node-major renumbering, mlog -> logical id.
    mlog2log = [0] * experts
    for g in range(num_groups):
        base = (group_node[g] * groups_per_node + group_rank[g]) * group_size
        for k in range(group_size):
            mlog2log[base + k] = g * group_size + k

    phy2log = [0] * num_replicas
    phy_rank = [0] * num_replicas
    logcnt = [0] * experts
    for node in range(num_nodes):
        first = node * experts_per_node
        node_weights = [weights[mlog2log[first + i]] for i in range(experts_per_node)]
        # Step 3: replicate the node's experts into its slots.
        slot_expert, slot_rank, count = replicate_row(node_weights, slots_per_node)
        # Step 4: pack the node's replicas onto its GPUs by per-replica load.
        replica_load = [F32(node_weights[e] / F32(count[e])) for e in slot_expert]
        gpu, rank_in_gpu = pack_row(replica_load, gpus_per_node)
        # Step 5: physical slot of each replica.
        for j in range(slots_per_node):
            slot = node * slots_per_node + gpu[j] * slots_per_gpu + rank_in_gpu[j]
            phy2log[slot] = mlog2log[first + slot_expert[j]]
            phy_rank[slot] = slot_rank[j]
        for i in range(experts_per_node):
            logcnt[mlog2log[first + i]] = count[i]
    return phy2log, phy_rank, logcnt


def _rows(weight: torch.Tensor) -> list[list[np.float32]]:
    # +0.0 turns -0.0 into +0.0 (it compares equal anyway; this keeps printed values tidy).
    array = weight.detach().to("cpu", torch.float32).numpy() + F32(0.0)
    return [[F32(x) for x in row] for row in array]


def _float32_overflow_ok() -> np.errstate:
    # Huge loads may sum to inf in float32, exactly as in the kernels: not worth a warning.
    return np.errstate(over="ignore", under="ignore")


def _tensor(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64).to(device)


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`pack_row`: ``[X, n]`` weights -> (pack index, rank in pack), ``[X, n]``."""
    with _float32_overflow_ok():
        packs, ranks = zip(*(pack_row(row, num_packs) for row in _rows(weight)))
    return _tensor(list(packs), weight.device), _tensor(list(ranks), weight.device)


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched :func:`replicate_row`: (phy2log ``[X, num_phy]``, rank, logcnt ``[X, n]``)."""
    with _float32_overflow_ok():
        out = [replicate_row(row, num_phy) for row in _rows(weight)]
    return tuple(_tensor([o[i] for o in out], weight.device) for i in range(3))  # type: ignore


def rebalance_hierarchical(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched :func:`hierarchical_row`: (phy2log ``[L, R]``, replica rank of each slot
    ``[L, R]``, logcnt ``[L, E]``)."""
    with _float32_overflow_ok():
        out = [
            hierarchical_row(row, num_replicas, num_groups, num_nodes, num_gpus)
            for row in _rows(weight)
        ]
    return tuple(_tensor([o[i] for o in out], weight.device) for i in range(3))  # type: ignore
