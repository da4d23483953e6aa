"""Plain Python warm-start search of ``migrate``, rule for rule as ``csrc/cpu/eplb_migrate.h``:
the oracle of the ``eplb_migrate`` op.

Replica loads are float32 divisions (numpy float32 scalars) summed in float64 (Python floats),
in the same order of operations as the C++ code, so the placements agree exactly. Slow (pure
Python loops): meant for checking on small shapes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deeppar.eplb.reference import replicate_row

F32 = np.float32
_CAP_SCALE = (1.0, 1.0, 0.85, 1.3)  # variants of the search: replica cap scale, fit rule
_FIT = (0, 1, 0, 1)


def _share(v: np.float32, count: int) -> float:
    """Replica load of an expert of load ``v`` with ``count`` replicas (float32, as planned)."""
    return float(v / F32(count))


def fewest_replicas(v: np.float32, cap: float, most: int) -> int:
    """Fewest replicas (>= 1, <= most) that bring load ``v`` to at most ``cap`` per replica."""
    if not cap > 0.0:
        return most if v > 0 else 1
    c = int(min(most, max(1.0, math.ceil(float(v) / cap))))
    while c > 1 and _share(v, c - 1) <= cap:
        c -= 1
    while c < most and _share(v, c) > cap:
        c += 1
    return c


def place_in_gpu(old_row: list[int], base: int, content: list[int], out: list[int]) -> None:
    """GPU slots ``[base, base + len(content))`` of ``out`` get ``content``: an expert that
    ``old_row`` held in a slot keeps it, the others fill the rest in order."""
    content = list(content)
    place: list[int | None] = [None] * len(content)
    for p in range(len(place)):
        if old_row[base + p] in content:
            place[p] = old_row[base + p]
            content.remove(old_row[base + p])
    rest = iter(content)
    for p in range(len(place)):
        out[base + p] = place[p] if place[p] is not None else next(rest)


class _Row:
    """One layer's search state (see ``MigrateRow`` in ``eplb_migrate.h``)."""

    def __init__(self, w: list[np.float32], shape: tuple[int, int, int, int, int],
                 target: float):
        self.w = w
        self.experts, self.replicas, self.groups, self.nodes, self.gpus = shape
        self.target = target
        self.per_gpu = self.replicas // self.gpus
        self.gpn = self.gpus // self.nodes
        self.per_node = self.replicas // self.nodes
        self.fit = 0

    # Copies of each expert on each GPU, now (held) and before (had).
    def drop_gain(self, g: int, e: int) -> int:
        i = g * self.experts + e
        return 1 if self.held[i] > self.had[i] else 0

    def add_cost(self, g: int, e: int) -> int:
        i = g * self.experts + e
        return 1 if self.held[i] >= self.had[i] else 0

    def put(self, slot: int, e: int) -> None:
        self.cur[slot] = e
        self.held[(slot // self.per_gpu) * self.experts + e] += 1

    def take(self, slot: int) -> None:
        self.held[(slot // self.per_gpu) * self.experts + self.cur[slot]] -= 1
        self.cur[slot] = -1

    def compute_loads(self) -> None:
        self.slot_load = [0.0] * self.replicas
        self.load = [0.0] * self.gpus
        for s, e in enumerate(self.cur):
            if e < 0:
                continue
            self.slot_load[s] = _share(self.w[e], self.count[e])
            self.load[s // self.per_gpu] += self.slot_load[s]

    def regroup(self, fresh: list[int] | None) -> bool:
        group_size = self.experts // self.groups
        node_of = [-1] * self.groups
        for s, e in enumerate(self.cur):
            g = e // group_size
            if node_of[g] < 0:
                node_of[g] = s // self.per_node
            if node_of[g] != s // self.per_node:
                return False
        self.group_node = node_of
        if fresh is not None:
            for s, e in enumerate(fresh):
                node_of[e // group_size] = s // self.per_node
        else:
            group_load = [0.0] * self.groups
            node_load = [0.0] * self.nodes
            for g in range(self.groups):
                for i in range(group_size):
                    group_load[g] += float(self.w[g * group_size + i])
                node_load[node_of[g]] += group_load[g]
            limit = self.gpn * self.target
            for _ in range(self.groups):
                top = max(range(self.nodes), key=lambda n: (node_load[n], -n))
                if node_load[top] <= limit:
                    break
                best, bg, bh = node_load[top], -1, -1
                for g in range(self.groups):
                    if node_of[g] != top:
                        continue
                    for h in range(self.groups):
                        other = node_of[h]
                        if other == top:
                            continue
                        delta = group_load[g] - group_load[h]
                        if delta <= 0.0:
                            continue
                        pair = max(node_load[top] - delta, node_load[other] + delta)
                        if pair < best:
                            best, bg, bh = pair, g, h
                if bg < 0:
                    break
                other = node_of[bh]
                delta = group_load[bg] - group_load[bh]
                node_load[top] -= delta
                node_load[other] += delta
                node_of[bg], node_of[bh] = other, top
        for s in range(self.replicas):
            if node_of[self.cur[s] // group_size] != s // self.per_node:
                self.take(s)
        return True

    def region_experts(self, region: int) -> list[int]:
        if self.nodes == 1:
            return list(range(self.experts))
        size = self.experts // self.groups
        return [g * size + i for g in range(self.groups) if self.group_node[g] == region
                for i in range(size)]

    def set_counts(self, region: int, cap: float) -> None:
        first, slots, w = region * self.per_node, self.per_node, self.w
        ex = self.region_experts(region)
        most = slots - len(ex) + 1
        for e in ex:
            self.need_min[e] = fewest_replicas(w[e], cap, most)
        if sum(self.need_min[e] for e in ex) > slots:
            _, _, counts = replicate_row([w[e] for e in ex], slots)
            region_cap = 0.0
            for e, c in zip(ex, counts):
                region_cap = max(region_cap, _share(w[e], c))
            for e in ex:
                self.need_min[e] = fewest_replicas(w[e], region_cap, most)
        want = [0] * self.experts
        for e in ex:
            want[e] = max(self.count[e], self.need_min[e])
        total = sum(want[e] for e in ex)
        while total > slots:
            pick, pick_load = -1, 0.0
            for e in ex:
                if want[e] <= self.need_min[e]:
                    continue
                v = _share(w[e], want[e] - 1)
                if pick < 0 or v < pick_load:
                    pick, pick_load = e, v
            want[pick] -= 1
            total -= 1
        while total < slots:
            pick = -1
            for e in ex:
                if pick < 0:
                    pick = e
                    continue
                a, b = w[e] / F32(want[e]), w[pick] / F32(want[pick])
                if a > b or (a == b and want[e] < want[pick]):
                    pick = e
            want[pick] += 1
            total += 1
        self.compute_loads()
        pg = self.per_gpu
        for e in ex:
            while self.count[e] > want[e]:
                pick = -1
                for s in range(first, first + slots):
                    if self.cur[s] != e:
                        continue
                    if pick < 0:
                        pick = s
                        continue
                    ds, dp = self.drop_gain(s // pg, e), self.drop_gain(pick // pg, e)
                    if ds > dp or (ds == dp and self.load[s // pg] > self.load[pick // pg]):
                        pick = s
                self.load[pick // pg] -= self.slot_load[pick]
                self.take(pick)
                self.count[e] -= 1
        fill = []
        for e in ex:
            fill += [e] * (want[e] - self.count[e])
            self.count[e] = want[e]
        fill.sort(key=lambda e: -_share(w[e], self.count[e]))
        self.compute_loads()
        for e in fill:
            pick, pick_key = -1, 0
            for s in range(first, first + slots):
                if self.cur[s] >= 0:
                    continue
                i = (s // pg) * self.experts + e
                key = (0 if self.held[i] < self.had[i] else 2) + (1 if self.held[i] > 0 else 0)
                if pick < 0 or key < pick_key or (
                    key == pick_key and self.load[s // pg] < self.load[pick // pg]
                ):
                    pick, pick_key = s, key
            self.put(pick, e)
            self.slot_load[pick] = _share(w[e], self.count[e])
            self.load[pick // pg] += self.slot_load[pick]

    def swap_slots(self, a: int, b: int) -> None:
        x, y = self.cur[a], self.cur[b]
        delta = self.slot_load[a] - self.slot_load[b]
        self.take(a)
        self.take(b)
        self.put(a, y)
        self.put(b, x)
        self.slot_load[a], self.slot_load[b] = self.slot_load[b], self.slot_load[a]
        self.load[a // self.per_gpu] -= delta
        self.load[b // self.per_gpu] += delta

    def swap_cost(self, a: int, b: int) -> tuple[int, bool]:
        g, h, x, y = a // self.per_gpu, b // self.per_gpu, self.cur[a], self.cur[b]
        ok = self.held[g * self.experts + y] == 0 and self.held[h * self.experts + x] == 0
        cost = self.add_cost(g, y) + self.add_cost(h, x) - self.drop_gain(g, x) - \
            self.drop_gain(h, y)
        return cost, ok

    def top_gpu(self, g0: int, g1: int) -> int:
        g = g0
        for q in range(g0 + 1, g1):
            if self.load[q] > self.load[g]:
                g = q
        return g

    def search(self, region: int, rounds: int) -> bool:
        g0, g1, pg, t = region * self.gpn, (region + 1) * self.gpn, self.per_gpu, self.target
        for _ in range(rounds):
            g = self.top_gpu(g0, g1)
            top = self.load[g]
            if top <= t:
                return True
            best_kind, best_cost, best_key, best_a, best_b = 3, 0, 0.0, -1, -1
            for a in range(g * pg, (g + 1) * pg):
                for b in range(g0 * pg, g1 * pg):
                    h = b // pg
                    if h == g or self.cur[a] == self.cur[b]:
                        continue
                    delta = self.slot_load[a] - self.slot_load[b]
                    if delta <= 0.0:
                        continue
                    new_g, new_h = top - delta, self.load[h] + delta
                    if max(new_g, new_h) >= top:
                        continue
                    cost, ok = self.swap_cost(a, b)
                    if not ok:
                        continue
                    if new_h <= t:
                        kind = 0 if new_g <= t else 2
                    else:
                        kind = 1 if new_g <= t else 2
                    if kind == 0:
                        key = -self.load[h] if self.fit == 0 else -new_g
                    else:
                        key = max(new_g, new_h)
                    if kind < best_kind or (kind == best_kind and (
                            cost < best_cost or (cost == best_cost and key < best_key))):
                        best_kind, best_cost, best_key, best_a, best_b = kind, cost, key, a, b
            if best_a < 0:
                return False
            self.swap_slots(best_a, best_b)
        return all(self.load[q] <= t for q in range(g0, g1))

    def finish(self, region: int, rounds: int) -> bool:
        g0, g1, pg, t = region * self.gpn, (region + 1) * self.gpn, self.per_gpu, self.target
        for _ in range(rounds):
            g = self.top_gpu(g0, g1)
            if self.load[g] <= t:
                return True
            best_cost, best_key, best = math.inf, 0.0, None
            for a in range(g * pg, (g + 1) * pg):
                for b in range(g0 * pg, g1 * pg):
                    h = b // pg
                    if h == g or self.cur[a] == self.cur[b]:
                        continue
                    d1 = self.slot_load[a] - self.slot_load[b]
                    if self.load[g] - d1 > t or self.load[h] + d1 <= t:
                        continue
                    cost1, ok = self.swap_cost(a, b)
                    if not ok or cost1 >= best_cost:
                        continue
                    self.swap_slots(a, b)
                    over = self.load[h] - t
                    for k in range(g0, g1):
                        if k in (g, h) or self.load[k] + over > t:
                            continue
                        for c in range(h * pg, (h + 1) * pg):
                            for d in range(k * pg, (k + 1) * pg):
                                if self.cur[c] == self.cur[d]:
                                    continue
                                d2 = self.slot_load[c] - self.slot_load[d]
                                if d2 < over or self.load[k] + d2 > t:
                                    continue
                                cost2, ok = self.swap_cost(c, d)
                                if not ok:
                                    continue
                                key = max(self.load[h] - d2, self.load[k] + d2)
                                if cost1 + cost2 < best_cost or (
                                        cost1 + cost2 == best_cost and key < best_key):
                                    best_cost, best_key, best = cost1 + cost2, key, (a, b, c, d)
                    self.swap_slots(a, b)
            if best is None:
                return False
            self.swap_slots(best[0], best[1])
            self.swap_slots(best[2], best[3])
        return all(self.load[q] <= t for q in range(g0, g1))

    def undo_receptions(self, region: int) -> None:
        first, last, pg = region * self.per_node, (region + 1) * self.per_node, self.per_gpu
        for _ in range(8):
            changed = False
            for a in range(first, last):
                g = a // pg
                if not self.drop_gain(g, self.cur[a]):
                    continue
                best_b, best_cost = -1, 0
                for b in range(first, last):
                    h = b // pg
                    if h == g or self.cur[a] == self.cur[b]:
                        continue
                    cost, ok = self.swap_cost(a, b)
                    if not ok or cost >= best_cost:
                        continue
                    delta = self.slot_load[a] - self.slot_load[b]
                    if self.load[g] - delta > self.target or self.load[h] + delta > self.target:
                        continue
                    best_cost, best_b = cost, b
                if best_b >= 0:
                    self.swap_slots(a, best_b)
                    changed = True
            if not changed:
                break

    def region_cost(self, region: int) -> int:
        lo, hi = region * self.gpn * self.experts, (region + 1) * self.gpn * self.experts
        return sum(max(0, self.held[i] - self.had[i]) for i in range(lo, hi))

    def snapshot(self, region: int) -> tuple:
        s0, s1 = region * self.per_node, (region + 1) * self.per_node
        h0, h1 = region * self.gpn * self.experts, (region + 1) * self.gpn * self.experts
        return self.cur[s0:s1], self.held[h0:h1], list(self.count)

    def restore(self, region: int, saved: tuple) -> None:
        s0, s1 = region * self.per_node, (region + 1) * self.per_node
        h0, h1 = region * self.gpn * self.experts, (region + 1) * self.gpn * self.experts
        self.cur[s0:s1], self.held[h0:h1], self.count = list(saved[0]), list(saved[1]), \
            list(saved[2])

    def same_experts(self, region: int, fresh: list[int]) -> bool:
        if self.nodes == 1:
            return True
        size = self.experts // self.groups
        seen = set()
        for s in range(region * self.per_node, (region + 1) * self.per_node):
            g = fresh[s] // size
            if self.group_node[g] != region:
                return False
            seen.add(g)
        return all((self.group_node[g] == region) == (g in seen) for g in range(self.groups))

    def run(self, old: list[int], fresh: list[int] | None, fresh_groups: bool, cap: float,
            rounds: int) -> tuple[list[int], bool]:
        self.cur = list(old)
        self.had = [0] * (self.gpus * self.experts)
        for s, e in enumerate(old):
            self.had[(s // self.per_gpu) * self.experts + e] += 1
        self.held = list(self.had)
        if self.nodes > 1 and not self.regroup(fresh if fresh_groups else None):
            return list(old), False
        self.count = [0] * self.experts
        for e in self.cur:
            if e >= 0:
                self.count[e] += 1
        self.need_min = [1] * self.experts
        found_all = True
        for region in range(self.nodes):
            start = self.snapshot(region)
            found, best_cost, best = False, 0, None
            for v in range(len(_CAP_SCALE)):
                self.restore(region, start)
                self.fit = _FIT[v]
                self.set_counts(region, cap * _CAP_SCALE[v])
                self.compute_loads()
                ok = self.search(region, rounds) or (
                    self.per_gpu > 1 and self.finish(region, self.gpn))
                self.undo_receptions(region)
                cost = self.region_cost(region)
                if (ok and (not found or cost < best_cost)) or (not found and v == 0):
                    best, best_cost, found = self.snapshot(region), cost, found or ok
            if fresh is not None and self.same_experts(region, fresh):
                self.restore(region, start)
                for s in range(region * self.per_node, (region + 1) * self.per_node):
                    if self.cur[s] >= 0:
                        self.count[self.cur[s]] -= 1
                        self.take(s)
                for s in range(region * self.per_node, (region + 1) * self.per_node):
                    self.put(s, fresh[s])
                    self.count[fresh[s]] += 1
                self.compute_loads()
                self.undo_receptions(region)
                cost = self.region_cost(region)
                if not found or cost < best_cost:
                    best, best_cost, found = self.snapshot(region), cost, True
            self.restore(region, best)
            found_all = found_all and found
        return list(self.cur), found_all


def migrate_row(w: list[np.float32], old: list[int], fresh: list[int] | None, target: float,
                cap: float, shape: tuple[int, int, int, int, int],
                rounds: int) -> tuple[list[int], bool]:
    """One layer: (placement, whether it reached ``target``), as the ``eplb_migrate`` op.
    ``shape`` = (experts, replicas, groups, nodes, gpus); nodes == 1: one region."""
    row = _Row(w, shape, target)
    out, ok = row.run(old, fresh, False, cap, rounds)
    if not ok and row.nodes > 1 and fresh is not None:
        out, ok = row.run(old, fresh, True, cap, rounds)
    per_gpu = row.per_gpu
    placed = list(out)
    for g in range(row.gpus):
        place_in_gpu(old, g * per_gpu, out[g * per_gpu:(g + 1) * per_gpu], placed)
    return placed, ok


def migrate_layers(weight: torch.Tensor, current: torch.Tensor, fresh: torch.Tensor,
                   target: torch.Tensor, cap: torch.Tensor, num_groups: int, num_nodes: int,
                   num_gpus: int, max_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched :func:`migrate_row` with the ``eplb_migrate`` op's arguments and outputs."""
    layers, experts = weight.shape
    shape = (experts, current.shape[1], num_groups, num_nodes, num_gpus)
    rows, reached = [], []
    for layer in range(layers):
        w = [F32(v) for v in weight[layer].to(torch.float32).tolist()]
        out, ok = migrate_row(w, current[layer].tolist(), fresh[layer].tolist(),
                              float(target[layer]), float(cap[layer]), shape, max_steps)
        rows.append(out)
        reached.append(ok)
    return torch.tensor(rows, dtype=torch.int64).view(layers, -1), torch.tensor(reached)
