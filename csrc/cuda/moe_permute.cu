// CUDA bindings of deeppar::moe_permute / moe_unpermute; the kernels are in
// moe_permute_kernel.cuh. Each launch uses exactly num_sms blocks (0: one per SM).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <tuple>

#include "op_checks.h"

#include "moe_permute_kernel.cuh"

namespace deeppar {
namespace {

constexpr int kCountThreads = 256;
constexpr int kThreads = 512;  // scatter and unpermute: 16 warps copying rows per block
constexpr int64_t kMaxExperts = 2048;  // shared memory: 16 bytes per expert in the scatter

int grid_size(int64_t num_sms) {
  if (num_sms > 0) {
    TORCH_CHECK(num_sms <= (int64_t{1} << 20), "moe kernels: num_sms too large");
    return static_cast<int>(num_sms);
  }
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cuda(
    const at::Tensor& x, const at::Tensor& topk_ids, int64_t num_experts, int64_t num_ranks,
    int64_t num_sms) {
  check_moe_permute_args(x, topk_ids, num_experts, num_ranks, num_sms);
  TORCH_CHECK(num_experts <= kMaxExperts, "moe_permute (CUDA): at most ", kMaxExperts,
              " experts, got ", num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(), ids = topk_ids.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1), hidden = xc.size(1);
  const int64_t pairs = tokens * top_k;
  at::Tensor out = at::empty({pairs, hidden}, xc.options());
  at::Tensor pos = at::empty({tokens, top_k}, ids.options());
  at::Tensor rank_counts = at::zeros({num_ranks}, ids.options());
  at::Tensor expert_counts = at::zeros({num_experts}, ids.options());
  if (pairs == 0) return {out, pos, rank_counts, expert_counts};
  const int grid = grid_size(num_sms);
  const int64_t per_chunk = (pairs + grid - 1) / grid;
  const int experts = static_cast<int>(num_experts);
  at::Tensor hist = at::empty({grid, num_experts}, ids.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  moe_count_kernel<<<grid, kCountThreads, experts * sizeof(int), stream>>>(
      ids.const_data_ptr<int64_t>(), hist.mutable_data_ptr<int64_t>(), pairs, per_chunk, experts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t row_bytes = hidden * static_cast<int64_t>(xc.element_size());
  const bool vec16 = row_bytes % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(xc.const_data_ptr()) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
  moe_scatter_kernel<<<grid, kThreads, 2 * experts * sizeof(long long), stream>>>(
      static_cast<const char*>(xc.const_data_ptr()), ids.const_data_ptr<int64_t>(),
      hist.const_data_ptr<int64_t>(), static_cast<char*>(out.mutable_data_ptr()),
      pos.mutable_data_ptr<int64_t>(), rank_counts.mutable_data_ptr<int64_t>(),
      expert_counts.mutable_data_ptr<int64_t>(), pairs, per_chunk, experts,
      static_cast<int>(num_experts / num_ranks), row_bytes, top_k, vec16);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, pos, rank_counts, expert_counts};
}

template <typename scalar_t, typename acc_t>
void launch_unpermute(const at::Tensor& y, const at::Tensor& pos, const at::Tensor& w,
                      at::Tensor& out, int grid, cudaStream_t stream) {
  const int64_t tokens = pos.size(0), top_k = pos.size(1), hidden = y.size(1);
  constexpr int vec = 16 / sizeof(scalar_t);
  const auto* yp = reinterpret_cast<const scalar_t*>(y.const_data_ptr());
  auto* op = reinterpret_cast<scalar_t*>(out.mutable_data_ptr());
  const bool aligned = hidden % vec == 0 && reinterpret_cast<uintptr_t>(yp) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(op) % 16 == 0;
  if (aligned) {
    moe_unpermute_kernel<scalar_t, acc_t, vec><<<grid, kThreads, 0, stream>>>(
        yp, pos.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(), op, tokens, top_k, hidden);
  } else {
    moe_unpermute_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(
        yp, pos.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(), op, tokens, top_k, hidden);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moe_unpermute_cuda(const at::Tensor& y, const at::Tensor& pos,
                              const at::Tensor& weights, int64_t num_sms) {
  check_moe_unpermute_args(y, pos, weights, num_sms);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor yc = y.contiguous(), pc = pos.contiguous();
  const int64_t tokens = pc.size(0), top_k = pc.size(1), hidden = yc.size(1);
  at::Tensor out = at::empty({tokens, hidden}, yc.options());
  if (tokens == 0 || hidden == 0) return out;
  if (top_k == 0) return out.zero_();
  const bool f64 = yc.scalar_type() == at::kDouble;
  const at::Tensor w = weights.to(f64 ? at::kDouble : at::kFloat).contiguous();
  const int grid = grid_size(num_sms);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (yc.scalar_type()) {
    case at::kFloat: launch_unpermute<float, float>(yc, pc, w, out, grid, stream); break;
    case at::kDouble: launch_unpermute<double, double>(yc, pc, w, out, grid, stream); break;
    case at::kBFloat16:
      launch_unpermute<__nv_bfloat16, float>(yc, pc, w, out, grid, stream);
      break;
    case at::kHalf: launch_unpermute<__half, float>(yc, pc, w, out, grid, stream); break;
    default: TORCH_CHECK(false, "moe_unpermute (CUDA): unsupported dtype ", yc.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CUDA, m) {
  m.impl("moe_permute", &moe_permute_cuda);
  m.impl("moe_unpermute", &moe_unpermute_cuda);
}

}  // namespace deeppar
