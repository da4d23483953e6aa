"""EPLB backends agree bit for bit with the reference (ties included); ops pass opcheck;
torch.compile and CUDA graphs work with the sync-free ``max_replicas`` form."""

from __future__ import annotations

import random

import pytest
import torch
from _eplb_helpers import (
    SHAPES,
    WORKED_PHY2LOG,
    WORKED_SHAPE,
    WORKED_WEIGHT,
    check_invariants,
    random_shape,
    random_weight,
)
from _triton_helpers import compile_for_sm90
from conftest import HAS_CUDA, TRITON_INTERPRET
from hypothesis import given, settings
from hypothesis import strategies as st

import deeppar.eplb as eplb
from deeppar import _native

HAS_CPU_KERNEL = _native.has_kernel("eplb_rebalance", "cpu")
needs_cpu_kernel = pytest.mark.skipif(
    not HAS_CPU_KERNEL, reason="deeppar._C has no CPU EPLB kernel"
)
KINDS = ["real", "int", "zero", "sparse", "half"]


def _same(a, b) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def _plan(weight, shape, backend, **kw):
    _, _, replicas, groups, nodes, gpus = shape
    return eplb.rebalance_experts(weight, replicas, groups, nodes, gpus, backend=backend, **kw)


@needs_cpu_kernel
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_matches_reference(shape, kind):
    seed = SHAPES.index(shape) * 10 + KINDS.index(kind)
    weight = random_weight(shape[0], shape[1], kind, seed=seed)
    want = _plan(weight, shape, "reference")
    got = _plan(weight, shape, "cpu")
    assert _same(got, want)
    check_invariants(weight, *got, *shape[2:])


@needs_cpu_kernel
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS))
def test_cpu_matches_reference_random_shapes(seed, kind):
    shape = random_shape(random.Random(seed))
    weight = random_weight(shape[0], shape[1], kind, seed)
    assert _same(_plan(weight, shape, "cpu"), _plan(weight, shape, "reference"))


@needs_cpu_kernel
@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.sampled_from([0.0, 1.0, 0.5, 3.0, 1e-30, 2.0**-126, 3.4e38, 1e7, 1e7 + 1]),
                 min_size=8, max_size=8),
        min_size=1, max_size=3,
    )
)
def test_cpu_matches_reference_extreme_values(rows):
    # Huge loads overflow float32 sums to inf; tiny ones are subnormal after division.
    weight = torch.tensor(rows, dtype=torch.float32)
    for shape in [(0, 8, 16, 4, 2, 4), (0, 8, 12, 2, 1, 3), (0, 8, 24, 4, 3, 6)]:
        assert _same(_plan(weight, shape, "cpu"), _plan(weight, shape, "reference"))


@needs_cpu_kernel
def test_negative_zero_is_zero():
    weight = torch.tensor([[-0.0, 0.0, 0.0, -0.0, 1.0, 1.0]])
    shape = (1, 6, 9, 3, 1, 3)
    assert _same(_plan(weight, shape, "cpu"), _plan(weight.abs(), shape, "reference"))


@needs_cpu_kernel
def test_native_ops_reject_bad_values():
    with pytest.raises(ValueError, match="finite non-negative loads; found a NaN"):
        torch.ops.deeppar.eplb_rebalance(torch.full((1, 4), float("nan")), 4, 1, 1, 1)
    with pytest.raises(ValueError, match="found a negative value"):
        torch.ops.deeppar.eplb_rebalance(-torch.ones(1, 4), 4, 1, 1, 1)
    with pytest.raises(ValueError, match="found an infinite value"):
        torch.ops.deeppar.eplb_rebalance(torch.full((1, 4), float("-inf")), 4, 1, 1, 1)
    with pytest.raises(ValueError, match=r"num_replicas \(6\) must be a multiple of num_gpus"):
        torch.ops.deeppar.eplb_rebalance(torch.ones(1, 4), 6, 1, 1, 4)


@needs_cpu_kernel
def test_opcheck():
    weight = random_weight(3, 16, "real", 0)
    torch.library.opcheck(torch.ops.deeppar.eplb_rebalance.default, (weight, 24, 4, 2, 8))
    torch.library.opcheck(torch.ops.deeppar.eplb_pack.default, (weight, 4))
    torch.library.opcheck(torch.ops.deeppar.eplb_replicate.default, (weight, 20))
    phy2log, rank, _ = torch.ops.deeppar.eplb_rebalance(weight, 24, 4, 2, 8)
    torch.library.opcheck(torch.ops.deeppar.eplb_log2phy.default, (phy2log, rank, 16, 9))


@needs_cpu_kernel
def test_torch_compile_fullgraph_with_max_replicas():
    weight = random_weight(4, 16, "real", 1)

    def fn(w):
        return eplb.rebalance_experts(w, 24, 4, 2, 8, max_replicas=9)

    compiled = torch.compile(fn, fullgraph=True)
    assert _same(compiled(weight), fn(weight))
    with pytest.raises((RuntimeError, ValueError), match="finite non-negative"):
        compiled(torch.full((4, 16), float("nan")))
    narrow = torch.compile(
        lambda w: eplb.rebalance_experts(w, 24, 4, 2, 8, max_replicas=1), fullgraph=True
    )
    with pytest.raises((RuntimeError, ValueError), match="max_replicas"):
        narrow(weight)


# ---------------------------------------------------------------------------- GPU backends
def _gpu_backends() -> list[str]:
    return [b for b in ("cuda", "triton") if b in eplb.available("cuda")] if HAS_CUDA else []


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES + [(5, 256, 288, 8, 4, 32), (3, 256, 320, 8, 40, 320),
                                             (4, 128, 144, 1, 2, 16), (2, 512, 1024, 64, 16, 128),
                                             # > 32 GPUs per node: the strided pack loops
                                             (3, 64, 128, 4, 1, 64), (2, 128, 384, 4, 2, 96),
                                             (2, 256, 288, 8, 9, 72)])
def test_gpu_backends_match_cpu(shape, kind):
    backends = _gpu_backends()
    if not backends:
        pytest.skip("no GPU EPLB backend available")
    weight = random_weight(shape[0], shape[1], kind, seed=7)
    want = _plan(weight, shape, "cpu" if HAS_CPU_KERNEL else "reference")
    for backend in backends:
        got = _plan(weight.cuda(), shape, backend)
        assert all(t.is_cuda for t in got)
        assert _same(got, want), backend


@pytest.mark.gpu
@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(KINDS))
def test_gpu_backends_match_random_shapes(seed, kind):
    backends = _gpu_backends()
    if not backends:
        pytest.skip("no GPU EPLB backend available")
    shape = random_shape(random.Random(seed))
    weight = random_weight(shape[0], shape[1], kind, seed)
    want = _plan(weight, shape, "reference")
    for backend in backends:
        assert _same(_plan(weight.cuda(), shape, backend), want), backend


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_capture_with_max_replicas(backend):
    if backend not in _gpu_backends():
        pytest.skip(f"{backend} backend not available")
    weight = random_weight(58, 256, "real", 3).cuda()
    static = weight.clone()
    kw = {"backend": backend, "max_replicas": 34}
    eplb.rebalance_experts(static, 288, 8, 4, 32, **kw)  # warm up (compiles, loads)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = eplb.rebalance_experts(static, 288, 8, 4, 32, **kw)
    for seed in (4, 5):
        new = random_weight(58, 256, "real", seed)
        static.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert _same(out, eplb.rebalance_experts(new, 288, 8, 4, 32, max_replicas=34))


@pytest.mark.gpu
def test_cuda_op_asserts_on_bad_loads():
    if "cuda" not in _gpu_backends():
        pytest.skip("cuda backend not available")
    # The drop-in form raises ValueError (the kernel never sees the bad load) ...
    with pytest.raises(ValueError, match="NaN"):
        eplb.rebalance_experts(torch.full((2, 16), float("nan")).cuda(), 24, 4, 2, 8,
                               backend="cuda")
    # ... while the op itself asserts on the device, like the CPU op's check. A device-side
    # assert ends the CUDA context, so that part runs in a fresh process.
    import subprocess
    import sys

    code = ("import torch, deeppar.eplb\n"
            "w = torch.ones(2, 16, device='cuda'); w[1, 3] = -1.0\n"
            "torch.ops.deeppar.eplb_rebalance(w, 24, 4, 2, 8); torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "finite non-negative" in result.stdout + result.stderr


@pytest.mark.gpu
def test_cuda_opcheck_and_compile():
    if "cuda" not in _gpu_backends():
        pytest.skip("cuda backend not available")
    weight = random_weight(3, 16, "real", 0).cuda()
    torch.library.opcheck(torch.ops.deeppar.eplb_rebalance.default, (weight, 24, 4, 2, 8))
    fn = lambda w: eplb.rebalance_experts(w, 24, 4, 2, 8, max_replicas=9)
    assert _same(torch.compile(fn, fullgraph=True)(weight), fn(weight.cpu()))


# --------------------------------------------------------------------------- Triton backend
# Run on the GPU when there is one, else on the CPU through Triton's interpreter (set
# DEEPPAR_TRITON_INTERPRET=1; slow, so these shapes are small but cover every branch).
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    not (HAS_CUDA or TRITON_INTERPRET),
    reason="Triton needs a GPU or DEEPPAR_TRITON_INTERPRET=1 (interpreter on CPU)",
)
TRITON_SHAPES = [
    (1, 4, 4, 1, 1, 1),  # nothing to replicate or pack
    (2, 12, 16, 4, 2, 8),  # hierarchical
    (2, 16, 24, 8, 3, 6),  # 8 % 3 != 0: global policy
    (1, 9, 27, 3, 1, 9),  # one node, one replica per GPU
    (1, 10, 10, 5, 5, 5),  # no redundancy, one group per node
]


def _triton_plan(weight, shape, **kw):
    if "triton" not in eplb.available(TRITON_DEVICE):
        pytest.skip(f"triton backend not available on {TRITON_DEVICE}")
    got = _plan(weight.to(TRITON_DEVICE), shape, "triton", **kw)
    assert all(t.device.type == TRITON_DEVICE for t in got)
    return got


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("kind", ["real", "int", "zero"])
@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(shape, kind):
    weight = random_weight(shape[0], shape[1], kind, seed=11)
    got = _triton_plan(weight, shape)
    assert _same(got, _plan(weight, shape, "reference"))
    check_invariants(weight, *(t.cpu() for t in got), *shape[2:])


@pytest.mark.triton
@needs_triton
def test_triton_worked_example():
    phy2log, log2phy, logcnt = _triton_plan(WORKED_WEIGHT, WORKED_SHAPE)
    assert torch.equal(phy2log.cpu(), WORKED_PHY2LOG)
    assert _same((phy2log, log2phy, logcnt), _plan(WORKED_WEIGHT, WORKED_SHAPE, "reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("seed", range(20))
def test_triton_matches_reference_random_shapes(seed):
    shape = random_shape(random.Random(1000 + seed))
    shape = (min(shape[0], 2), *shape[1:])  # fewer layers: the interpreter is slow
    weight = random_weight(shape[0], shape[1], KINDS[seed % len(KINDS)], seed)
    assert _same(_triton_plan(weight, shape), _plan(weight, shape, "reference"))


@pytest.mark.triton
@needs_triton
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter sums
def test_triton_extreme_values():
    # -0.0, subnormals after division, float32 sums overflowing to inf, near-equal large loads.
    weight = torch.tensor([
        [-0.0, 0.0, 1e-30, 2.0**-126, 3.4e38, 3.4e38, 1e7, 1e7 + 1],
        [3.0, 3.0, 3.0, 3.0, 0.5, 0.5, -0.0, 1.0],
    ])
    for shape in [(0, 8, 16, 4, 2, 4), (0, 8, 24, 4, 3, 6)]:
        assert _same(_triton_plan(weight, shape), _plan(weight.abs(), shape, "reference"))


@pytest.mark.triton
@needs_triton
def test_triton_max_replicas():
    weight = random_weight(2, 12, "int", 5)
    shape = (2, 12, 24, 4, 2, 4)
    phy2log, log2phy, logcnt = _plan(weight, shape, "reference")
    width = int(logcnt.max())
    got = _triton_plan(weight, shape, max_replicas=width + 2)
    assert torch.equal(got[0].cpu(), phy2log) and torch.equal(got[2].cpu(), logcnt)
    assert got[1].shape == (2, 12, width + 2)
    assert torch.equal(got[1][..., :width].cpu(), log2phy) and (got[1][..., width:] == -1).all()
    if TRITON_DEVICE == "cpu":
        with pytest.raises(ValueError, match="max_replicas"):
            _triton_plan(weight, shape, max_replicas=width - 1)


def test_triton_unavailable_on_cpu_without_interpreter():
    if TRITON_INTERPRET:
        pytest.skip("the interpreter is on: triton runs on CPU")
    assert "triton" not in eplb.available("cpu")
    with pytest.raises(eplb.BackendUnavailable, match="TRITON_INTERPRET"):
        eplb.rebalance_experts(WORKED_WEIGHT, 16, 4, 2, 8, backend="triton")


@pytest.mark.parametrize(
    "sizes",
    [
        # (BLOCK_G, BLOCK_N, BLOCK_E, BLOCK_S, BLOCK_P), num_warps, int args equal to 1
        ((8, 4, 64, 128, 8), 1, ()),  # DeepSeek-V3 prefill
        ((1, 1, 256, 512, 512), 2, ("groups", "nodes")),  # global policy, specialised to 1
        ((64, 16, 32, 64, 8), 4, ("gpus",)),
    ],
)
def test_triton_kernel_compiles_for_gpu(sizes):
    """The kernel compiles to a cubin for sm_90 (no GPU needed): catches what the interpreter
    accepts but the compiler does not (constexpr loop counters, block shapes, gather)."""
    if TRITON_INTERPRET:
        pytest.skip("the interpreter replaces the compiler")
    if not _native.triton_status()[0]:
        pytest.skip("triton cannot be imported")
    from deeppar.kernels.eplb_triton import _eplb_rebalance_kernel as kernel

    blocks, num_warps, ones = sizes
    constants = dict(zip(("BLOCK_G", "BLOCK_N", "BLOCK_E", "BLOCK_S", "BLOCK_P"), blocks))
    constants.update({name: 1 for name in ones})
    compiled = compile_for_sm90(
        kernel, {"weight_ptr": "*fp32", "phy2log_ptr": "*i64", "phy_rank_ptr": "*i64",
                 "logcnt_ptr": "*i64"}, constants, num_warps=num_warps)
    ptx = compiled.asm["ptx"]
    assert "div.rn.f32" in ptx and "ftz" not in ptx  # IEEE division, subnormals kept
    assert compiled.asm["cubin"]


@pytest.mark.triton
@needs_triton
def test_triton_opcheck_and_compile():
    if "triton" not in eplb.available(TRITON_DEVICE):
        pytest.skip(f"triton backend not available on {TRITON_DEVICE}")
    from deeppar.kernels.eplb_triton import eplb_rebalance_triton

    weight = random_weight(2, 12, "real", 4).to(TRITON_DEVICE)
    torch.library.opcheck(eplb_rebalance_triton, (weight, 16, 4, 2, 8))

    def fn(w):
        return eplb.rebalance_experts(w, 16, 4, 2, 8, backend="triton", max_replicas=6)

    compiled = torch.compile(fn, fullgraph=True)
    assert _same(compiled(weight), fn(weight))
