"""Migration-aware rebalancing: a new plan for new loads that moves few expert replicas.

Planning from scratch for slightly different loads reshuffles most slots, and each changed slot
costs an expert's weights over the network. ``migrate`` keeps the cost low in three steps:

1. **Relabelling** (free): a fresh plan's packs are assigned to GPUs by maximum overlap with
   the current placement (nodes first under the hierarchical policy, then GPUs inside matched
   nodes; greedy on the overlap counts, ties by index), and inside each GPU an expert that stays
   keeps its old slot.
2. **Warm start**: from the current placement, a bounded local search lowers the most loaded
   GPU until it is no worse than the fresh plan (minus ``tolerance``): it swaps two replicas
   (the top GPU's and one on another GPU of the same node, or any GPU under the global policy)
   or hands a spare replica (an expert with >= 2) to an expert of the top GPU. Every layer
   searches at once, in batched torch. Under the hierarchical policy, a layer whose node loads
   need other groups on a node searches again after the fewest group swaps between nodes that
   bring every node down to the fresh plan's most loaded node.
3. Per layer, the warm-start result is taken when it reaches the fresh plan's balancedness
   (within ``tolerance``, measured as the planner measures it, in float32) with fewer moved
   replicas; otherwise the relabelled fresh plan.

Moves never put an expert on a node that its group does not already use, so the hierarchical
policy's node rule holds whenever it held for the current placement. The transfer plan is one
tensor: ``source_slot[l, s]`` is the old slot whose weights new slot ``s`` receives (``s`` itself
when the slot keeps its expert). Everything is deterministic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from deeppar.eplb import api
from deeppar.eplb._validate import as_count, as_weight, check_problem, check_values
from deeppar.eplb.planning import balancedness, gpu_loads

_DONORS = 12  # spare replicas considered per search step and layer
_ROUNDING = 1e-6  # relative float32 rounding slack when comparing balancedness
_BUDGET_EVERY = 16  # search steps between checks of the moved-replica budget


@dataclass(frozen=True)
class Migration:
    """A plan for new loads, the transfers that reach it from the current placement, and
    how it compares with the current placement and with a plan made from scratch."""

    phy2log: torch.Tensor  # [L, R] int64, new logical expert of each slot
    log2phy: torch.Tensor  # [L, E, X] int64, new slots of each expert, -1 padded
    logcnt: torch.Tensor  # [L, E] int64, new replica counts
    source_slot: torch.Tensor  # [L, R] int64, old slot each new slot copies (itself: kept)
    moved: torch.Tensor  # [L] int64, replicas received from another GPU
    local_copies: torch.Tensor  # [L] int64, slots refilled from another slot of the same GPU
    moved_scratch: torch.Tensor  # [L] int64, the same for the fresh plan as it comes
    moved_relabelled: torch.Tensor  # [L] int64, the same for the relabelled fresh plan
    from_scratch: torch.Tensor  # [L] bool, layer took the relabelled fresh plan
    layer_balancedness: torch.Tensor  # [L] float32, new plan under the new loads
    balancedness: float  # mean over layers, new plan
    balancedness_scratch: float  # fresh plan
    balancedness_current: float  # current placement under the new loads
    num_replicas: int
    num_groups: int
    num_nodes: int
    num_gpus: int

    @property
    def slots_per_gpu(self) -> int:
        return self.num_replicas // self.num_gpus

    def summary(self, expert_bytes: int | None = None) -> str:
        """A few lines: replicas (and bytes) moved, balancedness before and after."""
        moved, scratch = int(self.moved.sum()), int(self.moved_scratch.sum())
        total = self.phy2log.numel()
        lines = [
            f"migration: {moved} of {total} replicas move to another GPU "
            f"({int(self.local_copies.sum())} local copies); a plan from scratch moves {scratch} "
            f"({int(self.moved_relabelled.sum())} after relabelling GPUs)",
            f"layers taking the fresh plan: {int(self.from_scratch.sum())} of "
            f"{self.from_scratch.numel()}",
            f"balancedness: current placement {self.balancedness_current:.4f}, "
            f"after migration {self.balancedness:.4f}, fresh plan {self.balancedness_scratch:.4f}",
        ]
        if expert_bytes is not None:
            lines.insert(1, f"bytes moved: {moved * expert_bytes} "
                            f"(from scratch: {scratch * expert_bytes})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready maps, transfers and metrics (readable back as a current placement)."""
        return {
            "num_replicas": self.num_replicas,
            "num_groups": self.num_groups,
            "num_nodes": self.num_nodes,
            "num_gpus": self.num_gpus,
            "balancedness": self.balancedness,
            "balancedness_scratch": self.balancedness_scratch,
            "balancedness_current": self.balancedness_current,
            "moved_replicas": int(self.moved.sum()),
            "moved_replicas_scratch": int(self.moved_scratch.sum()),
            "phy2log": self.phy2log.tolist(),
            "log2phy": self.log2phy.tolist(),
            "logcnt": self.logcnt.tolist(),
            "source_slot": self.source_slot.tolist(),
        }


def check_placement(phy2log: object, layers: int, experts: int, replicas: int,
                    name: str = "current") -> torch.Tensor:
    """``phy2log`` as an int64 CPU ``[layers, replicas]`` tensor in which every layer holds every
    expert ``0..experts-1`` at least once; ValueError/TypeError naming ``name`` otherwise."""
    if not isinstance(phy2log, torch.Tensor):
        raise TypeError(f"{name} must be a phy2log tensor [layers, replicas], "
                        f"got {type(phy2log).__name__}")
    if phy2log.dtype.is_floating_point or phy2log.is_complex() or phy2log.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer expert ids, got dtype {phy2log.dtype}")
    if tuple(phy2log.shape) != (layers, replicas):
        raise ValueError(f"{name} placement has shape {tuple(phy2log.shape)}, expected "
                         f"[layers={layers}, num_replicas={replicas}]")
    phy = phy2log.detach().to("cpu", torch.int64)
    if phy.numel() and (int(phy.min()) < 0 or int(phy.max()) >= experts):
        bad = int(phy.min()) if int(phy.min()) < 0 else int(phy.max())
        raise ValueError(f"{name} placement holds expert {bad}, outside [0, {experts})")
    count = torch.zeros(layers, experts, dtype=torch.int64).scatter_add_(
        1, phy, torch.ones_like(phy))
    missing = (count == 0).nonzero()
    if missing.numel():
        layer, expert = missing[0].tolist()
        raise ValueError(f"{name} placement does not cover every expert: layer {layer} has no "
                         f"replica of expert {expert}")
    return phy


def moved_replicas(old: torch.Tensor, new: torch.Tensor, num_gpus: int,
                   num_experts: int) -> torch.Tensor:
    """``[L]`` slots of ``new [L, R]`` whose expert their GPU did not hold in ``old [L, R]``:
    the replicas that must come over the network (any other changed slot is a local copy)."""
    replicas = new.shape[1]
    gpu = torch.arange(replicas) // (replicas // num_gpus)
    held = torch.zeros(new.shape[0], num_gpus * num_experts, dtype=torch.int64)
    held.scatter_add_(1, gpu * num_experts + old, torch.ones_like(old))
    return (held.gather(1, gpu * num_experts + new) == 0).sum(1)


def _greedy_match(pairs: dict[tuple[int, int], int], left: list[int],
                  right: list[int]) -> dict[int, int]:
    """Match ``left`` to ``right`` items by largest overlap first (ties: lowest indices); the
    rest in index order. ``pairs[(l, r)]`` is the overlap (absent: 0)."""
    match: dict[int, int] = {}
    used: set[int] = set()
    for (a, b), _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])):
        if a not in match and b not in used:
            match[a] = b
            used.add(b)
    free = iter(b for b in right if b not in used)
    for a in left:
        if a not in match:
            match[a] = next(free)
    return match


def _overlaps(new_units: list[int], old_units: list[int], new_experts: list[int],
              old_experts: list[int], allowed=None) -> dict[tuple[int, int], int]:
    """Multiset overlap of experts between units (GPUs or nodes) of two placements."""
    old_count: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for unit, e in zip(old_units, old_experts):
        old_count[e][unit] += 1
    new_count: dict[tuple[int, int], int] = defaultdict(int)
    for unit, e in zip(new_units, new_experts):
        new_count[(unit, e)] += 1
    pairs: dict[tuple[int, int], int] = defaultdict(int)
    for (unit, e), n in new_count.items():
        for other, m in old_count[e].items():
            if allowed is None or allowed(unit, other):
                pairs[(unit, other)] += min(n, m)
    return pairs


def relabel(old: torch.Tensor, new: torch.Tensor, num_gpus: int, num_nodes: int,
            hierarchical: bool) -> torch.Tensor:
    """``new [L, R]`` with its GPUs (and nodes, when ``hierarchical``) renumbered to overlap
    ``old [L, R]`` most, and each GPU's slots ordered so that kept experts keep their slot.
    Loads per GPU are only permuted, so balancedness is unchanged."""
    layers, replicas = new.shape
    per_gpu = replicas // num_gpus
    gpn = num_gpus // num_nodes if hierarchical else num_gpus
    gpus = list(range(num_gpus))
    out = torch.empty_like(new)
    for layer in range(layers):
        old_row, new_row = old[layer].tolist(), new[layer].tolist()
        slot_gpu = [s // per_gpu for s in range(replicas)]
        node_of = {g: g // gpn for g in gpus}
        if hierarchical and num_nodes > 1:
            slot_node = [g // gpn for g in slot_gpu]
            nodes = list(range(num_nodes))
            node_match = _greedy_match(
                _overlaps(slot_node, slot_node, new_row, old_row), nodes, nodes)
            allowed = lambda a, b, m=node_match: m[a // gpn] == b // gpn  # noqa: E731
        else:
            node_match, allowed = None, None
        pairs = _overlaps(slot_gpu, slot_gpu, new_row, old_row, allowed)
        if node_match is None:
            gpu_match = _greedy_match(pairs, gpus, gpus)
        else:
            gpu_match = {}
            for node in range(num_nodes):
                left = [g for g in gpus if node_of[g] == node]
                right = [g for g in gpus if node_of[g] == node_match[node]]
                sub = {k: v for k, v in pairs.items() if k[0] in left}
                gpu_match.update(_greedy_match(sub, left, right))
        row = [0] * replicas
        for g_new, g_old in gpu_match.items():
            content = new_row[g_new * per_gpu:(g_new + 1) * per_gpu]
            base = g_old * per_gpu
            place: list[int | None] = [None] * per_gpu
            for p in range(per_gpu):  # an expert held before keeps its slot
                if old_row[base + p] in content:
                    place[p] = old_row[base + p]
                    content.remove(old_row[base + p])
            rest = iter(content)
            for p in range(per_gpu):
                row[base + p] = place[p] if place[p] is not None else next(rest)
        out[layer] = torch.tensor(row)
    return out


def source_slots(old: torch.Tensor, new: torch.Tensor, num_gpus: int,
                 num_nodes: int) -> torch.Tensor:
    """``[L, R]`` old slot whose weights each slot of ``new`` receives: itself when unchanged,
    a slot of the same GPU when it held the expert, else a holder on the same node when there
    is one, spreading sends over holders (fewest sends so far, then lowest slot)."""
    layers, replicas = new.shape
    per_gpu = replicas // num_gpus
    per_node = replicas // num_nodes
    src = torch.arange(replicas).repeat(layers, 1)
    for layer in range(layers):
        old_row, new_row = old[layer].tolist(), new[layer].tolist()
        holders: dict[int, list[int]] = defaultdict(list)
        for s, e in enumerate(old_row):
            holders[e].append(s)
        sends: dict[int, int] = defaultdict(int)
        for s, e in enumerate(new_row):
            if old_row[s] == e:
                continue
            g = s // per_gpu
            local = [h for h in holders[e] if h // per_gpu == g]
            if local:
                src[layer, s] = local[0]
                continue
            best = min(holders[e], key=lambda h: (h // per_node != s // per_node,
                                                  sends[h // per_gpu], h))
            sends[best // per_gpu] += 1
            src[layer, s] = best
    return src


def _counts(phy: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(phy.shape[0], experts, dtype=torch.int64).scatter_add_(
        1, phy, torch.ones_like(phy))


def _gpu_load64(weight: torch.Tensor, phy: torch.Tensor, cnt: torch.Tensor,
                num_gpus: int) -> tuple[torch.Tensor, torch.Tensor]:
    slot = weight.gather(1, phy) / cnt.gather(1, phy).to(weight.dtype)
    return slot, slot.view(phy.shape[0], num_gpus, -1).sum(-1)


def warm_search(weight: torch.Tensor, current: torch.Tensor, target: torch.Tensor,
                num_gpus: int, gpus_per_region: int, max_steps: int,
                budget: torch.Tensor | None = None, origin: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Local search from ``current [L, R]`` until each layer's max GPU load is at most
    ``target [L]`` (or no move helps, or ``max_steps``): swaps inside a region of
    ``gpus_per_region`` GPUs and spare-replica hand-overs. A layer also stops once it moves
    more than ``budget [L]`` replicas away from ``origin [L, R]`` (checked every few steps:
    past that, another candidate is cheaper anyway). Returns the new ``[L, R]``."""
    w = weight.to(torch.float64)
    phy = current.clone()
    start = current if origin is None else origin
    layers, replicas = phy.shape
    experts = w.shape[1]
    per_gpu = replicas // num_gpus
    slot_gpu = torch.arange(replicas) // per_gpu
    slot_region = slot_gpu // gpus_per_region
    stalled = torch.zeros(layers, dtype=torch.bool)
    for step in range(max_steps):
        if budget is not None and step % _BUDGET_EVERY == _BUDGET_EVERY - 1:
            stalled |= moved_replicas(origin, phy, num_gpus, experts) > budget
        cnt = _counts(phy, experts)
        slot_load, load = _gpu_load64(w, phy, cnt, num_gpus)
        top_val = load.max(1).values
        active = ((top_val > target) & ~stalled).nonzero().flatten()
        if active.numel() == 0:
            break
        moved = _step(w[active], phy[active], cnt[active], slot_load[active], load[active],
                      start[active], target[active], slot_gpu, slot_region, gpus_per_region,
                      per_gpu)
        phy[active] = moved[0]
        stalled[active[~moved[1]]] = True
    return phy


def _lexmin(score: torch.Tensor, cost: torch.Tensor, last: torch.Tensor):
    """Per row, the smallest (score, cost, last): (score, cost, index)."""
    best = score.min(1).values
    tie = score == best[:, None]
    cheapest = torch.where(tie, cost, torch.iinfo(cost.dtype).max).min(1).values
    tie &= cost == cheapest[:, None]
    return best, cheapest, torch.where(tie, last, torch.inf).argmin(1)


def _step(w, phy, cnt, slot_load, load, origin, target, slot_gpu, slot_region,
          gpus_per_region, per_gpu):
    """One move on each given layer: (new phy2log, whether a move was made).

    Moves are ranked by the max GPU load they leave (anything at or below ``target`` counts
    the same), then by the slots they change away from ``origin`` (fewer is better), then by
    the larger load of the two GPUs they touch."""
    layers, replicas = phy.shape
    num_gpus = load.shape[1]
    rows = torch.arange(layers)
    # Largest load among GPUs other than the top one and the partner's (top-3 is enough).
    k = min(3, num_gpus)
    vals, idx = load.topk(k, dim=1)
    vals = torch.nn.functional.pad(vals, (0, 3 - k), value=0.0)
    idx = torch.nn.functional.pad(idx, (0, 3 - k), value=-1)
    top_val, top = vals[:, 0], idx[:, 0]
    top_slots = top[:, None] * per_gpu + torch.arange(per_gpu)  # [L, spg]
    same_region = slot_region[None, :] == (top // gpus_per_region)[:, None]  # [L, R]

    # Swaps: a top slot with any slot b of another GPU of the region.
    la = slot_load.gather(1, top_slots)  # [L, spg]
    ea = phy.gather(1, top_slots)
    delta = la[:, :, None] - slot_load[:, None, :]  # [L, spg, R]
    gpu_b = slot_gpu[None, None, :]
    partner = load[:, slot_gpu][:, None, :] + delta
    pair = torch.maximum(top_val[:, None, None] - delta, partner)
    rest = torch.where(gpu_b == idx[:, 1, None, None], vals[:, 2, None, None],
                       vals[:, 1, None, None])
    ok = ((delta > 0) & (gpu_b != top[:, None, None]) & same_region[:, None, :]
          & (ea[:, :, None] != phy[:, None, :]) & (pair < top_val[:, None, None]))
    swap_score = torch.where(ok, torch.maximum(torch.maximum(pair, rest), target[:, None, None]),
                             torch.inf).view(layers, -1)
    oa = origin.gather(1, top_slots)  # [L, spg]
    changed_before = (ea != oa).long()[:, :, None] + (phy != origin).long()[:, None, :]
    changed_after = (phy[:, None, :] != oa[:, :, None]).long() + (
        ea[:, :, None] != origin[:, None, :]).long()
    swap_cost = (changed_after - changed_before).view(layers, -1)
    swap_best, swap_cost, swap_at = _lexmin(swap_score, swap_cost, pair.view(layers, -1))

    # Hand-overs: a spare replica (donor slot s, expert with >= 2 replicas) of the region
    # becomes one more replica of an expert of the top GPU.
    slot_cnt = cnt.gather(1, phy)
    spare = (slot_cnt >= 2) & same_region
    drop = w.gather(1, phy) / (slot_cnt - 1).clamp(min=1) - slot_load
    key = torch.where(spare, load[:, slot_gpu] - slot_load + drop, torch.inf)
    donors = key.topk(min(_DONORS, replicas), dim=1, largest=False).indices  # [L, D]
    donor_ok = spare.gather(1, donors)
    e1 = phy.gather(1, donors)  # [L, D]
    c1 = cnt.gather(1, e1).to(w.dtype)
    w1 = w.gather(1, e1)
    c2 = cnt.gather(1, ea).to(w.dtype)  # [L, spg]
    w2 = w.gather(1, ea)
    share1 = w1 / (c1 - 1).clamp(min=1)  # e1's replicas after giving one up
    share2 = w2 / (c2 + 1)  # e2's replicas after getting one more
    # GPU loads after each hand-over [L, spg, D, P]: every replica of e1 and of e2 changes
    # share; the donor slot itself goes from e1's new share to e2's.
    n_donors = donors.shape[1]
    on1 = (phy[:, None, :] == e1[:, :, None]).view(layers, n_donors, num_gpus, per_gpu).sum(-1)
    on2 = (phy[:, None, :] == ea[:, :, None]).view(layers, per_gpu, num_gpus, per_gpu).sum(-1)
    d1 = on1 * (share1 - w1 / c1)[:, :, None]  # [L, D, P]
    d2 = on2 * (share2 - w2 / c2)[:, :, None]  # [L, spg, P]
    at_donor = torch.arange(num_gpus)[None, None, :] == (donors // per_gpu)[:, :, None]
    fix = torch.where(at_donor[:, None], (share2[:, :, None] - share1[:, None, :])[..., None],
                      0.0)  # [L, spg, D, P]
    hand_max = (load[:, None, None, :] + d1[:, None] + d2[:, :, None] + fix).max(-1).values
    hand_ok = donor_ok[:, None, :] & (e1[:, None, :] != ea[:, :, None]) & (
        hand_max < top_val[:, None, None])
    hand_score = torch.where(hand_ok, torch.maximum(hand_max, target[:, None, None]),
                             torch.inf).view(layers, -1)
    od = origin.gather(1, donors)  # [L, D]
    hand_cost = ((ea[:, :, None] != od[:, None, :]).long()
                 - (e1 != od).long()[:, None, :]).view(layers, -1)
    hand_best, hand_cost, hand_at = _lexmin(hand_score, hand_cost, hand_max.view(layers, -1))

    out = phy.clone()
    use_hand = (hand_best < swap_best) | ((hand_best == swap_best) & (hand_cost < swap_cost))
    do_swap = torch.isfinite(swap_best) & ~use_hand
    do_hand = torch.isfinite(hand_best) & use_hand
    a = top_slots[rows, swap_at // replicas]
    b = swap_at % replicas
    sr = rows[do_swap]
    out[sr, a[do_swap]] = phy[sr, b[do_swap]]
    out[sr, b[do_swap]] = phy[sr, a[do_swap]]
    hr = rows[do_hand]
    e2 = ea[rows, hand_at // donors.shape[1]]
    s = donors[rows, hand_at % donors.shape[1]]
    out[hr, s[do_hand]] = e2[do_hand]
    return out, do_swap | do_hand


def _node_of_groups(row: list[int], group_size: int, per_node: int) -> dict[int, int] | None:
    """Node of each group in a placement row; None if some group spans several nodes."""
    node_of: dict[int, int] = {}
    for slot, e in enumerate(row):
        if node_of.setdefault(e // group_size, slot // per_node) != slot // per_node:
            return None
    return node_of


def group_swaps(group_load: np.ndarray, node_of: np.ndarray, num_nodes: int,
                target: float) -> np.ndarray:
    """Fewest-moves node assignment of groups: starting from ``node_of [G]``, swap a group of
    the most loaded node with a lighter group of another node (the swap that lowers that
    node's load to the smallest pair maximum) until every node load is at most ``target`` or
    no swap helps. Deterministic (lowest indices on ties)."""
    node_of = node_of.copy()
    for _ in range(len(node_of)):
        loads = np.bincount(node_of, weights=group_load, minlength=num_nodes)
        top = int(np.argmax(loads))
        if loads[top] <= target:
            break
        here = np.flatnonzero(node_of == top)
        there = np.flatnonzero(node_of != top)
        delta = group_load[here][:, None] - group_load[there][None, :]
        pair = np.maximum(loads[top] - delta, loads[node_of[there]][None, :] + delta)
        pair = np.where((delta > 0) & (pair < loads[top]), pair, np.inf)
        best = int(np.argmin(pair))
        if not np.isfinite(pair.flat[best]):
            break
        g, h = here[best // len(there)], there[best % len(there)]
        node_of[g], node_of[h] = node_of[h], node_of[g]
    return node_of


def regroup(weight: torch.Tensor, old: torch.Tensor, fresh: torch.Tensor, layers: torch.Tensor,
            num_groups: int, num_nodes: int) -> torch.Tensor:
    """Start placements for a warm search under the hierarchical policy, for the layers in
    ``layers [L]`` (bool) whose node loads need other groups on some node.

    Groups are swapped between nodes (:func:`group_swaps`) until no node is more loaded than
    the most loaded node of ``fresh [L, R]``; a group that stays keeps its slots, an arriving
    group takes the slots of the groups that left (one replica per expert, the rest by the
    replication rule of the spec: largest load per replica, then fewest replicas, then lowest
    index). Other layers, and layers whose current placement splits a group over nodes, are
    returned unchanged."""
    out = old.clone()
    replicas = old.shape[1]
    group_size = weight.shape[1] // num_groups
    per_node = replicas // num_nodes
    group_loads = weight.double().view(weight.shape[0], num_groups, group_size).sum(-1).numpy()
    for layer in layers.nonzero().flatten().tolist():
        row, w = old[layer].tolist(), weight[layer].tolist()
        before = _node_of_groups(row, group_size, per_node)
        planned = _node_of_groups(fresh[layer].tolist(), group_size, per_node)
        if before is None or planned is None:
            continue
        gl = group_loads[layer]
        target = np.bincount([planned[g] for g in range(num_groups)], weights=gl,
                             minlength=num_nodes).max()
        start = np.array([before[g] for g in range(num_groups)])
        after = group_swaps(gl, start, num_nodes, target * (1 + 1e-12))
        for node in range(num_nodes):
            freed = [s_ for s_ in range(node * per_node, (node + 1) * per_node)
                     if after[row[s_] // group_size] != node]
            arriving = [g for g in range(num_groups) if after[g] == node and start[g] != node]
            experts = [g * group_size + i for g in arriving for i in range(group_size)]
            count = dict.fromkeys(experts, 1)
            for _ in range(len(freed) - len(experts)):
                best = max(experts, key=lambda e: (w[e] / count[e], -count[e], -e))
                count[best] += 1
            fill = [e for e in experts for _ in range(count[e])]
            for s_, e in zip(freed, fill):
                out[layer, s_] = e
    return out


def _phy_rank(phy: torch.Tensor, experts: int) -> torch.Tensor:
    """Replica rank of each slot: its position among its expert's slots, in slot order."""
    sorted_e, order = torch.sort(phy, dim=1, stable=True)
    cnt = _counts(phy, experts)
    start = cnt.cumsum(1) - cnt
    rank_sorted = torch.arange(phy.shape[1]) - start.gather(1, sorted_e)
    return torch.empty_like(phy).scatter_(1, order, rank_sorted)


def migrate(
    weight: torch.Tensor,
    current: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    tolerance: float = 0.0,
    max_steps: int | None = None,
    method: str | None = None,
    backend: str | None = None,
) -> Migration:
    """Plan for ``weight [L, E]`` starting from the placement ``current`` (``phy2log [L, R]``).

    Args:
        weight, num_replicas, num_groups, num_nodes, num_gpus: as for ``rebalance_experts``.
        current: the placement in use, ``phy2log [L, R]``; every expert in every layer.
        tolerance: balancedness (mean / max GPU load) the result may give up per layer against
            a plan from scratch; 0.0: never worse than it.
        max_steps: bound of the local search (moves per layer); default 256 + 8 * num_gpus.
        method, backend: passed to the planner for the fresh plan.
    Returns:
        a :class:`Migration` (CPU tensors) with the new maps and ``source_slot``.
    """
    w = as_weight(weight)
    problem = check_problem(w, num_replicas, num_groups, num_nodes, num_gpus)
    check_values(w)
    layers, experts = w.shape
    old = check_placement(current, layers, experts, problem.replicas)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not (
        0.0 <= tolerance < 1.0
    ):
        raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    steps = (256 + 8 * problem.gpus if max_steps is None
             else as_count(max_steps, "max_steps", 0))
    extra = {} if method is None else {"method": method}
    fresh, _, _ = api.rebalance_experts(w, problem.replicas, problem.groups, problem.nodes,
                                        problem.gpus, backend=backend, **extra)
    fresh = fresh.cpu()
    w = w.cpu()
    gpus = problem.gpus
    hierarchical = problem.hierarchical and problem.nodes > 1

    def bal32(phy: torch.Tensor) -> torch.Tensor:
        return balancedness(gpu_loads(w, phy, _counts(phy, experts), gpus))

    bal_fresh = bal32(fresh)
    relabelled = relabel(old, fresh, gpus, problem.nodes, hierarchical)
    # Target on the max GPU load, from the fresh plan's balancedness minus the tolerance;
    # equal within float32 rounding (GPU sums taken in another order) counts as equal.
    goal = (bal_fresh.double() - tolerance).clamp(min=1e-9) * (1 - _ROUNDING)
    mean = w.double().sum(1) / gpus
    target = torch.where(mean > 0, mean / goal, torch.zeros_like(mean))
    region = gpus // problem.nodes if hierarchical else gpus
    moved_relabelled = moved_replicas(old, relabelled, gpus, experts)
    # Candidates per layer, in order of preference on equal moves: warm start from the current
    # placement, warm start after regrouping (hierarchical: a few group swaps between nodes, for
    # layers the first one could not bring to the goal), relabelled fresh plan.
    candidates = [warm_search(w, old, target, gpus, region, steps, moved_relabelled, old)]
    if hierarchical:
        missed = bal32(candidates[0]).double() < goal
        if missed.any():
            start = regroup(w, old, relabelled, missed, problem.groups, problem.nodes)
            only_missed = torch.where(missed, target, torch.inf)
            candidates.append(warm_search(w, start, only_missed, gpus, region, steps,
                                          moved_relabelled, old))
    candidates = [relabel(old, c, gpus, problem.nodes, hierarchical) for c in candidates]
    candidates.append(relabelled)
    moved = torch.stack([moved_replicas(old, c, gpus, experts) for c in candidates])
    reached = torch.stack([bal32(c).double() >= goal for c in candidates])
    reached[-1] = True  # the fresh plan is the goal itself (up to float32 rounding)
    pick = torch.where(reached, moved, torch.iinfo(torch.int64).max).argmin(0)  # first on ties
    stacked = torch.stack(candidates)
    new = stacked[pick, torch.arange(layers)]
    take_warm = pick != len(candidates) - 1
    cnt = _counts(new, experts)
    log2phy = api.build_log2phy(new, _phy_rank(new, experts), experts, int(cnt.max()))
    src = source_slots(old, new, gpus, problem.nodes if hierarchical else 1)
    slots = torch.arange(problem.replicas)
    per_gpu = problem.replicas // gpus
    local = ((src != slots) & (src // per_gpu == slots // per_gpu)).sum(1)
    layer_bal = bal32(new)
    return Migration(
        phy2log=new,
        log2phy=log2phy,
        logcnt=cnt,
        source_slot=src,
        moved=moved[pick, torch.arange(layers)],
        local_copies=local,
        moved_scratch=moved_replicas(old, fresh, gpus, experts),
        moved_relabelled=moved_relabelled,
        from_scratch=~take_warm,
        layer_balancedness=layer_bal,
        balancedness=float(layer_bal.mean()),
        balancedness_scratch=float(bal_fresh.mean()),
        balancedness_current=float(bal32(old).mean()),
        num_replicas=problem.replicas,
        num_groups=problem.groups,
        num_nodes=problem.nodes,
        num_gpus=gpus,
    )
