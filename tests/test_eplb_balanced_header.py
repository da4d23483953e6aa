"""The per-layer code of method="balanced" (csrc/cuda/eplb_balanced_kernel.cuh), which the CUDA
op runs on the device, compiled alone with the host compiler under AddressSanitizer and
UndefinedBehaviorSanitizer: no torch needed, no access outside a workspace of exactly
``Layout(sizes).bytes``, and the same plans as the CPU op bit for bit. Its own copy of the
spec's plan (spec_layer, the bar balanced_layer must beat and its fallback) must equal
method="deepseek" bit for bit, ties included."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _eplb_helpers import random_shape, random_weight

from deeppar import _native
from deeppar.eplb import rebalance_experts
from deeppar.eplb._validate import check_problem
from deeppar.eplb.api import build_log2phy

ROOT = Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CXX is None, reason="needs a C++ compiler"),
    pytest.mark.skipif(
        not _native.has_kernel("eplb_rebalance_balanced", "cpu"),
        reason="deeppar._C has no eplb_rebalance_balanced kernel",
    ),
]

# Runs argv[1] ("balanced": balanced_layer, "spec": spec_layer) on cases (int32 layers, E, R, G,
# N, P, then float32 [layers, E]) read from argv[2] and writes each case's phy2log, phy_rank and
# logcnt (int64) to argv[3]; one exact-size workspace per case, reused by its layers as the CPU
# op does.
DRIVER = r"""
#include <cstdio>
#include <cstring>
#include <vector>
#include "cuda/eplb_balanced_kernel.cuh"
using namespace deeppar::eplb_balanced;
int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const bool spec = std::strcmp(argv[1], "spec") == 0;
  FILE* in = std::fopen(argv[2], "rb");
  FILE* out = std::fopen(argv[3], "wb");
  int32_t cases = 0;
  if (std::fread(&cases, 4, 1, in) != 1) return 2;
  for (int32_t c = 0; c < cases; ++c) {
    int32_t h[6];
    if (std::fread(h, 4, 6, in) != 6) return 2;
    const Sizes sh{h[1], h[2], h[3], h[4], h[5]};
    std::vector<float> w(static_cast<size_t>(h[0]) * sh.experts);
    if (std::fread(w.data(), 4, w.size(), in) != w.size()) return 2;
    const Layout layout(sh);
    std::vector<unsigned char> space(static_cast<size_t>(layout.bytes));
    Work work(space.data(), layout);
    std::vector<int64_t> phy(static_cast<size_t>(h[0]) * sh.replicas), rank(phy.size());
    std::vector<int64_t> cnt(w.size());
    for (int32_t l = 0; l < h[0]; ++l) {
      (spec ? spec_layer : balanced_layer)(w.data() + l * sh.experts, sh,
                                           phy.data() + l * sh.replicas,
                                           rank.data() + l * sh.replicas,
                                           cnt.data() + l * sh.experts, work);
    }
    std::fwrite(phy.data(), 8, phy.size(), out);
    std::fwrite(rank.data(), 8, rank.size(), out);
    std::fwrite(cnt.data(), 8, cnt.size(), out);
  }
  std::fclose(out);
  return 0;
}
"""


def _cases() -> list[tuple[tuple[int, ...], torch.Tensor]]:
    cases = []
    for seed in range(60):
        shape = random_shape(random.Random(seed))
        replicas, groups, nodes, gpus = shape[2:]
        if groups % nodes:  # the op plans the global policy as one group on one node
            shape = (*shape[:3], 1, 1, gpus)
        kind = ["real", "int", "zero", "sparse", "half"][seed % 5]
        cases.append((shape, random_weight(shape[0], shape[1], kind, seed).float()))
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 256, 288, 8, 4, 32), (2, 256, 288, 1, 1, 72), (2, 256, 320, 1, 1, 320),
                  (2, 512, 1024, 64, 16, 128), (2, 128, 144, 1, 1, 16)]:
        weight = (torch.exp(torch.randn(shape[0], shape[1], generator=g)) * 1000).round()
        cases.append((shape, weight))
    return cases


@pytest.fixture(scope="module")
def driver(tmp_path_factory) -> Path:
    """The driver, compiled once for the module under ASan and UBSan."""
    where = tmp_path_factory.mktemp("eplb_balanced_header")
    source = where / "driver.cpp"
    source.write_text(DRIVER)
    binary = where / "driver"
    subprocess.run([CXX, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                    f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=300)
    return binary


def _run(driver: Path, mode: str, cases, where: Path):
    """Each case's (phy2log, phy_rank, logcnt) from the driver, as tensors of the cases' shapes;
    a case's sizes are the kernel's (R, G, N, P)."""
    with open(where / "in.bin", "wb") as f:
        f.write(np.int32(len(cases)).tobytes())
        for sizes, weight in cases:
            header = [*weight.shape, *sizes]
            f.write(np.asarray(header, dtype=np.int32).tobytes())
            f.write(weight.numpy().astype(np.float32).tobytes())
    run = subprocess.run([str(driver), mode, str(where / "in.bin"), str(where / "out.bin")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    out = torch.from_numpy(np.fromfile(where / "out.bin", dtype=np.int64))
    plans, at = [], 0
    for sizes, weight in cases:
        (layers, experts), replicas = weight.shape, sizes[0]
        plan = []
        for size, cols in ((layers * replicas, replicas), (layers * replicas, replicas),
                           (layers * experts, experts)):
            plan.append(out[at:at + size].view(layers, cols))
            at += size
        plans.append(tuple(plan))
    assert at == out.numel()
    return plans


def test_header_alone_under_sanitizers_matches_cpu_op(driver, tmp_path):
    cases = [(shape[2:], weight) for shape, weight in _cases()]
    for (sizes, weight), got in zip(cases, _run(driver, "balanced", cases, tmp_path)):
        want = torch.ops.deeppar.eplb_rebalance_balanced(weight, *sizes)
        for name, g, t in zip(("phy2log", "phy_rank", "logcnt"), got, want):
            assert torch.equal(g, t), (weight.shape, sizes, name)


def _spec_cases() -> list[tuple[tuple[int, ...], torch.Tensor]]:
    """(layers, E, R, G, N, P) and float32 loads: random shapes of both policies, shapes that
    only the global policy accepts (groups and nodes ignored), one GPU, one node, and loads with
    many ties (small integers, all equal, all zero)."""
    rng = random.Random(1234)
    shapes = [random_shape(rng) for _ in range(120)]
    shapes += [
        (2, 7, 10, 3, 2, 5),  # global: 7 % 3 and 5 % 2 != 0
        (3, 13, 26, 4, 3, 13),
        (2, 9, 12, 2, 4, 3),
        (2, 6, 6, 1, 1, 1), (3, 5, 12, 1, 1, 1), (2, 8, 16, 4, 1, 4), (2, 8, 8, 2, 2, 8),
        (2, 16, 32, 8, 4, 8), (2, 64, 80, 8, 4, 16), (2, 256, 288, 8, 4, 32),
    ]
    kinds = ["real", "int", "zero", "sparse", "half", "ones", "ties"]
    cases = []
    for i, shape in enumerate(shapes):
        layers, experts = shape[:2]
        kind = kinds[i % len(kinds)]
        if kind == "ones":
            weight = torch.ones(layers, experts)
        elif kind == "ties":  # a few distinct integers, large enough to tie after division
            g = torch.Generator().manual_seed(i)
            weight = torch.randint(1, 4, (layers, experts), generator=g).float() * 6
        else:
            weight = random_weight(layers, experts, kind, i).float()
        cases.append((shape, weight))
    return cases


def test_header_spec_plan_equals_deepseek_method(driver, tmp_path):
    cases = _spec_cases()
    policies = set()
    runs = []
    for shape, weight in cases:
        problem = check_problem(weight, *shape[2:])
        policies.add(problem.policy)
        runs.append((problem.kernel_args, weight))
    assert policies == {"hierarchical", "global"}
    for (shape, weight), (phy2log, phy_rank, logcnt) in zip(
            cases, _run(driver, "spec", runs, tmp_path)):
        want_phy2log, want_log2phy, want_logcnt = rebalance_experts(
            weight, *shape[2:], method="deepseek", backend="cpu")
        assert torch.equal(phy2log, want_phy2log), (shape, "phy2log")
        assert torch.equal(logcnt, want_logcnt), (shape, "logcnt")
        log2phy = build_log2phy(phy2log, phy_rank, shape[1], want_log2phy.shape[2])
        assert torch.equal(log2phy, want_log2phy), (shape, "phy_rank")
