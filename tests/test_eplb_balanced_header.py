"""The per-layer code of method="balanced" (csrc/cuda/eplb_balanced_kernel.cuh), which the CUDA
op runs on the device, compiled alone with the host compiler under AddressSanitizer and
UndefinedBehaviorSanitizer: no torch needed, no access outside a workspace of exactly
``Layout(sizes).bytes``, and the same plans as the CPU op bit for bit."""

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

# Reads cases (int32 layers, E, R, G, N, P, then float32 [layers, E]) from argv[1] and writes
# each case's phy2log, phy_rank and logcnt (int64) to argv[2]; one exact-size workspace per case,
# reused by its layers as the CPU op does.
DRIVER = r"""
#include <cstdio>
#include <vector>
#include "cuda/eplb_balanced_kernel.cuh"
using namespace deeppar::eplb_balanced;
int main(int argc, char** argv) {
  FILE* in = std::fopen(argv[1], "rb");
  FILE* out = std::fopen(argv[2], "wb");
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
      balanced_layer(w.data() + l * sh.experts, sh, phy.data() + l * sh.replicas,
                     rank.data() + l * sh.replicas, cnt.data() + l * sh.experts, work);
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


def test_header_alone_under_sanitizers_matches_cpu_op(tmp_path):
    source = tmp_path / "driver.cpp"
    source.write_text(DRIVER)
    binary = tmp_path / "driver"
    subprocess.run([CXX, "-std=c++17", "-O1", "-g", "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all", "-fno-omit-frame-pointer",
                    f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary)],
                   check=True, capture_output=True, timeout=300)
    cases = _cases()
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(np.int32(len(cases)).tobytes())
        for shape, weight in cases:
            f.write(np.asarray(shape, dtype=np.int32).tobytes())
            f.write(weight.numpy().astype(np.float32).tobytes())
    run = subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    out = np.fromfile(tmp_path / "out.bin", dtype=np.int64)
    at = 0
    for shape, weight in cases:
        layers, experts, replicas = shape[:3]
        want = torch.ops.deeppar.eplb_rebalance_balanced(weight, *shape[2:])
        for name, t, size in zip(("phy2log", "phy_rank", "logcnt"), want,
                                 (layers * replicas, layers * replicas, layers * experts)):
            got = torch.from_numpy(out[at:at + size].copy()).view(t.shape)
            at += size
            assert torch.equal(got, t), (shape, name)
    assert at == out.size
