"""EPLB planner: the spec's worked example, invariants, policies, max_replicas, errors, plan."""

from __future__ import annotations

import pytest
import torch
from _eplb_helpers import SHAPES, check_invariants, random_weight

import deeppar.eplb as eplb
from deeppar import _native, ops
from deeppar.eplb import reference

WORKED_WEIGHT = torch.tensor([
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
])
WORKED_PHY2LOG = torch.tensor([
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
])
BACKENDS = eplb.available("cpu")


def _independent_plan(weight: torch.Tensor, replicas, groups, nodes, gpus) -> torch.Tensor:
    """phy2log by an independent formulation (inverse permutations, as the published planner
    is written); its ties are unspecified, so compare only on loads without ties."""
    if groups % nodes:
        groups, nodes = 1, 1
    layers, experts = weight.shape
    w = weight.double()
    gsize, epn, spn, gpn = experts // groups, experts // nodes, replicas // nodes, gpus // nodes

    def pack(items: list[float], m: int) -> list[tuple[int, int]]:
        per = len(items) // m
        if per == 1:
            return [(i, 0) for i in range(len(items))]
        load, fill, out = [0.0] * m, [0] * m, [None] * len(items)
        for i in sorted(range(len(items)), key=lambda i: -items[i]):
            p = min((p for p in range(m) if fill[p] < per), key=lambda p: load[p])
            out[i] = (p, fill[p])
            load[p] += items[i]
            fill[p] += 1
        return out

    result = torch.empty(layers, replicas, dtype=torch.int64)
    for layer in range(layers):
        row = w[layer].tolist()
        gload = [sum(row[g * gsize:(g + 1) * gsize]) for g in range(groups)]
        log2mlog = [0] * experts
        for g, (node, rank) in enumerate(pack(gload, nodes)):
            for k in range(gsize):
                log2mlog[g * gsize + k] = (node * (groups // nodes) + rank) * gsize + k
        mlog2log = [0] * experts
        for log, mlog in enumerate(log2mlog):
            mlog2log[mlog] = log
        for node in range(nodes):
            mw = [row[mlog2log[node * epn + i]] for i in range(epn)]
            cnt, phy = [1] * epn, list(range(epn))
            for _ in range(spn - epn):
                best = max(range(epn), key=lambda e: mw[e] / cnt[e])
                phy.append(best)
                cnt[best] += 1
            placed = pack([mw[e] / cnt[e] for e in phy], gpn)
            for j, (gpu, rank) in enumerate(placed):
                slot = node * spn + gpu * (replicas // gpus) + rank
                result[layer, slot] = mlog2log[node * epn + phy[j]]
    return result


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_example(backend):
    phy2log, log2phy, logcnt = eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, backend=backend)
    assert torch.equal(phy2log, WORKED_PHY2LOG)
    check_invariants(WORKED_WEIGHT, phy2log, log2phy, logcnt, 16, 4, 2, 8)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_independent_formulation(shape, seed):
    layers, experts, replicas, groups, nodes, gpus = shape
    # Distinct loads whose ratios do not tie: the published rules then decide everything.
    g = torch.Generator().manual_seed(seed)
    weight = torch.randperm(experts * layers, generator=g).view(layers, experts).float() * 7 + 1
    weight += torch.rand(layers, experts, generator=g) * 0.5
    phy2log, log2phy, logcnt = eplb.rebalance_experts(
        weight, replicas, groups, nodes, gpus, backend="reference"
    )
    check_invariants(weight, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus)
    assert torch.equal(phy2log, _independent_plan(weight, replicas, groups, nodes, gpus))


@pytest.mark.parametrize("kind", ["int", "zero", "sparse", "half"])
@pytest.mark.parametrize("shape", SHAPES[:8])
def test_invariants_with_ties(shape, kind):
    layers, experts, replicas, groups, nodes, gpus = shape
    weight = random_weight(layers, experts, kind, seed=3)
    out = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
    check_invariants(weight, *out, replicas, groups, nodes, gpus)


def test_all_zero_loads_spread_round_robin():
    # Spec: ties go to fewer replicas, then the lowest index, so extra slots go 0, 1, 2, ...
    phy2log, _, count = reference.replicate_experts(torch.zeros(1, 5), 12)
    assert phy2log[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert count[0].tolist() == [3, 3, 2, 2, 2]


def test_packing_ties_lowest_index():
    pack, rank = reference.balanced_packing(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 2)
    # Items visited 0, 1, 2, 3; packs chosen 0, 1 (lighter), then 0, 1.
    assert pack[0].tolist() == [0, 1, 0, 1] and rank[0].tolist() == [0, 0, 1, 1]


def test_policy_selection():
    weight = random_weight(2, 16, "real", 0)
    hier = eplb.plan(weight, 24, 4, 2, 8)
    glob = eplb.plan(weight, 24, 4, 3, 6)
    assert hier.policy == "hierarchical" and glob.policy == "global"
    # The global policy is the hierarchical one with one group and one node.
    direct = eplb.rebalance_experts_hierarchical(weight, 24, 1, 1, 6)
    assert torch.equal(glob.phy2log, direct[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_replicas_form(backend):
    weight = random_weight(3, 16, "real", 5)
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, 32, 4, 2, 8, backend=backend)
    width = int(logcnt.max())
    assert log2phy.shape == (3, 16, width)
    fixed = eplb.rebalance_experts(weight, 32, 4, 2, 8, backend=backend, max_replicas=width + 3)
    assert torch.equal(fixed[0], phy2log) and torch.equal(fixed[2], logcnt)
    assert fixed[1].shape == (3, 16, width + 3)
    assert torch.equal(fixed[1][..., :width], log2phy) and (fixed[1][..., width:] == -1).all()
    with pytest.raises(ValueError, match="max_replicas"):
        eplb.rebalance_experts(weight, 32, 4, 2, 8, backend=backend, max_replicas=width - 1)


def test_dtypes_converted_to_float32():
    base = random_weight(2, 12, "int", 1)
    expected = eplb.rebalance_experts(base.float(), 16, 4, 2, 8)
    for dtype in (torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float64):
        got = eplb.rebalance_experts(base.to(dtype), 16, 4, 2, 8)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((torch.ones(12), 16, 4, 2, 8), ValueError, "2-D"),
        ((torch.ones(1, 2, 12), 16, 4, 2, 8), ValueError, "2-D"),
        (([[1.0] * 12], 16, 4, 2, 8), TypeError, "torch.Tensor"),
        ((torch.ones(2, 12, dtype=torch.complex64), 16, 4, 2, 8), TypeError, "dtype"),
        ((torch.ones(2, 12, dtype=torch.bool), 16, 4, 2, 8), TypeError, "dtype"),
        ((torch.ones(0, 12), 16, 4, 2, 8), ValueError, "at least one layer"),
        ((-torch.ones(2, 12), 16, 4, 2, 8), ValueError, "negative"),
        ((torch.full((2, 12), float("nan")), 16, 4, 2, 8), ValueError, "NaN"),
        ((torch.full((2, 12), float("inf")), 16, 4, 2, 8), ValueError, "infinite"),
        ((torch.full((2, 12), 1e300, dtype=torch.float64), 16, 4, 2, 8), ValueError, "infinite"),
        ((torch.ones(2, 12), 8, 4, 2, 8), ValueError, "at least the number of experts"),
        ((torch.ones(2, 12), 20, 4, 2, 8), ValueError, "multiple of num_gpus"),
        ((torch.ones(2, 12), 16, 5, 1, 8), ValueError, "multiple of num_groups"),
        ((torch.ones(2, 12), 18, 4, 4, 6), ValueError, "multiple of num_nodes"),
        ((torch.ones(2, 12), 16, 5, 5, 8), ValueError, "multiple of num_groups"),
        ((torch.ones(2, 12), 16, 0, 2, 8), ValueError, "num_groups must be >= 1"),
        ((torch.ones(2, 12), -16, 4, 2, 8), ValueError, "num_replicas must be >= 1"),
        ((torch.ones(2, 12), 16.0, 4, 2, 8), TypeError, "num_replicas must be an integer"),
        ((torch.ones(2, 12), 16, "4", 2, 8), TypeError, "num_groups must be an integer"),
        ((torch.ones(2, 12), 16, 4, True, 8), TypeError, "num_nodes must be an integer"),
        # the planner's size limits (PlannerLimits), checked before any data is read
        ((torch.ones(1, 1).expand(1, 1 << 24), 1 << 24, 1, 1, 1), ValueError, "too many experts"),
        ((torch.ones(2, 12), 1 << 24, 4, 2, 8), ValueError, "must be below 16777216"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        eplb.rebalance_experts(*args)


def test_row_functions_share_the_planner_limits():
    with pytest.raises(ValueError, match="num_phy .* must be below 16777216"):
        eplb.replicate_experts(torch.ones(2, 4), 1 << 24)
    with pytest.raises(ValueError, match="too many experts"):
        eplb.balanced_packing(torch.ones(1, 1).expand(1, 1 << 24), 1)


@pytest.mark.skipif(not _native.has_kernel("eplb_rebalance", "cpu"), reason="no C++ planner")
def test_native_is_the_kernel_of_the_device():
    got = eplb.plan(WORKED_WEIGHT, 16, 4, 2, 8, backend="native")
    assert got.backend == "cpu"
    want = eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, backend="cpu")
    assert torch.equal(got.phy2log, want[0]) and torch.equal(got.logcnt, want[2])
    assert eplb.plan(WORKED_WEIGHT, 16, 4, 2, 8, backend="native", method="balanced").backend == (
        "cpu")
    assert eplb.BACKENDS == ops.BACKENDS and eplb.BackendUnavailable is ops.BackendUnavailable


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be"):
        eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, backend="fast")
    with pytest.raises(eplb.BackendUnavailable, match="CUDA"):
        eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, backend="cuda")
    with pytest.raises(ValueError, match="max_replicas must be >= 1"):
        eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, max_replicas=0)


def test_plan_metrics():
    weight = random_weight(4, 32, "real", 2)
    p = eplb.plan(weight, 40, 8, 4, 8)
    assert p.gpu_load.shape == (4, 8) and p.layer_balancedness.shape == (4,)
    # Every load lands on some GPU, before and after.
    assert torch.allclose(p.gpu_load.sum(1), weight.double().sum(1), rtol=1e-5)
    assert torch.allclose(p.gpu_load_before.sum(1), weight.double().sum(1), rtol=1e-5)
    assert 0 < p.balancedness_before <= p.balancedness <= p.balancedness_bound + 1e-6
    assert p.balancedness_bound <= 1.0 + 1e-6
    assert "hierarchical" in p.summary()
    d = p.to_dict()
    assert d["phy2log"] == p.phy2log.tolist() and d["policy"] == "hierarchical"


def test_plan_all_zero():
    p = eplb.plan(torch.zeros(2, 8), 8, 2, 1, 4)
    assert p.balancedness == p.balancedness_before == p.balancedness_bound == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_functions(backend):
    w = random_weight(3, 12, "int", 4)
    pack, rank = eplb.balanced_packing(w, 3)
    ref_pack, ref_rank = reference.balanced_packing(w, 3)
    assert torch.equal(pack, ref_pack) and torch.equal(rank, ref_rank)
    got = eplb.replicate_experts(w, 20)
    want = reference.replicate_experts(w, 20)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match="multiple of num_packs"):
        eplb.balanced_packing(w, 5)
    with pytest.raises(ValueError, match="hierarchical"):
        eplb.rebalance_experts_hierarchical(w, 12, 3, 2, 6)


def test_log2phy_torch_path_matches_native(monkeypatch):
    from deeppar.eplb import api

    weight = random_weight(3, 16, "int", 6)
    phy2log, rank, _ = reference.rebalance_hierarchical(weight, 40, 4, 2, 8)
    width = int(rank.max()) + 2
    native = api.build_log2phy(phy2log, rank, 16, width)
    with pytest.raises(ValueError, match="more replicas than max_replicas"):
        api.build_log2phy(phy2log, rank, 16, width - 3)
    monkeypatch.setattr(api._native, "has_kernel", lambda op, device: False)
    assert torch.equal(api.build_log2phy(phy2log, rank, 16, width), native)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sizes", [(8, 3, 2, 4), (8, 1, 3, 4), (10, 3, 2, 5), (8, 5, 7, 8)])
def test_global_policy_ignores_groups_and_nodes(backend, sizes):
    # DeepSeek's planner accepts these (global policy, G % N != 0): one group, one node.
    weight = torch.tensor([[10, 20, 30, 40], [7, 0, 3, 3]])
    replicas, groups, nodes, gpus = sizes
    got = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, backend=backend)
    want = eplb.rebalance_experts(weight, replicas, 1, 1, gpus, backend="reference")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    check_invariants(weight, *got, replicas, groups, nodes, gpus)
    assert eplb.plan(weight, replicas, groups, nodes, gpus, backend=backend).policy == "global"


def test_default_backend_skips_kernels_that_cannot_take_the_shape(monkeypatch):
    from deeppar.eplb import _backends
    from deeppar.eplb._validate import Problem

    small = Problem(2, 256, 288, 8, 4, 32)
    huge = Problem(2, 1 << 14, 1 << 15, 8, 4, 32)
    cuda = torch.device("cuda")
    assert _backends.shape_reason("cuda", small, cuda, smem_limit=227 * 1024) is None
    why = _backends.shape_reason("cuda", huge, cuda, smem_limit=227 * 1024)
    assert why is not None and "shared memory" in why
    # A CUDA tensor with every backend installed: the huge shape falls through to the next one.
    monkeypatch.setattr(ops, "unavailable_reason", lambda op, backend, device: None)
    monkeypatch.setattr(_backends, "_cuda_smem_limit", lambda device: 227 * 1024)
    triton_ok = _native.triton_status()[0]
    assert _backends.resolve(None, cuda, small) == "cuda"
    assert _backends.resolve(None, cuda, huge) == ("triton" if triton_ok else "cpu")
    with pytest.raises(eplb.BackendUnavailable, match="shared memory"):
        _backends.resolve("cuda", cuda, huge)
