// CUDA binding of deeppar::route_replicas; the kernel is in replica_routing_kernel.cuh.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "op_checks.h"

#include "replica_routing_kernel.cuh"

namespace deeppar {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // grid-stride beyond this

at::Tensor route_replicas_cuda(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                               const at::Tensor& logcnt, int64_t token_offset, int64_t local_gpu,
                               int64_t slots_per_gpu, int64_t gpus_per_node) {
  check_route_replicas_args(topk_ids, log2phy, logcnt, local_gpu, slots_per_gpu);
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const at::Tensor ids = topk_ids.contiguous(), table = log2phy.contiguous(),
                   counts = logcnt.contiguous();
  at::Tensor out = at::empty(ids.sizes(), ids.options().dtype(at::kLong));
  const int64_t pairs = ids.numel();
  if (pairs == 0) return out;
  const int64_t blocks = std::min<int64_t>((pairs + kThreads - 1) / kThreads, kMaxBlocks);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "route_replicas_cuda", [&] {
    route_replicas_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        ids.const_data_ptr<scalar_t>(), table.const_data_ptr<int64_t>(),
        counts.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), pairs, ids.size(1),
        table.size(0), table.size(1), token_offset, local_gpu, slots_per_gpu, gpus_per_node);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CUDA, m) { m.impl("route_replicas", &route_replicas_cuda); }

}  // namespace deeppar
