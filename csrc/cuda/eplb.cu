// CUDA binding of deeppar::eplb_rebalance; the kernel itself is in eplb_kernel.cuh.
// No host sync: outputs are allocated from the sizes alone, the launch goes on the current
// stream (safe inside CUDA graph capture).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "eplb_kernel.cuh"
#include "op_checks.h"

namespace deeppar {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_cuda(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  auto [phy2log, phy_rank, logcnt] = empty_plan_maps(w, num_replicas);
  if (layers == 0) return {phy2log, phy_rank, logcnt};

  const int e = static_cast<int>(experts), r = static_cast<int>(num_replicas);
  const int g = static_cast<int>(num_groups), n = static_cast<int>(num_nodes);
  const int p = static_cast<int>(num_gpus);
  const int64_t smem = eplb_detail::eplb_smem_bytes(e, r, g, p);
  const int device = weight.get_device();
  int max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  TORCH_CHECK(smem <= max_smem, "eplb_rebalance: this problem needs ", smem,
              " bytes of shared memory per layer, the GPU offers ", max_smem,
              "; use the cpu backend");
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(eplb_rebalance_kernel,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  // One warp per node (up to 8 warps); warp 0 alone packs the groups.
  const int threads = 32 * std::min(8, n);
  eplb_rebalance_kernel<<<static_cast<unsigned>(layers), threads, smem,
                          c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<float>(), phy2log.mutable_data_ptr<int64_t>(),
      phy_rank.mutable_data_ptr<int64_t>(), logcnt.mutable_data_ptr<int64_t>(), e, r, g, n, p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {phy2log, phy_rank, logcnt};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CUDA, m) { m.impl("eplb_rebalance", &eplb_rebalance_cuda); }

}  // namespace deeppar
