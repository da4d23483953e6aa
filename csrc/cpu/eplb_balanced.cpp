// CPU kernel of deeppar::eplb_rebalance_balanced: the layer loop of the CPU planner ops
// (eplb_layers.h) around the per-layer algorithm of csrc/cuda/eplb_balanced_kernel.cuh, the
// same code the CUDA op runs on the device (one thread per layer), so both give bit-identical
// plans.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
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

// Slots per parallel task: layers grouped into tasks of about 5 ms of estimated work. Waking a
// second pool thread costs milliseconds on a busy machine (at V3 prefill, about 2 ms of work
// in all, two threads took 2.6-6.9 ms wall against 1.8-2.5 ms on one), so only long calls
// split: the stress shape (about 30 ms; 16-19 ms wall on two threads against 27-29 ms) and
// 9 nodes x 8 GPUs. Estimate per layer, fitted at the spec's shapes within 2x: 5 ns per slot
// and (GPUs per node + 16); the spec's plan alone where each GPU has one slot.
int64_t slots_per_task(int64_t replicas, int64_t nodes, int64_t gpus) {
  const double gpus_per_node =
      replicas == gpus ? 0.0 : std::max(0.0, static_cast<double>(gpus / nodes));
  const double us_per_layer = 0.005 * static_cast<double>(replicas) * (gpus_per_node + 16.0);
  const double layers = std::max(1.0, 5000.0 / us_per_layer);
  return static_cast<int64_t>(layers) * replicas;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_balanced_cpu(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  return eplb_cpu::plan_layers<BalancedScratch>(
      weight, num_replicas, num_groups, num_nodes, num_gpus,
      slots_per_task(std::max<int64_t>(num_replicas, 1), std::max<int64_t>(num_nodes, 1),
                     num_gpus),
      "eplb_rebalance_balanced", [](auto... row) { balanced_row(row...); });
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_rebalance_balanced", &eplb_rebalance_balanced_cpu);
}

}  // namespace deeppar
