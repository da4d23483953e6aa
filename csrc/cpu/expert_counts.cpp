// CPU kernel of deeppar::expert_counts_add_ (the load recorder's count): one pass over each
// row's ids, checking and counting them, rows in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "op_checks.h"

namespace deeppar {
namespace {

// Ids per parallel task: small inputs (one layer, or every layer of a decode step: 58 x 128 x 8
// ids) stay on the calling thread, where a thread-pool round trip costs more than the count.
constexpr int64_t kIdsPerTask = 65536;

// Counts each row of ids (viewed as [R, numel / R]) into a scratch table first, so that ids
// outside [0, E) raise before anything is added (counts stay untouched), then adds it.
void expert_counts_add_cpu(const at::Tensor& counts,     // [R, E] int64, contiguous
                           const at::Tensor& topk_ids) {  // integer, numel a multiple of R
  check_expert_counts_add_args(counts, topk_ids);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t rows = counts.size(0), experts = counts.size(1), n = ids.numel() / rows;
  if (ids.numel() == 0) return;
  std::vector<int64_t> scratch(rows * experts, 0);
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "expert_counts_add_", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    std::atomic<bool> bad{false};
    const int64_t grain = std::max<int64_t>(1, kIdsPerTask / n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = id + r * n;
        int64_t* count = scratch.data() + r * experts;
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
  int64_t* out = counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows * experts; ++i) out[i] += scratch[i];
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) { m.impl("expert_counts_add_", &expert_counts_add_cpu); }

}  // namespace deeppar
