"""Triton kernel of the EPLB planner (hierarchical policy of ``specs/eplb.md``).

One program per (layer, node). Each program packs the layer's groups onto the nodes (every
program of a layer does the same, cheap, deterministic work, so no program waits for another),
then replicates its node's experts into the node's slots and packs those replicas onto the
node's GPUs. The global policy is the same run with one group and one node.

Same algorithm and arithmetic as the CPU and CUDA kernels, so results are bit-identical:

* every choice is an argmin over an integer key that holds the full tie rule, so reductions
  are exact whatever their order: packing visits items by ``(0x7fffffff - float bits) << 32 |
  index`` (heaviest first, lowest index on ties; loads are non-negative and +0.0-normalised,
  so their bits order like the floats), and picks the pack with the smallest
  ``weight bits << 32 | pack`` among packs with room;
* replication gives each extra slot to the expert with the largest ``weight / count``
  (``tl.div_rn``: correctly rounded on GPU too), then fewest replicas, then lowest index;
* float32 group sums are taken left to right, pack weights grow in visiting order.

Register arrays are updated in place with ``tl.where`` on the chosen index; the lookups by a
data-dependent index use ``tl.gather``. Loops with data-dependent trip counts are ``while``
loops: they compile to ``scf.while`` on GPU, and Triton's interpreter (where scalars are
1-element arrays) runs them as plain Python loops, which ``range`` over a scalar it cannot.

The launcher is the custom op ``deeppar::eplb_rebalance_triton`` with a fake (shape) function,
so ``torch.compile`` traces it and ``torch.library.opcheck`` checks it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest block Triton allows for one tensor.
MAX_BLOCK = 1 << 20


@triton.jit
def _balanced_pack(
    weight,  # [BLOCK_N] float32 item weights (>= 0, +0.0-normalised); items >= n are padding
    n,
    m,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Balanced packing of n items into m packs: (pack, rank in pack) of each item, and the
    item at each packed position ``pack * (n // m) + rank``; all [BLOCK_N] int32."""
    idx = tl.arange(0, BLOCK_N)
    packs = tl.arange(0, BLOCK_M)
    per_pack = n // m
    pack = idx
    rank = tl.zeros([BLOCK_N], dtype=tl.int32)
    item_at = idx
    bits = weight.to(tl.int32, bitcast=True).to(tl.int64)
    key = ((0x7FFFFFFF - bits) << 32) | idx.to(tl.int64)
    key = tl.where(idx < n, key, 0x7FFFFFFFFFFFFFFF)
    pack_weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    pack_items = tl.zeros([BLOCK_M], dtype=tl.int32)
    # One item per pack (spec rule 1): item i in pack i, rank 0, i.e. no steps at all.
    # Loop counters start as int32 tensors (not constexprs, which the loop could not update).
    step = tl.full([], 0, tl.int32) + n * tl.minimum(per_pack - 1, 1)
    while step > 0:
        step -= 1
        # Next item: heaviest remaining, lowest index on ties.
        k = tl.min(key, 0)
        item = (k & 0xFFFFFFFF).to(tl.int32)
        item_weight = (0x7FFFFFFF - (k >> 32)).to(tl.int32).to(tl.float32, bitcast=True)
        key = tl.where(idx == item, 0x7FFFFFFFFFFFFFFF, key)
        # Its pack: lightest with room, lowest index on ties.
        pack_key = (pack_weight.to(tl.int32, bitcast=True).to(tl.int64) << 32) | packs.to(
            tl.int64
        )
        pack_key = tl.where((pack_items < per_pack) & (packs < m), pack_key, 0x7FFFFFFFFFFFFFFF)
        p = (tl.min(pack_key, 0) & 0xFFFFFFFF).to(tl.int32)
        r = tl.sum(tl.where(packs == p, pack_items, 0), 0)
        pack = tl.where(idx == item, p, pack)
        rank = tl.where(idx == item, r, rank)
        item_at = tl.where(idx == p * per_pack + r, item, item_at)
        pack_items = tl.where(packs == p, pack_items + 1, pack_items)
        pack_weight = tl.where(packs == p, pack_weight + item_weight, pack_weight)
    return pack, rank, item_at


@triton.jit
def _replicate(
    weight,  # [BLOCK_E] float32 expert weights (>= 0, +0.0-normalised); experts >= n: padding
    n,
    k,
    BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Replication of n experts into k >= n slots: expert and replica rank of each slot
    ([BLOCK_S] int32), replicas of each expert ([BLOCK_E] int32)."""
    experts = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK_S)
    valid = experts < n
    count = tl.where(valid, 1, 0)
    ratio_bits = weight.to(tl.int32, bitcast=True)
    slot_expert = tl.where(slots < n, slots, 0)
    slot_rank = tl.zeros([BLOCK_S], dtype=tl.int32)
    j = tl.full([], 0, tl.int32) + n
    while j < k:
        # Largest weight / count (non-negative: bits order like floats), then fewest
        # replicas, then lowest index (below 2^24: deeppar.eplb._validate.PlannerLimits).
        best = tl.max(tl.where(valid, ratio_bits, -1), 0)
        tie = valid & (ratio_bits == best)
        key = tl.where(tie, (count.to(tl.int64) << 24) | experts.to(tl.int64),
                       0x7FFFFFFFFFFFFFFF)
        chosen = tl.min(key, 0)
        e = (chosen & 0xFFFFFF).to(tl.int32)
        c = (chosen >> 24).to(tl.int32)
        slot_expert = tl.where(slots == j, e, slot_expert)
        slot_rank = tl.where(slots == j, c, slot_rank)
        new_ratio = tl.div_rn(weight, (count + 1).to(tl.float32))
        ratio_bits = tl.where(experts == e, new_ratio.to(tl.int32, bitcast=True), ratio_bits)
        count = tl.where(experts == e, count + 1, count)
        j += 1
    return slot_expert, slot_rank, count


@triton.jit
def _eplb_rebalance_kernel(
    weight_ptr,  # [L, E] float32
    phy2log_ptr,  # [L, R] int64 out: logical expert of each slot
    phy_rank_ptr,  # [L, R] int64 out: replica rank of each slot
    logcnt_ptr,  # [L, E] int64 out: replicas of each logical expert
    experts,
    replicas,
    groups,
    nodes,
    gpus,
    BLOCK_G: tl.constexpr,  # >= groups
    BLOCK_N: tl.constexpr,  # >= nodes
    BLOCK_E: tl.constexpr,  # >= experts / nodes
    BLOCK_S: tl.constexpr,  # >= replicas / nodes
    BLOCK_P: tl.constexpr,  # >= gpus / nodes
):
    layer = tl.program_id(0).to(tl.int64)
    node = tl.program_id(1)
    group_size = experts // groups
    groups_per_node = groups // nodes
    experts_per_node = experts // nodes
    slots_per_node = replicas // nodes
    gpus_per_node = gpus // nodes
    slots_per_gpu = replicas // gpus
    row = weight_ptr + layer * experts

    # Step 1: group loads (float32, left to right), packed onto the nodes.
    group = tl.arange(0, BLOCK_G)
    group_mask = group < groups
    group_load = tl.zeros([BLOCK_G], dtype=tl.float32)
    i = tl.full([], 0, tl.int32)
    while i < group_size:
        group_load += tl.load(row + group * group_size + i, mask=group_mask, other=0.0)
        i += 1
    _, _, group_at = _balanced_pack(group_load, groups, nodes, BLOCK_G, BLOCK_N)

    # Step 2: this node's experts in node-major order, and their logical ids.
    mlog = tl.arange(0, BLOCK_E)
    mlog_mask = mlog < experts_per_node
    position = tl.where(mlog_mask, node * groups_per_node + mlog // group_size, 0)
    logical = tl.gather(group_at, position, 0) * group_size + mlog % group_size
    logical = tl.where(mlog_mask, logical, 0)
    w = tl.load(row + logical, mask=mlog_mask, other=0.0) + 0.0  # -0.0 -> +0.0

    # Step 3: replicate the node's experts into its slots.
    slot_expert, slot_rank, count = _replicate(
        w, experts_per_node, slots_per_node, BLOCK_E, BLOCK_S
    )

    # Step 4: per-replica loads, packed onto the node's GPUs.
    slot = tl.arange(0, BLOCK_S)
    slot_mask = slot < slots_per_node
    slot_expert = tl.where(slot_mask, slot_expert, 0)
    slot_count = tl.gather(count, slot_expert, 0)
    slot_load = tl.div_rn(tl.gather(w, slot_expert, 0), tl.maximum(slot_count, 1).to(tl.float32))
    slot_load = tl.where(slot_mask, slot_load, 0.0)
    gpu, rank_in_gpu, _ = _balanced_pack(slot_load, slots_per_node, gpus_per_node, BLOCK_S,
                                         BLOCK_P)

    # Step 5: physical slots.
    physical = node * slots_per_node + gpu * slots_per_gpu + rank_in_gpu
    physical = tl.where(slot_mask, physical, 0)
    out = layer * replicas + physical
    tl.store(phy2log_ptr + out, tl.gather(logical, slot_expert, 0).to(tl.int64), mask=slot_mask)
    tl.store(phy_rank_ptr + out, slot_rank.to(tl.int64), mask=slot_mask)
    tl.store(logcnt_ptr + layer * experts + logical, count.to(tl.int64), mask=mlog_mask)


def _block(n: int) -> int:
    block = triton.next_power_of_2(max(n, 1))
    if block > MAX_BLOCK:
        raise ValueError(f"the Triton EPLB kernel handles at most {MAX_BLOCK} items per row "
                         f"and node, got {n}")
    return block


@torch.library.custom_op("deeppar::eplb_rebalance_triton", mutates_args=())
def eplb_rebalance_triton(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical EPLB policy on ``weight [L, E]``: (phy2log ``[L, R]``, replica rank of each
    slot ``[L, R]``, logcnt ``[L, E]``), int64 on the weight's device. Sizes are checked by the
    caller (``deeppar.eplb``); no host synchronisation."""
    weight = weight.to(torch.float32).contiguous()
    layers, experts = weight.shape
    phy2log = torch.empty((layers, num_replicas), dtype=torch.int64, device=weight.device)
    phy_rank = torch.empty_like(phy2log)
    logcnt = torch.empty((layers, experts), dtype=torch.int64, device=weight.device)
    if layers == 0:
        return phy2log, phy_rank, logcnt
    blocks = {
        "BLOCK_G": _block(num_groups),
        "BLOCK_N": _block(num_nodes),
        "BLOCK_E": _block(experts // num_nodes),
        "BLOCK_S": _block(num_replicas // num_nodes),
        "BLOCK_P": _block(num_gpus // num_nodes),
    }
    # One warp keeps the reductions of the sequential loops in shuffles; more for wide rows.
    widest = max(blocks.values())
    num_warps = 1 if widest <= 256 else 2 if widest <= 1024 else 4
    _eplb_rebalance_kernel[(layers, num_nodes)](
        weight, phy2log, phy_rank, logcnt,
        experts, num_replicas, num_groups, num_nodes, num_gpus,
        num_warps=num_warps, **blocks,
    )
    return phy2log, phy_rank, logcnt


@eplb_rebalance_triton.register_fake
def _eplb_rebalance_triton_fake(weight, num_replicas, num_groups, num_nodes, num_gpus):
    layers, experts = weight.shape
    phy2log = weight.new_empty((layers, num_replicas), dtype=torch.int64)
    logcnt = weight.new_empty((layers, experts), dtype=torch.int64)
    return phy2log, torch.empty_like(phy2log), logcnt
