"""method="balanced": valid plans, never a larger max GPU load than "deepseek" on any layer,
no duplicate replicas on a GPU where avoidable, deterministic, batched."""

from __future__ import annotations

import random

import pytest
import torch
from _eplb_helpers import SHAPES, check_invariants, random_shape, random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

import deeppar.eplb as eplb
from deeppar import _native, ops
from deeppar.eplb.planning import duplicate_gpus

pytestmark = pytest.mark.skipif(
    not _native.has_kernel("eplb_rebalance_balanced", "cpu"),
    reason="deeppar._C has no eplb_rebalance_balanced kernel",
)
KINDS = ["real", "int", "zero", "sparse", "half"]


def _max_loads(weight, phy2log, logcnt, gpus) -> torch.Tensor:
    """[L] float64 max GPU load: float32 replica loads (as planned) summed in float64."""
    slot = ops.slot_loads(weight.float().contiguous(), phy2log, logcnt).double()
    return slot.view(slot.shape[0], gpus, -1).sum(-1).max(dim=1).values


def _zipf(layers: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    share = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
    order = torch.argsort(torch.rand(layers, experts, generator=g), dim=1)
    return (share[order] / share.sum() * (1 << 20)).round().float()


def _check_balanced(weight, shape):
    _, _, replicas, groups, nodes, gpus = shape
    spec = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
    got = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, method="balanced")
    check_invariants(weight, *got, replicas, groups, nodes, gpus)
    spec_max = _max_loads(weight, spec[0], spec[2], gpus)
    got_max = _max_loads(weight, got[0], got[2], gpus)
    # Never larger on any layer (float64 sums in another order: a 1e-12 relative margin).
    assert (got_max <= spec_max * (1 + 1e-12)).all(), (got_max - spec_max).max()
    return spec, got


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_valid_and_never_worse(shape, kind):
    weight = random_weight(shape[0], shape[1], kind, seed=SHAPES.index(shape))
    _check_balanced(weight, shape)


def _drawn_weight(shape, kind: str, seed: int) -> torch.Tensor:
    """Loads of ``kind`` (one of KINDS, or "zipf") for a hypothesis-drawn shape."""
    if kind == "zipf":
        return _zipf(shape[0], shape[1], seed)
    return random_weight(shape[0], shape[1], kind, seed)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS + ["zipf"]))
def test_never_worse_random_shapes(seed, kind):
    shape = random_shape(random.Random(seed))
    weight = _drawn_weight(shape, kind, seed)
    _check_balanced(weight, shape)


@pytest.mark.parametrize(
    "shape", [(6, 256, 288, 8, 4, 32), (6, 256, 288, 8, 9, 72), (4, 128, 144, 1, 2, 16),
              (3, 512, 1024, 64, 16, 128)]
)
@pytest.mark.parametrize("loads", ["zipf", "lognormal"])
def test_better_plans_fewer_duplicates_at_model_shapes(shape, loads):
    layers, experts, replicas, groups, nodes, gpus = shape
    if loads == "zipf":
        weight = _zipf(layers, experts, seed=1)
    else:
        g = torch.Generator().manual_seed(1)
        weight = (torch.exp(torch.randn(layers, experts, generator=g)) * 1000).round()
    spec, got = _check_balanced(weight, shape)
    spec_b = eplb.plan(weight, replicas, groups, nodes, gpus)
    got_b = eplb.plan(weight, replicas, groups, nodes, gpus, method="balanced")
    assert got_b.balancedness >= spec_b.balancedness
    assert got_b.bound_gap <= spec_b.bound_gap + 1e-7 and got_b.bound_gap >= -1e-6
    assert got_b.method == "balanced" and got_b.to_dict()["method"] == "balanced"
    assert got_b.duplicate_gpus <= spec_b.duplicate_gpus
    if gpus == 72:  # global policy, 72 GPUs of 4 slots: room to place every replica apart
        assert int(duplicate_gpus(got[0], gpus).sum()) == 0


def test_deterministic_and_batched():
    shape = (6, 64, 96, 8, 2, 16)
    weight = random_weight(6, 64, "real", 5)
    first = eplb.rebalance_experts(weight, *shape[2:], method="balanced")
    again = eplb.rebalance_experts(weight.clone(), *shape[2:], method="balanced")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    for layer in range(6):
        alone = eplb.rebalance_experts(weight[layer:layer + 1], *shape[2:], method="balanced")
        assert torch.equal(alone[0][0], first[0][layer])
        assert torch.equal(alone[2][0], first[2][layer])


def test_same_replica_counts_as_deepseek():
    # Replication follows the spec's greedy (it minimises the largest per-replica load).
    weight = random_weight(5, 32, "real", 2)
    spec = eplb.rebalance_experts(weight, 48, 4, 2, 8)
    got = eplb.rebalance_experts(weight, 48, 4, 2, 8, method="balanced")
    assert torch.equal(spec[2], got[2])


def test_duplicates_only_when_unavoidable():
    # One hot expert with 6 replicas on a node of 4 GPUs: some GPU must hold two of them.
    weight = torch.tensor([[1000.0, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    _, got = _check_balanced(weight, (1, 10, 16, 1, 1, 4))
    assert int(got[2][0, 0]) > 4
    assert int(duplicate_gpus(got[0], 4).sum()) <= 4


def test_opcheck_and_errors():
    weight = random_weight(3, 16, "real", 0)
    torch.library.opcheck(torch.ops.deeppar.eplb_rebalance_balanced.default, (weight, 24, 4, 2, 8))
    with pytest.raises(ValueError, match="method must be one of"):
        eplb.rebalance_experts(weight, 24, 4, 2, 8, method="best")
    with pytest.raises(eplb.BackendUnavailable, match="balanced"):
        eplb.rebalance_experts(weight, 24, 4, 2, 8, method="balanced", backend="reference")
    with pytest.raises(ValueError, match="NaN"):
        eplb.rebalance_experts(torch.full((2, 16), float("nan")), 24, 4, 2, 8, method="balanced")
    fixed = eplb.rebalance_experts(weight, 24, 4, 2, 8, method="balanced", max_replicas=8)
    assert fixed[1].shape == (3, 16, 8)


def test_backend_choice():
    from deeppar.eplb import _backends

    assert _backends.resolve_balanced(None, "cpu") == "cpu"
    assert _backends.resolve_balanced("native", "cpu") == "cpu"
    for backend in ("reference", "triton"):
        with pytest.raises(eplb.BackendUnavailable, match="does not implement method='balanced'"):
            _backends.resolve_balanced(backend, "cpu")
    with pytest.raises(eplb.BackendUnavailable, match="CUDA tensors"):
        _backends.resolve_balanced("cuda", "cpu")
    with pytest.raises(ValueError, match="backend must be"):
        _backends.resolve_balanced("fast", "cpu")
    with pytest.raises(TypeError, match="backend must be a string"):
        _backends.resolve_balanced(3, "cpu")
    if not _native.has_kernel("eplb_rebalance_balanced", "cuda"):
        # A CUDA tensor goes to a host copy on the CPU kernel where no CUDA kernel is compiled.
        assert _backends.resolve_balanced(None, "cuda") == "cpu"


# ------------------------------------------------------------------------------- CUDA kernel
# The CUDA op runs the per-layer code of the CPU op (csrc/cuda/eplb_balanced_kernel.cuh), one
# thread per layer: its plans must be the CPU op's, bit for bit.
HAS_CUDA_KERNEL = torch.cuda.is_available() and _native.has_kernel(
    "eplb_rebalance_balanced", "cuda"
)
needs_cuda_kernel = pytest.mark.skipif(
    not HAS_CUDA_KERNEL, reason="needs a GPU and the CUDA eplb_rebalance_balanced kernel"
)
MODEL_SHAPES = [(58, 256, 288, 8, 4, 32), (58, 256, 288, 8, 9, 72), (5, 256, 320, 8, 40, 320),
                (94, 128, 144, 1, 2, 16), (8, 512, 1024, 64, 16, 128), (3, 64, 128, 4, 1, 64),
                (2, 128, 384, 4, 2, 96)]


def _same_op(weight: torch.Tensor, shape) -> None:
    replicas, groups, nodes, gpus = shape[2:]
    # The ops plan the hierarchical policy; the global one is it with one group and one node.
    sizes = (replicas, groups, nodes, gpus) if groups % nodes == 0 else (replicas, 1, 1, gpus)
    want = torch.ops.deeppar.eplb_rebalance_balanced(weight.float(), *sizes)
    got = torch.ops.deeppar.eplb_rebalance_balanced(weight.float().cuda(), *sizes)
    assert all(t.is_cuda for t in got)
    for name, a, b in zip(("phy2log", "phy_rank", "logcnt"), got, want):
        assert torch.equal(a.cpu(), b), name


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("kind", KINDS + ["zipf"])
@pytest.mark.parametrize("shape", SHAPES + MODEL_SHAPES)
def test_cuda_matches_cpu(shape, kind):
    if kind == "zipf":
        weight = _zipf(shape[0], shape[1], seed=3)
    else:
        weight = random_weight(shape[0], shape[1], kind, seed=11)
    _same_op(weight, shape)


@pytest.mark.gpu
@needs_cuda_kernel
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS + ["zipf"]))
def test_cuda_matches_cpu_random_shapes(seed, kind):
    shape = random_shape(random.Random(seed))
    weight = _drawn_weight(shape, kind, seed)
    _same_op(weight, shape)


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_routing_graphs_and_bad_loads():
    from deeppar.eplb.api import plan_maps

    weight = _zipf(58, 256, seed=5)
    *got, _, name = plan_maps(weight.cuda(), 288, 8, 4, 32, method="balanced")
    assert name == "cuda" and all(t.is_cuda for t in got)
    want = eplb.rebalance_experts(weight, 288, 8, 4, 32, method="balanced")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    # A host copy on the CPU kernel when asked for by name gives the same plan.
    host = eplb.rebalance_experts(weight.cuda(), 288, 8, 4, 32, method="balanced", backend="cpu")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(host, want))
    # Sync-free form inside a CUDA graph.
    static = weight.cuda()
    kw = {"method": "balanced", "max_replicas": 34}
    eplb.rebalance_experts(static, 288, 8, 4, 32, **kw)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = eplb.rebalance_experts(static, 288, 8, 4, 32, **kw)
    new = _zipf(58, 256, seed=6)
    static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    want = eplb.rebalance_experts(new, 288, 8, 4, 32, **kw)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(out, want))
    torch.library.opcheck(torch.ops.deeppar.eplb_rebalance_balanced.default,
                          (weight[:3].cuda(), 288, 8, 4, 32))
    with pytest.raises(ValueError, match="NaN"):
        eplb.rebalance_experts(torch.full((2, 16), float("nan")).cuda(), 24, 4, 2, 8,
                               method="balanced")
    # The op itself asserts on the device (ends the CUDA context: a fresh process).
    import subprocess
    import sys

    code = ("import torch, deeppar.eplb\n"
            "w = torch.ones(2, 16, device='cuda'); w[1, 3] = -1.0\n"
            "torch.ops.deeppar.eplb_rebalance_balanced(w, 24, 4, 2, 8); "
            "torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "finite non-negative" in result.stdout + result.stderr
