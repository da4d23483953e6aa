// CPU kernel of deeppar::eplb_rebalance_balanced: the layer loop of the CPU planner ops
// (eplb_layers.h) around the per-layer algorithm of csrc/cuda/eplb_balanced_kernel.cuh, the
// same code the CUDA op runs on the device (one thread per layer), so both give bit-identical
// plans.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/eplb_layers.h"
#include "cuda/eplb_balanced_kernel.cuh"

namespace deeppar {
namespace {

// One thread's workspace, sized on its first layer (every layer has the same sizes).
struct BalancedScratch {
  std::vector<uint64_t> words;
};

void balanced_row(const float* w, const eplb_cpu::Shape& shape, int64_t* phy2log,
                  int64_t* phy_rank, int64_t* logcnt, BalancedScratch& scratch) {
  const eplb_balanced::Sizes sizes{shape.experts, shape.replicas, shape.groups, shape.nodes,
                                   shape.gpus};
  const eplb_balanced::Layout layout(sizes);
  const size_t words = static_cast<size_t>(layout.bytes / 8);
  if (scratch.words.size() < words) scratch.words.resize(words);
  eplb_balanced::Work work(reinterpret_cast<unsigned char*>(scratch.words.data()), layout);
  eplb_balanced::balanced_layer(w, sizes, phy2log, phy_rank, logcnt, work);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_balanced_cpu(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  // Tens of microseconds per layer: batches of model size stay on the calling thread (on a
  // busy 2-core machine, waiting for a second pool thread cost more than it saved: 2.6-6.9 ms
  // wall with two threads vs 1.8-2.5 ms with one at V3 prefill), only very large ones split.
  return eplb_cpu::plan_layers<BalancedScratch>(weight, num_replicas, num_groups, num_nodes,
                                                num_gpus, int64_t{1} << 20,
                                                "eplb_rebalance_balanced",
                                                [](auto... row) { balanced_row(row...); });
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_rebalance_balanced", &eplb_rebalance_balanced_cpu);
}

}  // namespace deeppar
