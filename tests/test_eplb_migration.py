"""Migration-aware rebalancing: valid maps, transfer plan, balancedness, fewer moves, errors."""

from __future__ import annotations

import pytest
import torch
from _eplb_helpers import SHAPES as HELPER_SHAPES
from _eplb_helpers import check_invariants, random_weight

import deeppar.eplb as eplb
from deeppar import _native
from deeppar.eplb import migration_reference
from deeppar.eplb._validate import LIMITS
from deeppar.eplb.migration import (
    max_load_target,
    migrate,
    moved_replicas,
    relabel,
    relabel_plan,
    replica_cap,
    source_slots,
)
from deeppar.eplb.planning import balancedness, gpu_loads

native = pytest.mark.skipif(not _native.has_kernel("eplb_migrate", "cpu"),
                            reason="deeppar._C without the eplb_migrate kernel")
needs_balanced = pytest.mark.skipif(not _native.has_kernel("eplb_rebalance_balanced", "cpu"),
                                    reason="method='balanced' needs deeppar._C")
METHODS = ["deepseek", pytest.param("balanced", marks=needs_balanced)]

# (layers, experts, replicas, groups, nodes, gpus): hierarchical, global, one slot per GPU.
SHAPES = [
    (4, 16, 24, 4, 2, 4),
    (3, 32, 40, 8, 4, 8),
    (3, 24, 30, 4, 3, 6),  # 4 % 3 != 0: global policy
    (2, 16, 20, 4, 2, 20),  # one slot per GPU
    (2, 12, 16, 4, 1, 4),
]


def zipf(layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(layers)]) + 1
    return 1000.0 / ranks.float()


def drift(weight: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return weight * torch.exp(torch.randn(weight.shape, generator=g) * sigma)


def layer_balancedness(weight, phy2log, logcnt, gpus):
    return balancedness(gpu_loads(weight.float(), phy2log, logcnt, gpus))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_valid_maps_transfers_and_balancedness(shape, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    w0 = zipf(layers, experts, seed)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    w1 = drift(w0, 0.4, seed + 10)
    m = migrate(w1, current, replicas, groups, nodes, gpus)
    check_invariants(w1, m.phy2log, m.log2phy, m.logcnt, replicas, groups, nodes, gpus)
    # Never worse than a fresh plan, layer by layer (tolerance 0), up to float32 rounding of
    # GPU sums taken in another slot order.
    fresh, _, fresh_cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus)
    want = layer_balancedness(w1, fresh, fresh_cnt, gpus)
    assert (m.layer_balancedness >= want * (1 - 1e-6)).all()
    assert torch.equal(m.layer_balancedness, layer_balancedness(w1, m.phy2log, m.logcnt, gpus))
    # The transfer plan: each new slot copies an old slot that held its expert.
    src = m.source_slot
    assert torch.equal(current.gather(1, src), m.phy2log)
    slots = torch.arange(replicas)
    unchanged = current == m.phy2log
    assert torch.equal(src[unchanged], slots.expand_as(src)[unchanged])
    per_gpu = replicas // gpus
    remote = (src // per_gpu) != (slots // per_gpu)
    assert torch.equal(remote.sum(1), m.moved)
    assert torch.equal(m.moved, moved_replicas(current, m.phy2log, gpus, experts))
    assert (m.moved <= m.moved_relabelled).all()
    # A slot is sent from the receiver's GPU whenever that GPU held the expert.
    for layer in range(layers):
        for s in remote[layer].nonzero().flatten().tolist():
            g = s // per_gpu
            held = current[layer, g * per_gpu:(g + 1) * per_gpu].tolist()
            assert int(m.phy2log[layer, s]) not in held


@pytest.mark.parametrize("shape", SHAPES)
def test_same_loads_move_nothing(shape):
    layers, experts, replicas, groups, nodes, gpus = shape
    w = zipf(layers, experts, 3)
    current, _, _ = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    m = migrate(w, current, replicas, groups, nodes, gpus)
    assert int(m.moved.sum()) == 0 and int(m.local_copies.sum()) == 0
    assert torch.equal(m.phy2log, current)
    assert torch.equal(m.source_slot, torch.arange(replicas).expand(layers, replicas))


def test_relabelling_permutes_gpus_only_and_finds_a_shuffled_plan():
    layers, experts, replicas, groups, nodes, gpus = 3, 32, 40, 8, 4, 8
    w = zipf(layers, experts, 5)
    plan, _, cnt = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
    per_gpu, per_node = replicas // gpus, replicas // nodes
    # The same plan with nodes, GPUs inside nodes and slots inside GPUs renumbered.
    g = torch.Generator().manual_seed(0)
    node_perm = torch.randperm(nodes, generator=g)
    shuffled = torch.empty_like(plan)
    for layer in range(layers):
        order = []
        for node in node_perm.tolist():
            gpu_perm = torch.randperm(gpus // nodes, generator=g).tolist()
            for gi in gpu_perm:
                base = node * per_node + gi * per_gpu
                order += (base + torch.randperm(per_gpu, generator=g)).tolist()
        shuffled[layer] = plan[layer, order]
    back = relabel(plan, shuffled, gpus, nodes, hierarchical=True)
    assert torch.equal(back, plan)
    loads = gpu_loads(w, shuffled, cnt, gpus).sort(1).values
    assert torch.allclose(gpu_loads(w, back, cnt, gpus).sort(1).values, loads, rtol=1e-6)


def test_drifted_loads_move_at_least_twice_fewer_replicas():
    layers, experts, replicas, groups, nodes, gpus = 6, 64, 80, 8, 2, 16
    w0 = zipf(layers, experts, 7)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    w1 = drift(w0, 0.3, 8)
    m = migrate(w1, current, replicas, groups, nodes, gpus)
    assert m.balancedness >= m.balancedness_scratch * (1 - 1e-6)
    assert 2 * int(m.moved.sum()) <= int(m.moved_scratch.sum())


def test_tolerance_trades_balancedness_for_moves():
    layers, experts, replicas, groups, nodes, gpus = 4, 32, 40, 8, 2, 8
    w0 = zipf(layers, experts, 11)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    w1 = drift(w0, 0.4, 12)
    strict = migrate(w1, current, replicas, groups, nodes, gpus)
    loose = migrate(w1, current, replicas, groups, nodes, gpus, tolerance=0.1)
    assert int(loose.moved.sum()) <= int(strict.moved.sum())
    fresh = torch.tensor(strict.balancedness_scratch)
    assert loose.balancedness >= float(fresh) - 0.1 - 1e-6


def test_deterministic_and_summary():
    layers, experts, replicas, groups, nodes, gpus = 3, 24, 30, 4, 3, 6
    w0 = zipf(layers, experts, 2)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    w1 = drift(w0, 0.5, 3)
    a = migrate(w1, current, replicas, groups, nodes, gpus)
    b = migrate(w1, current, replicas, groups, nodes, gpus)
    assert torch.equal(a.phy2log, b.phy2log) and torch.equal(a.source_slot, b.source_slot)
    text = a.summary(expert_bytes=1000)
    assert f"migration: {int(a.moved.sum())} of {layers * replicas} replicas" in text
    assert f"bytes moved: {int(a.moved.sum()) * 1000}" in text
    data = a.to_dict()
    assert data["phy2log"] == a.phy2log.tolist() and data["source_slot"] == a.source_slot.tolist()


def test_source_slots_prefer_same_gpu_then_same_node():
    # 1 layer, 4 experts, 8 slots, 2 nodes of 2 GPUs (2 slots per GPU).
    old = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    new = torch.tensor([[1, 0, 2, 0, 3, 3, 2, 1]])
    src = source_slots(old, new, num_gpus=4, num_nodes=2)
    # slot 0 wants 1: held by slot 1 on the same GPU; slot 1 wants 0: slot 0, same GPU.
    # slot 3 wants 0: on node 0 only slot 0 holds it. slots 4, 5 (GPU 2) want 3: slot 7 on
    # node 1. slot 7 wants 1: slot 5 on node 1.
    assert src.tolist() == [[1, 0, 2, 0, 7, 7, 6, 5]]


def test_bad_current_placement():
    w = zipf(2, 8, 0)
    good, _, _ = eplb.rebalance_experts(w, 12, 2, 2, 4)
    with pytest.raises(ValueError, match=r"current placement has shape \(2, 10\).*num_replicas=12"):
        migrate(w, good[:, :10], 12, 2, 2, 4)
    with pytest.raises(ValueError, match=r"shape \(1, 12\)"):
        migrate(w, good[:1], 12, 2, 2, 4)
    uncovered = good.clone()
    uncovered[1] = 0
    with pytest.raises(ValueError, match="does not cover every expert: layer 1 has no replica"):
        migrate(w, uncovered, 12, 2, 2, 4)
    outside = good.clone()
    outside[0, 0] = 8
    with pytest.raises(ValueError, match=r"expert 8, outside \[0, 8\)"):
        migrate(w, outside, 12, 2, 2, 4)
    with pytest.raises(TypeError, match="integer expert ids"):
        migrate(w, good.float(), 12, 2, 2, 4)
    with pytest.raises(TypeError, match="phy2log tensor"):
        migrate(w, good.tolist(), 12, 2, 2, 4)
    with pytest.raises(ValueError, match="tolerance"):
        migrate(w, good, 12, 2, 2, 4, tolerance=1.5)
    with pytest.raises(ValueError, match="num_gpus"):
        migrate(w, good, 12, 2, 2, 5)


def test_heavy_node_regroups_and_stays_valid():
    layers, experts, replicas, groups, nodes, gpus = 2, 16, 24, 4, 2, 4
    w0 = zipf(layers, experts, 4)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    # Make both groups of node 0 five times heavier: the node loads need other groups there.
    group_size, per_node = experts // groups, replicas // nodes
    w1 = w0.clone()
    for layer in range(layers):
        for g in set((current[layer, :per_node] // group_size).tolist()):
            w1[layer, g * group_size:(g + 1) * group_size] *= 5
    m = migrate(w1, current, replicas, groups, nodes, gpus)
    check_invariants(w1, m.phy2log, m.log2phy, m.logcnt, replicas, groups, nodes, gpus)
    assert (m.moved <= m.moved_relabelled).all()
    fresh, _, cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus)
    assert (m.layer_balancedness >= layer_balancedness(w1, fresh, cnt, gpus) * (1 - 1e-6)).all()


def search_inputs(shape, method, seed, sigma):
    """(weight, current, relabelled fresh plan, target, cap, groups, nodes) as migrate passes
    them to the eplb_migrate op."""
    layers, experts, replicas, groups, nodes, gpus = shape
    w0 = zipf(layers, experts, seed)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus, method=method)
    w1 = drift(w0, sigma, seed + 1)
    fresh, _, cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus, method=method)
    hierarchical = groups % nodes == 0 and nodes > 1
    regions = nodes if hierarchical else 1
    goal = layer_balancedness(w1, fresh, cnt, gpus).double() * (1 - 1e-6)
    return (w1, current, relabel_plan(current, fresh, gpus, regions),
            max_load_target(w1, goal, gpus), replica_cap(w1, fresh, cnt),
            groups if hierarchical else 1, regions)


SEARCH_SHAPES = [
    (3, 16, 24, 4, 2, 4),
    (2, 32, 40, 8, 4, 8),
    (3, 24, 30, 4, 3, 6),  # global policy
    (2, 16, 20, 4, 2, 20),  # one slot per GPU
    (2, 12, 16, 4, 1, 4),
    (2, 24, 48, 6, 2, 12),
]


@native
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
@pytest.mark.parametrize("method", ["deepseek", "balanced"])
@pytest.mark.parametrize("seed", [0, 1])
def test_native_search_equals_the_reference(shape, method, seed):
    w, current, fresh, target, cap, groups, regions = search_inputs(shape, method, seed, 0.5)
    gpus, steps = shape[5], 64 + 16 * shape[5]
    args = (w, current, fresh, target, cap, groups, regions, gpus, steps)
    got, reached = torch.ops.deeppar.eplb_migrate(*args)
    want, want_reached = migration_reference.migrate_layers(*args)
    assert torch.equal(got, want) and torch.equal(reached, want_reached)
    # A valid placement: every expert kept, no group leaves its node; reached means every GPU
    # load is at most the target.
    layers, experts, replicas = shape[:3]
    cnt = torch.zeros(layers, experts, dtype=torch.long).scatter_add_(1, got, torch.ones_like(got))
    assert (cnt >= 1).all()
    loads = gpu_loads(w, got, cnt, gpus)
    assert (loads.max(1).values[reached] <= target[reached]).all()
    if groups > 1:
        per_node, size = replicas // regions, experts // groups
        for layer in range(layers):
            node = {}
            for s, e in enumerate(got[layer].tolist()):
                assert node.setdefault(e // size, s // per_node) == s // per_node


@native
@pytest.mark.parametrize("shape", SEARCH_SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_native_relabel_and_transfers_equal_the_python_ones(shape, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    w0 = zipf(layers, experts, seed)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    fresh, _, _ = eplb.rebalance_experts(drift(w0, 0.5, seed), replicas, groups, nodes, gpus)
    for regions in {1, nodes}:
        got = torch.ops.deeppar.eplb_relabel(current, fresh, gpus, regions)
        assert torch.equal(got, relabel(current, fresh, gpus, regions, regions > 1))
        assert torch.equal(torch.ops.deeppar.eplb_source_slots(current, got, gpus, regions),
                           source_slots(current, got, gpus, regions))


@native
def test_opcheck_and_op_errors():
    w, current, fresh, target, cap, groups, regions = search_inputs(SEARCH_SHAPES[0],
                                                                    "deepseek", 0, 0.3)
    gpus = SEARCH_SHAPES[0][5]
    torch.library.opcheck(torch.ops.deeppar.eplb_migrate.default,
                          (w, current, fresh, target, cap, groups, regions, gpus, 100))
    torch.library.opcheck(torch.ops.deeppar.eplb_relabel.default, (current, fresh, gpus, 2))
    torch.library.opcheck(torch.ops.deeppar.eplb_source_slots.default, (current, fresh, gpus, 2))
    with pytest.raises(ValueError, match="target and cap must be float64"):
        torch.ops.deeppar.eplb_migrate(w, current, fresh, target.float(), cap, groups, regions,
                                       gpus, 100)
    with pytest.raises(ValueError, match="placements must hold experts"):
        torch.ops.deeppar.eplb_migrate(w, current + 100, fresh, target, cap, groups, regions,
                                       gpus, 100)
    with pytest.raises(ValueError, match="does not hold"):
        torch.ops.deeppar.eplb_source_slots(torch.zeros_like(current), fresh, gpus, 1)
    with pytest.raises(ValueError, match=r"replicas \(\d+\) must be a multiple of num_gpus"):
        torch.ops.deeppar.eplb_relabel(current, fresh, current.shape[1] + 1, 1)


def test_sizes_above_the_migration_limit_are_rejected():
    # 4096 GPUs x 4096 experts: 2^24 entries per dense table, the smallest size rejected.
    gpus = experts = 4096
    assert gpus * experts == LIMITS.migration_table_below
    weight = torch.ones(1, experts)
    current = torch.arange(experts).unsqueeze(0)
    message = r"num_gpus=4096, experts=4096"
    with pytest.raises(ValueError, match=message):
        migrate(weight, current, experts, 1, 1, gpus)
    if _native.has_kernel("eplb_migrate", "cpu"):
        native_message = r"num_gpus \(4096\) \* max\(experts \(4096\), num_gpus\)"
        for op in (torch.ops.deeppar.eplb_relabel, torch.ops.deeppar.eplb_source_slots):
            with pytest.raises(ValueError, match=native_message):
                op(current, current, gpus, 1)
        with pytest.raises(ValueError, match=native_message):
            one = torch.ones(1, dtype=torch.float64)
            torch.ops.deeppar.eplb_migrate(weight, current, current, one, one, 1, 1, gpus, 10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sigma", [0.2, 0.5])
def test_drifted_loads_move_at_least_twice_fewer_for_both_methods(method, sigma):
    layers, experts, replicas, groups, nodes, gpus = 8, 64, 80, 8, 2, 16
    w0 = zipf(layers, experts, 7)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus, method=method)
    w1 = drift(w0, sigma, 8)
    m = migrate(w1, current, replicas, groups, nodes, gpus, method=method)
    fresh, _, cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus, method=method)
    want = layer_balancedness(w1, fresh, cnt, gpus)
    assert (m.layer_balancedness >= want * (1 - 1e-6)).all()
    assert 2 * int(m.moved.sum()) <= int(m.moved_scratch.sum())
    check_invariants(w1, m.phy2log, m.log2phy, m.logcnt, replicas, groups, nodes, gpus)


@needs_balanced
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_balanced_method_is_matched_too(shape):
    layers, experts, replicas, groups, nodes, gpus = shape
    w0 = zipf(layers, experts, 6)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus, method="balanced")
    w1 = drift(w0, 0.3, 7)
    m = migrate(w1, current, replicas, groups, nodes, gpus, method="balanced")
    fresh, _, cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus, method="balanced")
    want = layer_balancedness(w1, fresh, cnt, gpus)
    assert (m.layer_balancedness >= want * (1 - 1e-6)).all()
    check_invariants(w1, m.phy2log, m.log2phy, m.logcnt, replicas, groups, nodes, gpus)
    with pytest.raises(ValueError, match="method must be one of"):
        migrate(w1, current, replicas, groups, nodes, gpus, method="best")


@native
@pytest.mark.parametrize("shape", HELPER_SHAPES)
@pytest.mark.parametrize("kind", ["real", "int", "zero", "sparse"])
def test_any_shape_and_loads_give_a_valid_plan_equal_to_the_reference(shape, kind):
    layers, experts, replicas, groups, nodes, gpus = shape
    w0, w1 = random_weight(layers, experts, kind, 1), random_weight(layers, experts, kind, 2)
    current, _, _ = eplb.rebalance_experts(w0, replicas, groups, nodes, gpus)
    m = migrate(w1, current, replicas, groups, nodes, gpus)
    check_invariants(w1.float(), m.phy2log, m.log2phy, m.logcnt, replicas, groups, nodes, gpus)
    fresh, _, cnt = eplb.rebalance_experts(w1, replicas, groups, nodes, gpus)
    want = layer_balancedness(w1, fresh, cnt, gpus)
    assert (m.layer_balancedness >= want * (1 - 1e-6)).all()
    assert torch.equal(current.gather(1, m.source_slot), m.phy2log)
    hierarchical = groups % nodes == 0 and nodes > 1
    regions = nodes if hierarchical else 1
    w = w1.float()
    args = (w, current, relabel_plan(current, fresh, gpus, regions),
            max_load_target(w, want.double() * (1 - 1e-6), gpus), replica_cap(w, fresh, cnt),
            groups if hierarchical else 1, regions, gpus, 64 + 16 * gpus)
    got, reached = torch.ops.deeppar.eplb_migrate(*args)
    want_placement, want_reached = migration_reference.migrate_layers(*args)
    assert torch.equal(got, want_placement) and torch.equal(reached, want_reached)
