"""Migration-aware rebalancing: a new plan for new loads that moves few expert replicas.

Planning from scratch for slightly different loads reshuffles most slots, and each changed slot
costs an expert's weights over the network. ``migrate`` keeps the cost low:

1. **Relabelling** (free): a fresh plan's packs are assigned to GPUs by maximum overlap with
   the current placement (nodes first under the hierarchical policy, then GPUs inside matched
   nodes; greedy on the overlap counts, ties by index), and inside each GPU an expert that stays
   keeps its old slot.
2. **Warm start** (C++, ``csrc/cpu/eplb_migrate.h``, layers in parallel): the goal per layer is
   the fresh plan's max GPU load (its balancedness minus ``tolerance``). From the current
   placement: under the hierarchical policy, the fewest group swaps between nodes that bring
   every node under the goal times its GPUs; replica counts raised where a replica would carry
   more than the fresh plan's largest replica load, surplus replicas of the experts that stay
   lightest freed for them (new replicas go heaviest first to the least loaded GPU without a
   copy); then swaps of two replicas between GPUs of a node (any GPUs under the global policy)
   that lower the most loaded GPU, preferring swaps that leave both GPUs under the goal, then
   swaps that pass less load on, the fewest moved replicas first among them; pairs of swaps
   (a chain over three GPUs) where single swaps stall; swaps that bring replicas back while
   every GPU stays under the goal. Four variants of the rules run per node, and the node of the
   relabelled fresh plan with the same swaps back is a fifth; each node keeps its cheapest
   variant that reaches the goal.
3. Per layer, the warm-start result is taken when it reaches the goal (checked here, as the
   planner measures balancedness) with no more moved replicas than the relabelled fresh plan;
   otherwise the relabelled fresh plan.

A moved replica is a slot whose GPU did not hold its expert before (its weights come over the
network; a copy of an expert the GPU already holds is a local copy). Moves never put an
expert on a node that its group does not use after the group swaps, so the hierarchical
policy's node rule holds whenever it held for the current placement. The transfer plan is one
tensor: ``source_slot[l, s]`` is the old slot whose weights new slot ``s`` receives (``s``
itself when the slot keeps its expert). Everything is deterministic. Without the native
extension the same search runs in plain Python (:mod:`deeppar.eplb.migration_reference`, the
same placements, about 100x slower).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from deeppar import _native
from deeppar.eplb import api, migration_reference
from deeppar.eplb._validate import LIMITS, as_count, as_weight, check_problem, check_values
from deeppar.eplb.planning import balancedness, gpu_loads

_ROUNDING = 1e-6  # relative float32 rounding slack when comparing balancedness


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
    layer_balancedness: torch.Tensor  # [L] float64, new plan under the new loads
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
    held = (gpu * num_experts + old).sort(dim=1).values  # (GPU, expert) keys held before
    wanted = gpu * num_experts + new
    at = torch.searchsorted(held, wanted).clamp(max=replicas - 1)
    return (held.gather(1, at) != wanted).sum(1)


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


def _phy_rank(phy: torch.Tensor, experts: int) -> torch.Tensor:
    """Replica rank of each slot: its position among its expert's slots, in slot order."""
    sorted_e, order = torch.sort(phy, dim=1, stable=True)
    cnt = _counts(phy, experts)
    start = cnt.cumsum(1) - cnt
    rank_sorted = torch.arange(phy.shape[1]) - start.gather(1, sorted_e)
    return torch.empty_like(phy).scatter_(1, order, rank_sorted)


def relabel_plan(old: torch.Tensor, new: torch.Tensor, num_gpus: int,
                 num_nodes: int) -> torch.Tensor:
    """:func:`relabel` (nodes first when ``num_nodes > 1``) by the C++ kernel when it is built."""
    if _native.has_kernel("eplb_relabel", "cpu"):
        return torch.ops.deeppar.eplb_relabel(old, new, num_gpus, num_nodes)
    return relabel(old, new, num_gpus, num_nodes, hierarchical=num_nodes > 1)


def transfer_plan(old: torch.Tensor, new: torch.Tensor, num_gpus: int,
                  num_nodes: int) -> torch.Tensor:
    """:func:`source_slots` by the C++ kernel when it is built."""
    if _native.has_kernel("eplb_source_slots", "cpu"):
        return torch.ops.deeppar.eplb_source_slots(old, new, num_gpus, num_nodes)
    return source_slots(old, new, num_gpus, num_nodes)


def replica_cap(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor) -> torch.Tensor:
    """``[L]`` float64 largest replica load of a plan (float32 ``load / count``, as planned)."""
    share = weight.gather(1, phy2log) / logcnt.gather(1, phy2log).to(torch.float32)
    return share.to(torch.float64).amax(1)


def max_load_target(weight: torch.Tensor, balancedness_goal: torch.Tensor,
                    num_gpus: int) -> torch.Tensor:
    """``[L]`` float64 max GPU load that gives balancedness ``balancedness_goal [L]`` under
    ``weight [L, E]`` (0 for an all-zero layer)."""
    mean = weight.double().sum(1) / num_gpus
    return torch.where(mean > 0, mean / balancedness_goal, torch.zeros_like(mean))


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
        max_steps: bound of each swap search (swaps per node and variant); default
            64 + 16 * num_gpus.
        method, backend: passed to the planner for the fresh plan.
    Returns:
        a :class:`Migration` (CPU tensors) with the new maps and ``source_slot``.
    """
    w = as_weight(weight)
    problem = check_problem(w, num_replicas, num_groups, num_nodes, num_gpus)
    LIMITS.check_migration(problem.gpus, w.shape[1])
    check_values(w)
    layers, experts = w.shape
    old = check_placement(current, layers, experts, problem.replicas)
    if not isinstance(tolerance, (int, float)) or isinstance(tolerance, bool) or not (
        0.0 <= tolerance < 1.0
    ):
        raise ValueError(f"tolerance must be a number in [0, 1), got {tolerance!r}")
    steps = (64 + 16 * problem.gpus if max_steps is None
             else as_count(max_steps, "max_steps", 0))
    extra = {} if method is None else {"method": method}
    fresh, _, fresh_cnt = api.rebalance_experts(w, problem.replicas, problem.groups,
                                                problem.nodes, problem.gpus, backend=backend,
                                                **extra)
    fresh, fresh_cnt = fresh.cpu(), fresh_cnt.cpu()
    w = w.cpu()
    gpus = problem.gpus
    hierarchical = problem.hierarchical and problem.nodes > 1
    nodes = problem.nodes if hierarchical else 1  # one region under the global policy

    def layer_bal(phy: torch.Tensor, cnt: torch.Tensor | None = None) -> torch.Tensor:
        cnt = _counts(phy, experts) if cnt is None else cnt
        return balancedness(gpu_loads(w, phy, cnt, gpus))

    bal_fresh = layer_bal(fresh, fresh_cnt)
    relabelled = relabel_plan(old, fresh, gpus, nodes)
    # Goal on the max GPU load, from the fresh plan's balancedness minus the tolerance; equal
    # within float32 rounding (GPU sums taken in another order) counts as equal.
    goal = (bal_fresh.double() - tolerance).clamp(min=1e-9) * (1 - _ROUNDING)
    target = max_load_target(w, goal, gpus)
    search = (torch.ops.deeppar.eplb_migrate if _native.has_kernel("eplb_migrate", "cpu")
              else migration_reference.migrate_layers)
    warm, _ = search(w, old, relabelled, target, replica_cap(w, fresh, fresh_cnt),
                     problem.groups if hierarchical else 1, nodes, gpus, steps)
    candidates = [warm, relabelled]
    moved = torch.stack([moved_replicas(old, c, gpus, experts) for c in candidates])
    reached = torch.stack([layer_bal(c).double() >= goal for c in candidates])
    reached[-1] = True  # the fresh plan is the goal itself (up to float32 rounding)
    pick = torch.where(reached, moved, torch.iinfo(torch.int64).max).argmin(0)  # first on ties
    rows = torch.arange(layers)
    new = torch.stack(candidates)[pick, rows]
    cnt = _counts(new, experts)
    log2phy = api.build_log2phy(new, _phy_rank(new, experts), experts, int(cnt.max()))
    src = transfer_plan(old, new, gpus, nodes)
    slots = torch.arange(problem.replicas)
    per_gpu = problem.replicas // gpus
    local = ((src != slots) & (src // per_gpu == slots // per_gpu)).sum(1)
    bal_new = layer_bal(new, cnt)
    return Migration(
        phy2log=new,
        log2phy=log2phy,
        logcnt=cnt,
        source_slot=src,
        moved=moved[pick, rows],
        local_copies=local,
        moved_scratch=moved_replicas(old, fresh, gpus, experts),
        moved_relabelled=moved[-1],
        from_scratch=pick == len(candidates) - 1,
        layer_balancedness=bal_new,
        balancedness=float(bal_new.mean()),
        balancedness_scratch=float(bal_fresh.mean()),
        balancedness_current=float(layer_bal(old).mean()),
        num_replicas=problem.replicas,
        num_groups=problem.groups,
        num_nodes=problem.nodes,
        num_gpus=gpus,
    )
