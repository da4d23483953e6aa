"""Replica routing: torch, Triton and reference agree; spreading and locality rules; errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TRITON_INTERPRET, devices

import deeppar.eplb as eplb
from deeppar import _native
from deeppar.eplb import routing
from deeppar.eplb.routing import route_reference, route_to_replicas

# (experts, replicas, groups, nodes, gpus, tokens, k)
CASES = [
    (4, 4, 1, 1, 1, 1, 1),
    (12, 16, 4, 2, 8, 7, 2),
    (16, 24, 4, 2, 4, 33, 3),
    (32, 66, 4, 3, 66, 5, 8),  # global policy, one slot per GPU
    (9, 27, 3, 1, 9, 130, 4),  # three replicas per expert
    (64, 72, 8, 4, 8, 300, 6),
]
# (local_gpu index as a fraction of the GPUs or None, use node tier)
LOCALITY = [(None, False), (0.0, False), (0.5, False), (0.99, True)]


def make_case(experts, replicas, groups, nodes, gpus, tokens, k, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(1, experts, generator=g) ** 4 * 100
    _, log2phy, logcnt = eplb.rebalance_experts(weight, replicas, groups, nodes, gpus)
    ids = torch.randint(0, experts, (tokens, k), generator=g)
    return ids, log2phy[0], logcnt[0]


def locality_kwargs(case, locality):
    experts, replicas, groups, nodes, gpus = case[:5]
    where, node_tier = locality
    if where is None:
        return {}
    kwargs = {"local_gpu": int(where * gpus), "slots_per_gpu": replicas // gpus}
    if node_tier:
        kwargs["gpus_per_node"] = gpus // nodes
    return kwargs


HAS_NATIVE = _native.has_kernel("route_replicas", "cpu")
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="deeppar._C has no route_replicas")


def native_device(device: str) -> str:
    """``device`` when ``deeppar._C`` routes its tensors, else skip the test."""
    if not _native.has_kernel("route_replicas", device):
        pytest.skip(f"deeppar._C has no {device} kernel of route_replicas")
    return device


def backends() -> list[str]:
    names = ["torch"] + (["native"] if HAS_NATIVE else [])
    return names + (["triton"] if _native.triton_usable("cpu") else [])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("locality", LOCALITY)
@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("device", devices())
def test_torch_matches_reference(case, locality, offset, device):
    ids, log2phy, logcnt = make_case(*case, seed=offset)
    kwargs = locality_kwargs(case, locality)
    want = route_reference(ids, log2phy, logcnt, offset, **kwargs)
    got = route_to_replicas(ids.to(device), log2phy.to(device), logcnt.to(device),
                            token_offset=offset, backend="torch", **kwargs)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
    assert torch.equal(route_to_replicas(ids, log2phy, logcnt, token_offset=offset,
                                         backend="reference", **kwargs), want)


@pytest.mark.triton
@pytest.mark.skipif(not (TRITON_INTERPRET or torch.cuda.is_available()),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("locality", LOCALITY)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_triton_matches_reference(case, locality, ids_dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids, log2phy, logcnt = make_case(*case, seed=1)
    kwargs = locality_kwargs(case, locality)
    want = route_reference(ids, log2phy, logcnt, 3, **kwargs)
    got = route_to_replicas(ids.to(device, ids_dtype), log2phy.to(device), logcnt.to(device),
                            token_offset=3, backend="triton", **kwargs)
    assert torch.equal(got.cpu(), want)


@pytest.mark.triton
@pytest.mark.skipif(not (TRITON_INTERPRET or torch.cuda.is_available()),
                    reason="Triton needs a GPU or TRITON_INTERPRET=1")
def test_triton_custom_op_passes_opcheck():
    from deeppar.eplb.routing import replica_candidates
    from deeppar.kernels.replica_routing import route_replicas_triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids, log2phy, logcnt = make_case(16, 24, 4, 2, 4, 9, 2, seed=2)
    table, count = replica_candidates(log2phy.to(device), logcnt.to(device), 1, 6, 2)
    args = (ids.reshape(-1).to(device), table, count, 2, 1)
    torch.library.opcheck(route_replicas_triton, args)
    torch.library.opcheck(route_replicas_triton, (args[0].int(), *args[1:]))
    empty = route_replicas_triton(torch.zeros(0, dtype=torch.int64, device=device),
                                  *args[1:])
    assert empty.shape == (0,)


def test_tokens_spread_evenly_over_replicas():
    # Expert 0 has 3 replicas; 10 consecutive tokens all pick it: 4/3/3 per replica.
    log2phy = torch.tensor([[5, 2, 7], [0, -1, -1]])
    logcnt = torch.tensor([3, 1])
    ids = torch.zeros(10, 1, dtype=torch.long)
    for backend in backends():
        slots = route_to_replicas(ids, log2phy, logcnt, backend=backend).flatten().tolist()
        assert slots[:4] == [5, 2, 7, 5]
        assert sorted(slots.count(s) for s in (5, 2, 7)) == [3, 3, 4]
        single = route_to_replicas(ids[:1], log2phy, logcnt, token_offset=4, backend=backend)
        assert single.item() == 2  # offset 4 -> replica 1


@pytest.mark.parametrize("backend", backends())
def test_locality_prefers_own_gpu_then_node(backend):
    # 8 slots, 2 per GPU, 2 GPUs per node. Expert 0 on slots 1 (GPU 0), 5 (GPU 2), 6 (GPU 3).
    log2phy = torch.tensor([[1, 5, 6], [0, -1, -1]])
    logcnt = torch.tensor([3, 1])
    ids = torch.tensor([[0], [0], [0], [1]])

    def route(**kw):
        return route_to_replicas(ids, log2phy, logcnt, slots_per_gpu=2, backend=backend,
                                 **kw).flatten().tolist()

    assert route(local_gpu=0) == [1, 1, 1, 0]  # own GPU holds one replica
    assert route(local_gpu=3) == [6, 6, 6, 0]
    assert route(local_gpu=1) == [1, 5, 6, 0]  # none on GPU 1: all replicas
    assert route(local_gpu=1, gpus_per_node=2) == [1, 1, 1, 0]  # GPU 0 is on its node
    assert route(local_gpu=2, gpus_per_node=2) == [5, 5, 5, 0]


def test_empty_tokens():
    ids, log2phy, logcnt = make_case(12, 16, 4, 2, 8, 1, 2, seed=0)
    for backend in backends():
        out = route_to_replicas(ids[:0], log2phy, logcnt, backend=backend)
        assert out.shape == (0, 2)


def test_bad_input():
    ids, log2phy, logcnt = make_case(12, 16, 4, 2, 8, 4, 2, seed=0)
    with pytest.raises(ValueError, match=r"expert id 12, outside \[0, 12\)"):
        route_to_replicas(ids.clamp(max=0) + 12, log2phy, logcnt)
    with pytest.raises(ValueError, match="expert id -1"):
        route_to_replicas(ids - 100, log2phy, logcnt)
    with pytest.raises(ValueError, match=r"topk_ids must be \[tokens, k\]"):
        route_to_replicas(ids.flatten(), log2phy, logcnt)
    with pytest.raises(ValueError, match="one layer's"):
        route_to_replicas(ids, log2phy[None], logcnt)
    with pytest.raises(ValueError, match=r"logcnt must be \[experts=12\]"):
        route_to_replicas(ids, log2phy, logcnt[:5])
    with pytest.raises(TypeError, match="integer tensor"):
        route_to_replicas(ids.float(), log2phy, logcnt)
    with pytest.raises(ValueError, match="slots_per_gpu"):
        route_to_replicas(ids, log2phy, logcnt, local_gpu=1)
    with pytest.raises(ValueError, match="gpus_per_node needs local_gpu"):
        route_to_replicas(ids, log2phy, logcnt, gpus_per_node=2)
    with pytest.raises(ValueError, match="logcnt must be in"):
        route_to_replicas(ids, log2phy, logcnt * 0)
    with pytest.raises(ValueError, match="backend must be"):
        route_to_replicas(ids, log2phy, logcnt, backend="fast")
    with pytest.raises(eplb.BackendUnavailable, match="CUDA tensors"):
        route_to_replicas(ids, log2phy, logcnt, backend="cuda")
    names = ("torch", "native", "cpu") if HAS_NATIVE else ("torch",)
    for name in names:  # the vectorised PyTorch path; the native op, spelled two ways
        assert torch.equal(route_to_replicas(ids, log2phy, logcnt, backend=name),
                           route_to_replicas(ids, log2phy, logcnt, backend="reference"))
    if not HAS_NATIVE:
        with pytest.raises(eplb.BackendUnavailable, match="native extension"):
            route_to_replicas(ids, log2phy, logcnt, backend="native")

    if not _native.triton_usable("cpu"):
        with pytest.raises(ValueError, match="Triton cannot run here"):
            route_to_replicas(ids, log2phy, logcnt, backend="triton")


def wide_plan(experts: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A hand-made plan: expert 0 has ``width`` replicas, the others 1 to ``width``, slots
    shuffled, ``-1`` padded (wider than the native op's counter table when width > 32)."""
    g = torch.Generator().manual_seed(seed)
    logcnt = torch.randint(1, width + 1, (experts,), generator=g)
    logcnt[0] = width
    slots = torch.randperm(int(logcnt.sum()), generator=g)
    log2phy = torch.full((experts, width), -1, dtype=torch.int64)
    start = 0
    for e, n in enumerate(logcnt.tolist()):
        log2phy[e, :n] = slots[start:start + n]
        start += n
    return log2phy, logcnt


NATIVE_CASES = CASES + [
    (8, 8, 1, 1, 8, 50, 3),  # one replica per expert
    (4, 80, 1, 1, 8, 64, 5),  # experts with many replicas
]


@pytest.mark.parametrize("case", NATIVE_CASES)
@pytest.mark.parametrize("locality", LOCALITY)
@pytest.mark.parametrize("offset", [0, 3, -7, 2**40 + 1])
@pytest.mark.parametrize("device", devices())
def test_native_matches_reference(case, locality, offset, device):
    native_device(device)
    ids, log2phy, logcnt = make_case(*case, seed=abs(offset) % 97)
    kwargs = locality_kwargs(case, locality)
    want = route_reference(ids, log2phy, logcnt, offset, **kwargs)
    got = route_to_replicas(ids.to(device), log2phy.to(device), logcnt.to(device),
                            token_offset=offset, backend="native", **kwargs)
    assert got.dtype == torch.int64 and got.device == ids.to(device).device
    assert torch.equal(got.cpu(), want)


def test_without_a_kernel_none_runs_vectorised_torch(monkeypatch):
    ids, log2phy, logcnt = make_case(12, 16, 4, 2, 8, 40, 2, seed=3)
    want = route_reference(ids, log2phy, logcnt, 1, local_gpu=2, slots_per_gpu=2)
    monkeypatch.setattr(_native, "has_kernel", lambda op, device: False)

    def no_loops(*args, **kwargs):
        raise AssertionError("backend=None must not run the Python-loop reference")

    monkeypatch.setattr(routing, "route_reference", no_loops)
    got = route_to_replicas(ids, log2phy, logcnt, token_offset=1, local_gpu=2, slots_per_gpu=2)
    assert torch.equal(got, want)


@pytest.mark.parametrize("width", [1, 2, 31, 32, 33, 70])
@pytest.mark.parametrize("local", [False, True])
@pytest.mark.parametrize("tokens,k", [(1, 1), (128, 8), (4096, 8), (1000, 3)])
@pytest.mark.parametrize("device", devices())
def test_native_matches_reference_on_wide_tables_and_decode_prefill_sizes(width, local, tokens,
                                                                           k, device):
    native_device(device)
    experts = 16
    log2phy, logcnt = wide_plan(experts, width, seed=width + tokens)
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, k), generator=g)
    slots = int(logcnt.sum())
    kwargs = ({"local_gpu": 1, "slots_per_gpu": max(1, slots // 8), "gpus_per_node": 2}
              if local else {})
    want = route_reference(ids, log2phy, logcnt, 11, **kwargs)
    got = route_to_replicas(ids.to(device), log2phy.to(device), logcnt.to(device),
                            token_offset=11, backend="native", **kwargs)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8,
                                   torch.uint8])
@pytest.mark.parametrize("device", devices())
def test_native_takes_every_id_dtype_and_strided_ids(dtype, device):
    native_device(device)
    ids, log2phy, logcnt = make_case(16, 24, 4, 2, 4, 33, 3, seed=4)
    want = route_reference(ids, log2phy, logcnt, 2)
    log2phy, logcnt = log2phy.to(device), logcnt.to(device)
    got = route_to_replicas(ids.to(device, dtype), log2phy, logcnt, token_offset=2,
                            backend="native")
    assert torch.equal(got.cpu(), want)
    strided = ids.to(device).t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    assert torch.equal(route_to_replicas(strided, log2phy, logcnt, token_offset=2).cpu(), want)
    assert route_to_replicas(strided[:0], log2phy, logcnt).shape == (0, 3)


@needs_native
def test_native_is_the_default_on_cpu_and_checks_values():
    ids, log2phy, logcnt = make_case(12, 16, 4, 2, 8, 4096, 8, seed=5)  # several threads' work
    bad = ids.clone()
    bad[4000, 7] = 12
    with pytest.raises(ValueError, match=r"expert id 12, outside \[0, 12\)"):
        route_to_replicas(bad, log2phy, logcnt)
    bad[0, 0] = -3
    with pytest.raises(ValueError, match=r"expert id -3, outside \[0, 12\)"):
        route_to_replicas(bad.int(), log2phy, logcnt, local_gpu=0, slots_per_gpu=2)
    wide = logcnt.clone()
    wide[5] = log2phy.shape[1] + 1
    with pytest.raises(ValueError, match="logcnt must be in"):
        route_to_replicas(ids, log2phy, wide)
    with pytest.raises(ValueError, match="log2phy must be an int64"):
        torch.ops.deeppar.route_replicas(ids, log2phy.int(), logcnt, 0, -1, 0, 0)
    with pytest.raises(TypeError, match="topk_ids must be an integer"):
        torch.ops.deeppar.route_replicas(ids.float(), log2phy, logcnt, 0, -1, 0, 0)


@pytest.mark.parametrize("device", devices())
def test_native_custom_op_passes_opcheck_and_compiles(device):
    native_device(device)
    ids, log2phy, logcnt = (t.to(device) for t in make_case(16, 24, 4, 2, 4, 9, 2, seed=2))
    op = torch.ops.deeppar.route_replicas.default
    for args in ((ids, log2phy, logcnt, 0, -1, 0, 0), (ids.int(), log2phy, logcnt, 5, 1, 6, 2),
                 (ids[:0], log2phy, logcnt, 0, -1, 0, 0)):
        torch.library.opcheck(op, args)

    def route(x):
        return route_to_replicas(x, log2phy, logcnt, token_offset=1, local_gpu=1,
                                 slots_per_gpu=6)

    want = route_reference(ids.cpu(), log2phy.cpu(), logcnt.cpu(), 1, local_gpu=1,
                           slots_per_gpu=6)
    got = torch.compile(route, fullgraph=True, backend="eager")(ids)
    assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
def test_cuda_native_routing_does_not_sync():
    native_device("cuda")
    ids, log2phy, logcnt = (t.cuda() for t in make_case(16, 24, 4, 2, 4, 300, 8, seed=6))
    route_to_replicas(ids, log2phy, logcnt)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in ({}, {"local_gpu": 1, "slots_per_gpu": 6, "gpus_per_node": 2}):
            out = route_to_replicas(ids, log2phy, logcnt, token_offset=3, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = route_reference(ids.cpu(), log2phy.cpu(), logcnt.cpu(), 3, local_gpu=1,
                           slots_per_gpu=6, gpus_per_node=2)
    assert torch.equal(out.cpu(), want)


# Host program over the CUDA kernel's per-pair routine (route_pair_slot is __host__ __device__):
# reads cases "E X T K offset local_gpu slots_per_gpu gpus_per_node" + log2phy, logcnt, ids on
# stdin, prints the slots. Lets the CUDA logic be checked with nvcc alone, without a GPU.
_HOST_PROGRAM = r"""
#include "replica_routing_kernel.cuh"
#include <cstdio>
#include <vector>
int main() {
  long long E, X, T, K, off, local, spg, gpn;
  while (std::scanf("%lld %lld %lld %lld %lld %lld %lld %lld", &E, &X, &T, &K, &off, &local,
                    &spg, &gpn) == 8) {
    std::vector<long long> log2phy(E * X), logcnt(E), ids(T * K);
    for (auto& v : log2phy) std::scanf("%lld", &v);
    for (auto& v : logcnt) std::scanf("%lld", &v);
    for (auto& v : ids) std::scanf("%lld", &v);
    std::vector<int64_t> row(X);
    for (long long i = 0; i < T * K; ++i) {
      for (long long r = 0; r < X; ++r) row[r] = log2phy[ids[i] * X + r];
      std::printf("%lld ", static_cast<long long>(deeppar::route_pair_slot(
                               row.data(), logcnt[ids[i]], i / K + off, local, spg, gpn)));
    }
    std::printf("\n");
  }
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (no GPU needed)")
def test_cuda_pair_routine_matches_reference_on_the_host(tmp_path):
    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "route_host.cu"
    source.write_text(_HOST_PROGRAM)
    program = tmp_path / "route_host"
    subprocess.run(["nvcc", "-std=c++17", "-x", "cu", f"-I{root / 'csrc' / 'cuda'}",
                    str(source), "-o", str(program)], check=True, timeout=120)
    cases = []
    for case in NATIVE_CASES:
        for locality in LOCALITY:
            for offset in (0, -7, 2**40 + 1):
                ids, log2phy, logcnt = make_case(*case, seed=abs(offset) % 97)
                cases.append((ids, log2phy, logcnt, offset, locality_kwargs(case, locality)))
    for width in (1, 33, 70):
        log2phy, logcnt = wide_plan(16, width, seed=width)
        ids = torch.randint(0, 16, (200, 4), generator=torch.Generator().manual_seed(width))
        local = {"local_gpu": 1, "slots_per_gpu": max(1, int(logcnt.sum()) // 8),
                 "gpus_per_node": 2}
        cases += [(ids, log2phy, logcnt, 11, {}), (ids, log2phy, logcnt, 11, local)]
    lines = []
    for ids, log2phy, logcnt, offset, kw in cases:
        header = (*log2phy.shape, *ids.shape, offset, kw.get("local_gpu", -1),
                  kw.get("slots_per_gpu", 0), kw.get("gpus_per_node", 0))
        lines.append(" ".join(map(str, header)))
        values = log2phy.flatten().tolist() + logcnt.tolist() + ids.flatten().tolist()
        lines.append(" ".join(map(str, values)))
    run = subprocess.run([str(program)], input="\n".join(lines) + "\n", capture_output=True,
                         text=True, check=True, timeout=60)
    got = run.stdout.splitlines()
    assert len(got) == len(cases)
    for out, (ids, log2phy, logcnt, offset, kw) in zip(got, cases):
        want = route_reference(ids, log2phy, logcnt, offset, **kw).flatten().tolist()
        assert list(map(int, out.split())) == want, (tuple(log2phy.shape), offset, kw)
