// CPU kernel of deeppar::expert_counts (the load recorder's count): one pass over each row's
// ids, checking and counting them, rows in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "op_checks.h"

namespace deeppar {
namespace {

// Ids per parallel task: small inputs (one layer, or every layer of a decode step: 58 x 128 x 8
// ids) stay on the calling thread, where a thread-pool round trip costs more than the count.
constexpr int64_t kIdsPerTask = 65536;

at::Tensor expert_counts_cpu(const at::Tensor& topk_ids,  // [L, N] integer
                             int64_t num_experts) {
  check_expert_counts_args(topk_ids, num_experts);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t rows = ids.size(0), n = ids.size(1), experts = num_experts;
  at::Tensor out = at::zeros({rows, experts}, ids.options().dtype(at::kLong));
  if (ids.numel() == 0) return out;
  int64_t* counts = out.mutable_data_ptr<int64_t>();
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "expert_counts", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    std::atomic<bool> bad{false};
    const int64_t grain = std::max<int64_t>(1, kIdsPerTask / n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = id + r * n;
        int64_t* count = counts + r * experts;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t e = static_cast<int64_t>(row[i]);
          if (e < 0 || e >= experts) {
            bad.store(true, std::memory_order_relaxed);
            return;
          }
          ++count[e];
        }
      }
    });
    if (bad.load()) throw_expert_id_out_of_range(id, ids.numel(), experts);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) { m.impl("expert_counts", &expert_counts_cpu); }

}  // namespace deeppar
