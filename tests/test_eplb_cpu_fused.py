"""The eager CPU path of ``rebalance_experts``: the single op ``eplb_rebalance_maps`` (planner,
load checks and log2phy) agrees bit for bit with the separate ops and with the reference, with
one or two threads, at the spec's sizes, node sizes on both sides of the sort's size switch,
ties and zero loads; its errors match the other paths'."""

from __future__ import annotations

import pytest
import torch
from _eplb_helpers import check_invariants
from _eplb_helpers import random_weight as _random_weight

import deeppar
import deeppar.eplb as eplb
from deeppar import _native
from deeppar.eplb._validate import check_problem

pytestmark = pytest.mark.skipif(
    not _native.has_kernel("eplb_rebalance_maps", "cpu"), reason="no fused CPU EPLB op"
)
KINDS = ["real", "int", "zero", "sparse"]
# The sort the CPU planner uses for nodes of <= 64 experts here ("avx512" or "portable").
SORT_PATH = (torch.ops.deeppar.eplb_cpu_features()
             if hasattr(torch.ops.deeppar, "eplb_cpu_features") else None)

# (layers, experts, replicas, groups, nodes, gpus): the spec's sizes with few layers; nodes of
# 64 experts (rank sort) and of 65, 128, 130 (radix sort); one replica per GPU; a single GPU
# per node (every replica in one pack).
SHAPES = [
    (3, 256, 288, 8, 4, 32),
    (3, 256, 320, 8, 40, 320),
    (3, 128, 144, 1, 2, 16),
    (2, 512, 1024, 64, 16, 128),
    (2, 64, 72, 8, 1, 8),
    (3, 65, 130, 1, 1, 10),
    (3, 130, 260, 2, 1, 13),
    (2, 32, 96, 4, 2, 2),
    (2, 24, 72, 3, 3, 3),
]


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def random_weight(layers: int, experts: int, kind: str, seed: int) -> torch.Tensor:
    """float32 loads (the native ops take nothing else)."""
    return _random_weight(layers, experts, kind, seed).float()


def _kernel_args(weight, sizes):
    """(replicas, groups, nodes, gpus) of the policy that runs (global: one group, one node)."""
    return check_problem(weight, *sizes).kernel_args


def _fused(weight, sizes, width=-1):
    return torch.ops.deeppar.eplb_rebalance_maps(weight, *_kernel_args(weight, sizes), width)


def _separate_ops(weight, *sizes, width=None):
    """The planner op and the log2phy op, called apart (the traced path)."""
    phy2log, rank, logcnt = torch.ops.deeppar.eplb_rebalance(weight, *_kernel_args(weight, sizes))
    width = int(logcnt.max()) if width is None else width
    log2phy = torch.ops.deeppar.eplb_log2phy(phy2log, rank, weight.shape[1], width)
    return phy2log, log2phy, logcnt


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_separate_ops_and_reference(shape, kind):
    layers, experts, *sizes = shape
    weight = random_weight(layers, experts, kind, seed=SHAPES.index(shape) * 7 + len(kind))
    fused = _fused(weight, sizes)
    assert _same(fused, _separate_ops(weight, *sizes))
    assert _same(eplb.rebalance_experts(weight, *sizes), fused)
    assert _same(eplb.rebalance_experts(weight, *sizes, backend="reference"), fused)
    check_invariants(weight, *fused, *sizes)


@pytest.mark.parametrize("extra", [0, 2])
def test_fused_fixed_width(extra):
    weight = random_weight(4, 64, "real", seed=3)
    sizes = (96, 8, 4, 16)
    width = int(torch.ops.deeppar.eplb_rebalance(weight, *sizes)[2].max()) + extra
    fused = _fused(weight, sizes, width)
    assert fused[1].shape == (4, 64, width)
    assert _same(fused, _separate_ops(weight, *sizes, width=width))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "layers, shape", [(1, (16, 24, 4, 2, 4)), (7, (16, 24, 4, 2, 4)), (3000, (16, 24, 4, 2, 4)),
                      (40, (256, 288, 8, 4, 32)), (70, (256, 288, 8, 4, 32)),
                      (64, (512, 1024, 64, 16, 128))]
)
def test_threads_and_chunks_do_not_change_the_plan(threads, num_threads, layers, shape):
    # From 65536 slots the planning is split into chunks (3000 x 24, 70 x 288, 64 x 1024
    # slots), from 2^20 log2phy words its construction too (64 layers of the stress size);
    # smaller batches run in one piece.
    experts, *sizes = shape
    weight = random_weight(layers, experts, "sparse", seed=layers)
    threads(num_threads)
    got = eplb.rebalance_experts(weight, *sizes)
    threads(1)
    assert _same(got, _separate_ops(weight, *sizes))
    few = slice(0, 3)
    want = eplb.rebalance_experts(weight[few], *sizes, backend="reference")
    width = want[1].shape[-1]
    assert torch.equal(got[0][few], want[0]) and torch.equal(got[2][few], want[2])
    assert torch.equal(got[1][few, :, :width], want[1])


def test_replication_beyond_16_bit_counts():
    # Counts and indices of 2^16 and more take the 128-bit replication keys.
    weight = torch.tensor([[5.0, 1.0, 0.0, 3.0, 3.0, 1e-3, 2.0, 7.0]])
    sizes = (1 << 16, 1, 1, 2)
    got = eplb.rebalance_experts(weight, *sizes)
    assert _same(got, eplb.rebalance_experts(weight, *sizes, backend="reference"))


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize(
    "bad, message",
    [(float("nan"), "found a NaN value"), (-1.0, "found a negative value"),
     (float("inf"), "found an infinite value")],
)
def test_bad_load_in_any_chunk_raises(threads, num_threads, bad, message):
    threads(num_threads)
    weight = random_weight(3000, 16, "real", seed=1)
    weight[-1, 5] = bad  # in the last of several planning chunks
    with pytest.raises(ValueError, match=f"finite non-negative loads; {message}"):
        eplb.rebalance_experts(weight, 24, 4, 2, 4)
    with pytest.raises(ValueError, match=message):
        torch.ops.deeppar.eplb_rebalance_maps(weight, 24, 4, 2, 4, -1)
    weight[-1, 5] = 1.0
    weight[0, 0] = bad  # in the first
    with pytest.raises(ValueError, match=message):
        eplb.rebalance_experts(weight, 24, 4, 2, 4)


def test_too_narrow_max_replicas_raises():
    weight = random_weight(3, 16, "real", seed=5)
    width = int(eplb.rebalance_experts(weight, 32, 4, 2, 8)[2].max())
    with pytest.raises(ValueError, match=rf"max_replicas \({width - 1}\) is too small: an expert "
                                         rf"needs {width} replicas"):
        eplb.rebalance_experts(weight, 32, 4, 2, 8, max_replicas=width - 1)
    with pytest.raises(ValueError, match="max_replicas must be -1 .* got 0"):
        torch.ops.deeppar.eplb_rebalance_maps(weight, 32, 4, 2, 8, 0)


def test_opcheck():
    weight = random_weight(3, 16, "real", 0)
    torch.library.opcheck(torch.ops.deeppar.eplb_rebalance_maps.default,
                          (weight, 24, 4, 2, 8, 9))


# Nodes of <= 64 experts (the rank sorts) and above (radix sort), four kinds of loads.
SORT_SHAPES = [(2, 256, 288, 8, 4, 32), (2, 512, 1024, 64, 16, 128), (3, 64, 72, 8, 1, 8),
               (3, 24, 72, 3, 3, 3), (2, 12, 16, 4, 2, 8)]


def check_sort_parity() -> None:
    """The CPU planner's plans equal the reference's on SORT_SHAPES, whichever sort runs."""
    for layers, experts, replicas, groups, nodes, gpus in SORT_SHAPES:
        for seed, kind in enumerate(KINDS):
            w = _random_weight(layers, experts, kind, seed)
            got = eplb.rebalance_experts(w, replicas, groups, nodes, gpus)
            want = eplb.rebalance_experts(w, replicas, groups, nodes, gpus, backend="reference")
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (experts, kind)


def test_sort_path_is_reported():
    assert SORT_PATH in ("avx512", "portable")
    assert deeppar.info()["backends"]["cpu"]["eplb_sort"] == SORT_PATH


@pytest.mark.skipif(SORT_PATH != "avx512",
                    reason="the AVX-512 rank sort is not active here (no AVX-512 CPU, or "
                           "torch's CPU capability below AVX512)")
def test_avx512_sort_matches_reference():
    check_sort_parity()


def test_portable_sort_matches_reference():
    # With torch's CPU capability lowered (ATEN_CPU_CAPABILITY=default) the portable sort runs
    # even on an AVX-512 CPU, and must give the reference's plans. The capability is read once
    # per process, hence the subprocess.
    import os
    import subprocess
    import sys

    code = """
import torch
from test_eplb_cpu_fused import check_sort_parity
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
assert torch.ops.deeppar.eplb_cpu_features() == "portable", torch.ops.deeppar.eplb_cpu_features()
check_sort_parity()
print("same")
"""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(__file__),
                                                       os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "same"
