// CPU kernel of deeppar::expert_counts_add_ (the load recorder's count): a first pass checks
// every id (nothing is added if one is bad), a second adds each row's ids straight into its row
// of counts, rows in parallel for large inputs (rows are disjoint: no scratch, no merge).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "op_checks.h"

namespace deeppar {
namespace {

// Ids per parallel task: small inputs (one layer, or every layer of a decode step: 58 x 128 x 8
// ids) stay on the calling thread, where a thread-pool round trip costs more than the count.
constexpr int64_t kIdsPerTask = 65536;

// Adds each row of ids (viewed as [R, numel / R]) into the same row of counts, once every id
// is known to be in [0, E): ids outside it raise with counts untouched.
void expert_counts_add_cpu(const at::Tensor& counts,     // [R, E] int64, contiguous
                           const at::Tensor& topk_ids) {  // integer, numel a multiple of R
  check_expert_counts_add_args(counts, topk_ids);
  const at::Tensor ids = topk_ids.contiguous();
  const int64_t rows = counts.size(0), experts = counts.size(1), numel = ids.numel();
  if (numel == 0) return;
  const int64_t n = numel / rows;
  int64_t* out = counts.mutable_data_ptr<int64_t>();
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "expert_counts_add_", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    // Pass 1: branch-free range check (one unsigned compare per id, vectorisable).
    std::atomic<bool> bad{false};
    at::parallel_for(0, numel, kIdsPerTask, [&](int64_t begin, int64_t end) {
      bool outside = false;
      for (int64_t i = begin; i < end; ++i) {
        outside |= static_cast<uint64_t>(static_cast<int64_t>(id[i])) >=
                   static_cast<uint64_t>(experts);
      }
      if (outside) bad.store(true, std::memory_order_relaxed);
    });
    if (bad.load()) throw_expert_id_out_of_range(id, numel, experts);
    // Pass 2: each task counts whole rows into their own rows of counts.
    const int64_t grain = std::max<int64_t>(1, kIdsPerTask / n);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = id + r * n;
        int64_t* count = out + r * experts;
        for (int64_t i = 0; i < n; ++i) ++count[static_cast<int64_t>(row[i])];
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) { m.impl("expert_counts_add_", &expert_counts_add_cpu); }

}  // namespace deeppar
