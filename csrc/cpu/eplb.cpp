// CPU kernels of the EPLB planner (specs/eplb.md): deeppar::eplb_rebalance, eplb_pack,
// eplb_replicate. Rows are planned in parallel with at::parallel_for; each row runs the spec's
// rules with heaps (replication, packing) and one sort per packing. Float32 arithmetic only, in
// the spec's order: this file must not be compiled with -ffast-math.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "op_checks.h"

namespace deeppar {
namespace {

// Packings with at most this many packs scan them linearly; more use a heap.
constexpr int32_t kLinearPacks = 16;

// Slots planned per parallel task (rows are grouped up to this size).
constexpr int64_t kSlotsPerTask = 32768;

// log2phy elements written per parallel task.
constexpr int64_t kLog2PhyElementsPerTask = int64_t{1} << 20;

// Reusable per-thread buffers, so that planning a row allocates nothing.
struct Scratch {
  std::vector<uint64_t> keys;        // items sorted heaviest first: (~float bits, index)
  std::vector<int32_t> pack_items;   // items held by each pack
  std::vector<float> pack_weight;    // accumulated weight of each pack
  std::vector<int32_t> pack_heap;    // packs with room, min-heap on (weight, index)
  std::vector<int32_t> rep_heap;     // experts, max-heap on (weight/count, -count, -index)
  std::vector<float> rep_ratio;      // weight/count of each expert
  std::vector<int32_t> rep_count;    // replicas of each expert
  // Hierarchical policy.
  std::vector<float> group_load;
  std::vector<int32_t> group_pack, group_rank, mlog2log;
  std::vector<float> node_weight, replica_load;
  std::vector<int32_t> slot_expert, slot_rank, gpu, rank_in_gpu;
};

// Balanced packing of n items into m packs of n/m items (spec "Balanced packing").
void pack_row(const float* w, int32_t n, int32_t m, int32_t* pack, int32_t* rank, Scratch& s) {
  const int32_t per_pack = n / m;
  if (per_pack == 1) {
    for (int32_t i = 0; i < n; ++i) {
      pack[i] = i;
      rank[i] = 0;
    }
    return;
  }
  // Heaviest first; equal weights: lowest index first. Non-negative float bits order like the
  // floats (+0.0f turns -0.0 into +0.0), so one sort of packed 64-bit keys does it.
  s.keys.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    uint32_t bits;
    const float v = w[i] + 0.0f;
    std::memcpy(&bits, &v, sizeof(bits));
    s.keys[i] = (static_cast<uint64_t>(~bits) << 32) | static_cast<uint32_t>(i);
  }
  std::sort(s.keys.begin(), s.keys.end());
  s.pack_weight.assign(m, 0.0f);
  s.pack_items.assign(m, 0);
  if (m <= kLinearPacks) {
    // Few packs: scan the packs that still have room, kept in increasing index order; strict
    // "<" keeps the lowest index among equal weights.
    s.pack_heap.resize(m);
    for (int32_t p = 0; p < m; ++p) s.pack_heap[p] = p;
    int32_t open = m;
    for (int32_t k = 0; k < n; ++k) {
      const int32_t item = static_cast<int32_t>(s.keys[k] & 0xffffffffu);
      int32_t best = 0;
      float best_w = s.pack_weight[s.pack_heap[0]];
      for (int32_t q = 1; q < open; ++q) {
        const float pw = s.pack_weight[s.pack_heap[q]];
        if (pw < best_w) {
          best_w = pw;
          best = q;
        }
      }
      const int32_t p = s.pack_heap[best];
      pack[item] = p;
      rank[item] = s.pack_items[p];
      s.pack_weight[p] += w[item];
      if (++s.pack_items[p] == per_pack) {
        for (int32_t q = best + 1; q < open; ++q) s.pack_heap[q - 1] = s.pack_heap[q];
        --open;
      }
    }
    return;
  }
  // Many packs: min-heap of the packs with room keyed by (weight, index). Pack weights only
  // grow, so the chosen pack goes back in after its update (or leaves the heap once full).
  auto lighter = [&s](int32_t a, int32_t b) {  // "a after b" for std heap (max-heap API)
    const float wa = s.pack_weight[a], wb = s.pack_weight[b];
    return wa > wb || (wa == wb && a > b);
  };
  s.pack_heap.resize(m);
  for (int32_t p = 0; p < m; ++p) s.pack_heap[p] = p;  // all weights 0: already a valid heap
  for (int32_t k = 0; k < n; ++k) {
    const int32_t item = static_cast<int32_t>(s.keys[k] & 0xffffffffu);
    std::pop_heap(s.pack_heap.begin(), s.pack_heap.end(), lighter);
    const int32_t p = s.pack_heap.back();
    pack[item] = p;
    rank[item] = s.pack_items[p];
    s.pack_weight[p] += w[item];
    if (++s.pack_items[p] < per_pack) {
      std::push_heap(s.pack_heap.begin(), s.pack_heap.end(), lighter);
    } else {
      s.pack_heap.pop_back();
    }
  }
}

// Replication of n experts into k >= n slots (spec "Replication").
void replicate_row(const float* w, int32_t n, int32_t k, int32_t* slot_expert, int32_t* slot_rank,
                   int32_t* count, Scratch& s) {
  for (int32_t i = 0; i < n; ++i) {
    slot_expert[i] = i;
    slot_rank[i] = 0;
    count[i] = 1;
  }
  if (k == n) return;
  s.rep_ratio.resize(n);
  s.rep_heap.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    s.rep_ratio[i] = w[i];  // w / 1
    s.rep_heap[i] = i;
  }
  // "a below b": b has the larger ratio, or the same ratio and fewer replicas, or the same
  // ratio and count and a lower index.
  auto below = [&s, count](int32_t a, int32_t b) {
    const float ra = s.rep_ratio[a], rb = s.rep_ratio[b];
    if (ra != rb) return ra < rb;
    if (count[a] != count[b]) return count[a] > count[b];
    return a > b;
  };
  std::make_heap(s.rep_heap.begin(), s.rep_heap.end(), below);
  for (int32_t j = n; j < k; ++j) {
    std::pop_heap(s.rep_heap.begin(), s.rep_heap.end(), below);
    const int32_t e = s.rep_heap.back();
    slot_expert[j] = e;
    slot_rank[j] = count[e];
    count[e] += 1;
    s.rep_ratio[e] = w[e] / static_cast<float>(count[e]);
    std::push_heap(s.rep_heap.begin(), s.rep_heap.end(), below);
  }
}

// The spec's rules assume finite non-negative loads (a NaN would break the sort's ordering).
void check_row(const float* w, int64_t n, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(w[i] >= 0.0f && w[i] <= std::numeric_limits<float>::max(), op,
                ": weight must hold finite non-negative loads, got ", w[i]);
  }
}

struct Shape {
  int32_t experts, replicas, groups, nodes, gpus;
};

// Hierarchical policy for one layer (spec "Hierarchical policy").
void hierarchical_row(const float* w, const Shape& sh, int64_t* phy2log, int64_t* phy_rank,
                      int64_t* logcnt, Scratch& s) {
  const int32_t group_size = sh.experts / sh.groups;
  const int32_t groups_per_node = sh.groups / sh.nodes;
  const int32_t experts_per_node = sh.experts / sh.nodes;
  const int32_t slots_per_node = sh.replicas / sh.nodes;
  const int32_t gpus_per_node = sh.gpus / sh.nodes;
  const int32_t slots_per_gpu = sh.replicas / sh.gpus;

  // Step 1: group loads, left to right in float32, packed onto nodes.
  s.group_load.resize(sh.groups);
  for (int32_t g = 0; g < sh.groups; ++g) {
    float total = 0.0f;
    for (int32_t i = 0; i < group_size; ++i) total += w[g * group_size + i];
    s.group_load[g] = total;
  }
  s.group_pack.resize(sh.groups);
  s.group_rank.resize(sh.groups);
  pack_row(s.group_load.data(), sh.groups, sh.nodes, s.group_pack.data(), s.group_rank.data(), s);

  // Step 2: node-major order.
  s.mlog2log.resize(sh.experts);
  for (int32_t g = 0; g < sh.groups; ++g) {
    const int32_t base = (s.group_pack[g] * groups_per_node + s.group_rank[g]) * group_size;
    for (int32_t i = 0; i < group_size; ++i) s.mlog2log[base + i] = g * group_size + i;
  }

  s.node_weight.resize(experts_per_node);
  s.rep_count.resize(experts_per_node);
  s.slot_expert.resize(slots_per_node);
  s.slot_rank.resize(slots_per_node);
  s.replica_load.resize(slots_per_node);
  s.gpu.resize(slots_per_node);
  s.rank_in_gpu.resize(slots_per_node);
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = s.mlog2log.data() + node * experts_per_node;
    for (int32_t i = 0; i < experts_per_node; ++i) s.node_weight[i] = w[node_log[i]];
    // Step 3: replicate within the node.
    int32_t* count = s.rep_count.data();
    replicate_row(s.node_weight.data(), experts_per_node, slots_per_node, s.slot_expert.data(),
                  s.slot_rank.data(), count, s);
    // Step 4: pack the node's replicas onto its GPUs.
    for (int32_t j = 0; j < slots_per_node; ++j) {
      const int32_t e = s.slot_expert[j];
      s.replica_load[j] = s.node_weight[e] / static_cast<float>(count[e]);
    }
    pack_row(s.replica_load.data(), slots_per_node, gpus_per_node, s.gpu.data(),
             s.rank_in_gpu.data(), s);
    // Step 5: physical slots.
    for (int32_t j = 0; j < slots_per_node; ++j) {
      const int32_t slot = node * slots_per_node + s.gpu[j] * slots_per_gpu + s.rank_in_gpu[j];
      phy2log[slot] = node_log[s.slot_expert[j]];
      phy_rank[slot] = s.slot_rank[j];
    }
    for (int32_t i = 0; i < experts_per_node; ++i) logcnt[node_log[i]] = count[i];
  }
}

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, op,
              ": weight must be a float32 [rows, items] tensor");
  TORCH_CHECK(weight.size(1) >= 1 && weight.size(1) < (int64_t{1} << 24), op,
              ": the number of items must be in [1, 2^24)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_cpu(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const at::Tensor w = weight.contiguous();
  const auto opts = w.options().dtype(at::kLong);
  at::Tensor phy2log = at::empty({layers, num_replicas}, opts);
  at::Tensor phy_rank = at::empty({layers, num_replicas}, opts);
  at::Tensor logcnt = at::empty({layers, experts}, opts);
  const Shape sh{static_cast<int32_t>(experts), static_cast<int32_t>(num_replicas),
                 static_cast<int32_t>(num_groups), static_cast<int32_t>(num_nodes),
                 static_cast<int32_t>(num_gpus)};
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = phy2log.mutable_data_ptr<int64_t>();
  int64_t* rp = phy_rank.mutable_data_ptr<int64_t>();
  int64_t* cp = logcnt.mutable_data_ptr<int64_t>();
  // A layer takes ~4 us per 300 slots: below ~32k slots a second thread costs more than it saves
  // (and on a busy machine a late thread costs milliseconds), so small batches stay inline.
  const int64_t grain = std::max<int64_t>(1, kSlotsPerTask / num_replicas);
  at::parallel_for(0, layers, grain, [&](int64_t begin, int64_t end) {
    Scratch s;
    for (int64_t l = begin; l < end; ++l) {
      check_row(wp + l * experts, experts, "eplb_rebalance");
      hierarchical_row(wp + l * experts, sh, pp + l * num_replicas, rp + l * num_replicas,
                       cp + l * experts, s);
    }
  });
  return {phy2log, phy_rank, logcnt};
}

std::tuple<at::Tensor, at::Tensor> eplb_pack_cpu(const at::Tensor& weight,  // [X, n] float32
                                                 int64_t num_packs) {
  check_weight(weight, "eplb_pack");
  const int64_t rows = weight.size(0), n = weight.size(1);
  TORCH_CHECK(num_packs > 0 && n % num_packs == 0,
              "eplb_pack: the number of items must be a positive multiple of num_packs");
  const at::Tensor w = weight.contiguous();
  const auto opts = w.options().dtype(at::kLong);
  at::Tensor pack = at::empty({rows, n}, opts), rank = at::empty({rows, n}, opts);
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = pack.mutable_data_ptr<int64_t>();
  int64_t* rp = rank.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    std::vector<int32_t> p(n), r(n);
    for (int64_t x = begin; x < end; ++x) {
      check_row(wp + x * n, n, "eplb_pack");
      pack_row(wp + x * n, static_cast<int32_t>(n), static_cast<int32_t>(num_packs), p.data(),
               r.data(), s);
      std::copy(p.begin(), p.end(), pp + x * n);
      std::copy(r.begin(), r.end(), rp + x * n);
    }
  });
  return {pack, rank};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_replicate_cpu(
    const at::Tensor& weight,  // [X, n] float32
    int64_t num_phy) {
  check_weight(weight, "eplb_replicate");
  const int64_t rows = weight.size(0), n = weight.size(1);
  TORCH_CHECK(num_phy >= n && num_phy < (int64_t{1} << 24),
              "eplb_replicate: num_phy must be in [items, 2^24)");
  const at::Tensor w = weight.contiguous();
  const auto opts = w.options().dtype(at::kLong);
  at::Tensor phy2log = at::empty({rows, num_phy}, opts), rank = at::empty({rows, num_phy}, opts);
  at::Tensor logcnt = at::empty({rows, n}, opts);
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = phy2log.mutable_data_ptr<int64_t>();
  int64_t* rp = rank.mutable_data_ptr<int64_t>();
  int64_t* cp = logcnt.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Scratch s;
    std::vector<int32_t> e(num_phy), r(num_phy), c(n);
    for (int64_t x = begin; x < end; ++x) {
      check_row(wp + x * n, n, "eplb_replicate");
      replicate_row(wp + x * n, static_cast<int32_t>(n), static_cast<int32_t>(num_phy), e.data(),
                    r.data(), c.data(), s);
      std::copy(e.begin(), e.end(), pp + x * num_phy);
      std::copy(r.begin(), r.end(), rp + x * num_phy);
      std::copy(c.begin(), c.end(), cp + x * n);
    }
  });
  return {phy2log, rank, logcnt};
}

at::Tensor eplb_log2phy_cpu(const at::Tensor& phy2log,   // [L, R] int64
                            const at::Tensor& phy_rank,  // [L, R] int64
                            int64_t num_experts, int64_t width) {
  TORCH_CHECK(phy2log.dim() == 2 && phy2log.scalar_type() == at::kLong &&
                  phy_rank.sizes() == phy2log.sizes() && phy_rank.scalar_type() == at::kLong,
              "eplb_log2phy: phy2log and phy_rank must be int64 [layers, replicas] tensors");
  TORCH_CHECK(num_experts >= 1 && width >= 0, "eplb_log2phy: bad sizes");
  const at::Tensor p = phy2log.contiguous(), r = phy_rank.contiguous();
  const int64_t layers = p.size(0), replicas = p.size(1), row = num_experts * width;
  at::Tensor out = at::empty({layers, num_experts, width}, p.options());
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  // Memory-bound and cheap per element: waking the thread pool only pays off for large rows.
  const int64_t per_layer = std::max<int64_t>(row + replicas, 1);
  const int64_t grain = std::max<int64_t>(1, kLog2PhyElementsPerTask / per_layer);
  std::atomic<bool> invalid{false};
  at::parallel_for(0, layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      int64_t* o = op + l * row;
      std::fill(o, o + row, int64_t{-1});
      for (int64_t s = 0; s < replicas; ++s) {
        const int64_t e = pp[l * replicas + s], k = rp[l * replicas + s];
        if (e < 0 || e >= num_experts || k < 0) {
          invalid.store(true, std::memory_order_relaxed);
          continue;
        }
        if (k < width) o[e * width + k] = s;  // replicas beyond width: dropped, caller checks
      }
    }
  });
  TORCH_CHECK(!invalid.load(), "eplb_log2phy: phy2log/phy_rank hold an invalid slot entry");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_log2phy", &eplb_log2phy_cpu);
  m.impl("eplb_rebalance", &eplb_rebalance_cpu);
  m.impl("eplb_pack", &eplb_pack_cpu);
  m.impl("eplb_replicate", &eplb_replicate_cpu);
}

}  // namespace deeppar
