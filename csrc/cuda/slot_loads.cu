// CUDA binding of deeppar::slot_loads; the kernel itself is in slot_loads_kernel.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "op_checks.h"

#include "slot_loads_kernel.cuh"

namespace deeppar {
namespace {

at::Tensor slot_loads_cuda(const at::Tensor& weight, const at::Tensor& phy2log,
                           const at::Tensor& logcnt) {
  check_slot_loads_args(weight, phy2log, logcnt);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous(), p = phy2log.contiguous(), c = logcnt.contiguous();
  const int64_t layers = w.size(0), experts = w.size(1), replicas = p.size(1);
  at::Tensor out = at::empty({layers, replicas}, w.options());
  const int64_t n = layers * replicas;
  if (n == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  slot_loads_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      w.const_data_ptr<float>(), p.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(),
      out.mutable_data_ptr<float>(), layers, experts, replicas);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CUDA, m) { m.impl("slot_loads", &slot_loads_cuda); }

}  // namespace deeppar
