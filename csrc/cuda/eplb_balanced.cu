// CUDA binding of deeppar::eplb_rebalance_balanced: one thread per layer runs the per-layer
// algorithm of eplb_balanced_kernel.cuh (the code the CPU op runs), with its workspace in
// global memory sized from the shape. No host sync: outputs and workspace are allocated from
// the sizes alone, the launch goes on the current stream.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "eplb_balanced_kernel.cuh"
#include "op_checks.h"

namespace deeppar {
namespace {

// Layers per block. Each thread plans one layer with its own data-dependent control flow, so
// threads of one warp would mostly run one after the other: one thread per block instead,
// which spreads the layers over the SMs (58 layers at V3 prefill, 128 at the stress shape).
constexpr int kLayersPerBlock = 1;

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_balanced_cuda(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  auto [phy2log, phy_rank, logcnt] = empty_plan_maps(w, num_replicas);
  if (layers == 0) return {phy2log, phy_rank, logcnt};
  const eplb_balanced::Sizes sizes{static_cast<int32_t>(experts),
                                   static_cast<int32_t>(num_replicas),
                                   static_cast<int32_t>(num_groups),
                                   static_cast<int32_t>(num_nodes), static_cast<int32_t>(num_gpus)};
  const int64_t layer_bytes = eplb_balanced::Layout(sizes).bytes;
  at::Tensor workspace = at::empty({layers * layer_bytes}, w.options().dtype(at::kByte));
  const int64_t blocks = (layers + kLayersPerBlock - 1) / kLayersPerBlock;
  eplb_balanced::eplb_balanced_kernel<<<static_cast<unsigned>(blocks), kLayersPerBlock, 0,
                                        c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<float>(), phy2log.mutable_data_ptr<int64_t>(),
      phy_rank.mutable_data_ptr<int64_t>(), logcnt.mutable_data_ptr<int64_t>(),
      workspace.mutable_data_ptr<uint8_t>(), sizes, layers, layer_bytes);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {phy2log, phy_rank, logcnt};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CUDA, m) {
  m.impl("eplb_rebalance_balanced", &eplb_rebalance_balanced_cuda);
}

}  // namespace deeppar
