// CPU kernel of deeppar::route_replicas (rule in csrc/ops.cpp and deeppar.eplb.routing): one
// pass over the (token, k) ids, each looking up its expert's candidate count and slot.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "op_checks.h"

namespace deeppar {
namespace {

// (token, k) pairs per parallel task: decode sizes (a few thousand pairs) stay on the calling
// thread, where a thread-pool round trip would cost more than the routing.
constexpr int64_t kPairsPerTask = 16384;
// Up to this many replicas per expert, each token's round-robin position modulo every count
// 1..width is advanced by one per token (no division per pair); wider tables divide.
constexpr int64_t kMaxCountedWidth = 32;

int64_t floor_div(int64_t a, int64_t b) {  // b > 0, Python's a // b
  const int64_t q = a / b;
  return (a % b < 0) ? q - 1 : q;
}

int64_t floor_mod(int64_t a, int64_t b) {  // b > 0, Python's a % b
  const int64_t r = a % b;
  return r < 0 ? r + b : r;
}

// The candidates of every expert, compacted into `slots` [E, X] (candidates first, in log2phy
// order) with their number in `count` [E]: the replicas on local_gpu if any, else those on its
// node (gpus_per_node > 0) if any, else all logcnt[e] of them.
void locality_candidates(const int64_t* log2phy, const int64_t* logcnt, int64_t experts,
                         int64_t width, int64_t local_gpu, int64_t slots_per_gpu,
                         int64_t gpus_per_node, int64_t* slots, int64_t* count) {
  const int64_t node = gpus_per_node > 0 ? local_gpu / gpus_per_node : -1;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t* row = log2phy + e * width;
    int64_t* out = slots + e * width;
    const int64_t n = logcnt[e];
    int64_t m = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (floor_div(row[i], slots_per_gpu) == local_gpu) out[m++] = row[i];
    }
    if (m == 0 && gpus_per_node > 0) {
      for (int64_t i = 0; i < n; ++i) {
        if (floor_div(floor_div(row[i], slots_per_gpu), gpus_per_node) == node) out[m++] = row[i];
      }
    }
    if (m == 0) m = std::copy(row, row + n, out) - out;
    count[e] = m;
  }
}

// Routes tokens [begin, end); returns false at the first id outside [0, experts).
template <typename id_t>
bool route_tokens(const id_t* ids, int64_t begin, int64_t end, int64_t top_k, int64_t experts,
                  int64_t width, const int64_t* slots, const int64_t* count, int64_t offset,
                  int64_t* out) {
  if (width <= kMaxCountedWidth) {
    int64_t next[kMaxCountedWidth + 1];  // next[n] = (t + offset) mod n for the current token t
    for (int64_t n = 1; n <= width; ++n) next[n] = floor_mod(begin + offset, n);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t j = t * top_k, stop = j + top_k; j < stop; ++j) {
        const int64_t e = static_cast<int64_t>(ids[j]);
        if (e < 0 || e >= experts) return false;
        out[j] = slots[e * width + next[count[e]]];
      }
      for (int64_t n = 1; n <= width; ++n) next[n] = next[n] + 1 == n ? 0 : next[n] + 1;
    }
    return true;
  }
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t j = t * top_k, stop = j + top_k; j < stop; ++j) {
      const int64_t e = static_cast<int64_t>(ids[j]);
      if (e < 0 || e >= experts) return false;
      out[j] = slots[e * width + floor_mod(t + offset, count[e])];
    }
  }
  return true;
}

at::Tensor route_replicas_cpu(const at::Tensor& topk_ids,  // [T, k] integer
                              const at::Tensor& log2phy,   // [E, X] int64, -1 padded
                              const at::Tensor& logcnt,    // [E] int64
                              int64_t token_offset, int64_t local_gpu, int64_t slots_per_gpu,
                              int64_t gpus_per_node) {
  check_route_replicas_args(topk_ids, log2phy, logcnt, local_gpu, slots_per_gpu);
  const at::Tensor ids = topk_ids.contiguous(), table = log2phy.contiguous(),
                   counts = logcnt.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1);
  const int64_t experts = table.size(0), width = table.size(1);
  at::Tensor out = at::empty({tokens, top_k}, ids.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const int64_t* phy = table.const_data_ptr<int64_t>();
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < experts; ++e) {
    TORCH_CHECK_VALUE(cnt[e] >= 1 && cnt[e] <= width, "logcnt must be in [1, ", width,
                      "] (the width of log2phy), got ", cnt[e], " for expert ", e);
  }
  std::vector<int64_t> local_slots, local_count;
  if (local_gpu >= 0) {
    local_slots.resize(experts * width);
    local_count.resize(experts);
    locality_candidates(phy, cnt, experts, width, local_gpu, slots_per_gpu, gpus_per_node,
                        local_slots.data(), local_count.data());
    phy = local_slots.data();
    cnt = local_count.data();
  }
  int64_t* op = out.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kPairsPerTask / std::max<int64_t>(top_k, 1));
  AT_DISPATCH_INTEGRAL_TYPES(ids.scalar_type(), "route_replicas", [&] {
    const scalar_t* id = ids.const_data_ptr<scalar_t>();
    std::atomic<bool> bad{false};
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      if (!route_tokens(id, begin, end, top_k, experts, width, phy, cnt, token_offset, op)) {
        bad.store(true, std::memory_order_relaxed);
      }
    });
    if (bad.load()) throw_expert_id_out_of_range(id, ids.numel(), experts);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) { m.impl("route_replicas", &route_replicas_cpu); }

}  // namespace deeppar
