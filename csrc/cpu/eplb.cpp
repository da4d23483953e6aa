// CPU kernels of the EPLB planner (specs/eplb.md): deeppar::eplb_rebalance, eplb_pack,
// eplb_replicate, eplb_log2phy, and eplb_rebalance_maps (planner and log2phy in one op, the
// eager path of rebalance_experts). Rows are planned in parallel (at::parallel_for, or
// run_chunks for eplb_rebalance_maps); each row runs the spec's rules of eplb_rules.h.
// This file must not be compiled with -ffast-math.
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
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/eplb_layers.h"
#include "cpu/eplb_rules.h"
#include "op_checks.h"

namespace deeppar {
namespace {

using eplb_cpu::check_row;
using eplb_cpu::hierarchical_row;
using eplb_cpu::pack_row;
using eplb_cpu::replicate_row;
using eplb_cpu::Scratch;
using eplb_cpu::Shape;

// Slots planned per parallel task (rows are grouped up to this size).
constexpr int64_t kSlotsPerTask = 32768;

// log2phy elements written per parallel task.
constexpr int64_t kLog2PhyElementsPerTask = int64_t{1} << 20;

// eplb_rebalance_maps splits its work into chunks that a helper thread may claim (run_chunks):
// about 40 us of planning (a layer costs ~20 ns per slot), and 2 MiB of log2phy. Only batches
// of at least ~1.3 ms of planning (65536 slots) or 8 MiB of log2phy are split at all: below,
// a second thread saves at most a fraction of a millisecond, and on a busy machine a helper
// preempted in the middle of a chunk makes the call wait for it.
constexpr int64_t kSlotsPerChunk = 2048;
constexpr int64_t kMinSlotsToSplit = 65536;
constexpr int64_t kLog2PhyWordsPerChunk = int64_t{1} << 18;
constexpr int64_t kMinLog2PhyWordsToSplit = int64_t{1} << 20;

// A thread keeps its planning buffers (Scratch) between calls up to this many slots per layer:
// every thread that ran eplb_rebalance_maps (the caller and the inter-op pool's threads) then
// holds, for as long as it lives, about two dozen vectors of one to four words per expert or
// slot of the largest layer it planned, a few MiB at most. Larger layers free them after use.
constexpr int64_t kKeptScratchSlots = int64_t{1} << 16;

// Items per chunk for run_chunks: the whole range when the work is too small to split.
int64_t chunk_items(int64_t items, int64_t cost_per_item, int64_t chunk_cost, int64_t min_cost) {
  if (items * cost_per_item < min_cost) return std::max<int64_t>(items, 1);
  return std::max<int64_t>(chunk_cost / std::max<int64_t>(cost_per_item, 1), 1);
}

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat, op,
                    ": weight must be a float32 [rows, items] tensor");
  TORCH_CHECK_VALUE(weight.size(1) >= 1 && weight.size(1) < kMaxRowItems, op,
                    ": the number of items must be in [1, 2^24)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_cpu(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  // A layer takes ~4 us per 300 slots: below ~32k slots a second thread costs more than it saves
  // (and on a busy machine a late thread costs milliseconds), so small batches stay inline.
  return eplb_cpu::plan_layers<Scratch>(weight, num_replicas, num_groups, num_nodes, num_gpus,
                                        kSlotsPerTask, "eplb_rebalance",
                                        [](auto... row) { hierarchical_row(row...); });
}

std::tuple<at::Tensor, at::Tensor> eplb_pack_cpu(const at::Tensor& weight,  // [X, n] float32
                                                 int64_t num_packs) {
  check_weight(weight, "eplb_pack");
  const int64_t rows = weight.size(0), n = weight.size(1);
  TORCH_CHECK_VALUE(num_packs > 0 && n % num_packs == 0,
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
  TORCH_CHECK_VALUE(num_phy >= n && num_phy < kMaxRowItems,
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

// Fills log2phy rows [begin, end) ([L, E, width], -1 padded) from phy2log and replica ranks.
// Returns false if some replica's rank is >= width.
bool fill_log2phy(const int64_t* phy2log, const int64_t* rank, int64_t replicas, int64_t experts,
                  int64_t width, int64_t begin, int64_t end, int64_t* log2phy) {
  bool fits = true;
  const int64_t row = experts * width;
  for (int64_t l = begin; l < end; ++l) {
    int64_t* out = log2phy + l * row;
    std::memset(out, 0xff, static_cast<size_t>(row) * sizeof(int64_t));  // every word -1
    const int64_t* p = phy2log + l * replicas;
    const int64_t* r = rank + l * replicas;
    for (int64_t s = 0; s < replicas; ++s) {
      if (r[s] < width) {
        out[p[s] * width + r[s]] = s;
      } else {
        fits = false;
      }
    }
  }
  return fits;
}

// rebalance_experts' eager CPU path in one op: plans every layer (checking its loads), then
// builds log2phy of width max_replicas, or of the largest replica count when max_replicas is
// -1. One dispatch, no replica-rank tensor and no separate reduction for the width.
std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_maps_cpu(
    const at::Tensor& weight,  // [L, E] float32
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus,
    int64_t max_replicas) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  TORCH_CHECK_VALUE(max_replicas == -1 || max_replicas >= 1,
                    "eplb_rebalance_maps: max_replicas must be -1 (the largest count) or positive, "
                    "got ", max_replicas);
  const int64_t layers = weight.size(0), experts = weight.size(1), replicas = num_replicas;
  const at::Tensor w = weight.contiguous();
  const auto opts = w.options().dtype(at::kLong);
  at::Tensor phy2log = at::empty({layers, replicas}, opts);
  at::Tensor logcnt = at::empty({layers, experts}, opts);
  std::unique_ptr<int64_t[]> rank(new int64_t[static_cast<size_t>(layers * replicas)]);
  const Shape sh{static_cast<int32_t>(experts), static_cast<int32_t>(replicas),
                 static_cast<int32_t>(num_groups), static_cast<int32_t>(num_nodes),
                 static_cast<int32_t>(num_gpus)};
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = phy2log.mutable_data_ptr<int64_t>();
  int64_t* cp = logcnt.mutable_data_ptr<int64_t>();
  int64_t* rp = rank.get();
  std::atomic<int64_t> widest{0};
  const int64_t plan_grain = chunk_items(layers, replicas, kSlotsPerChunk, kMinSlotsToSplit);
  eplb_cpu::run_chunks(layers, plan_grain, [&](int64_t begin, int64_t end) {
    thread_local Scratch scratch;  // kept between calls: planning a row allocates nothing
    for (int64_t l = begin; l < end; ++l) {
      check_row(wp + l * experts, experts, "eplb_rebalance");
      hierarchical_row(wp + l * experts, sh, pp + l * replicas, rp + l * replicas,
                       cp + l * experts, scratch);
    }
    if (replicas > kKeptScratchSlots) scratch = Scratch{};  // do not hold huge buffers
    const int64_t most = *std::max_element(cp + begin * experts, cp + end * experts);
    int64_t seen = widest.load(std::memory_order_relaxed);
    while (most > seen && !widest.compare_exchange_weak(seen, most)) {
    }
  });
  const int64_t needed = widest.load();
  const int64_t width = max_replicas < 0 ? needed : max_replicas;
  TORCH_CHECK_VALUE(needed <= width, "max_replicas (", width,
                    ") is too small: an expert needs ", needed, " replicas");
  at::Tensor log2phy = at::empty({layers, experts, width}, opts);
  int64_t* lp = log2phy.mutable_data_ptr<int64_t>();
  const int64_t per_layer = experts * width + replicas;
  const int64_t fill_grain =
      chunk_items(layers, per_layer, kLog2PhyWordsPerChunk, kMinLog2PhyWordsToSplit);
  eplb_cpu::run_chunks(layers, fill_grain, [&](int64_t begin, int64_t end) {
    fill_log2phy(pp, rp, replicas, experts, width, begin, end, lp);
  });
  return {phy2log, log2phy, logcnt};
}

at::Tensor eplb_log2phy_cpu(const at::Tensor& phy2log,   // [L, R] int64
                            const at::Tensor& phy_rank,  // [L, R] int64
                            int64_t num_experts, int64_t width) {
  TORCH_CHECK_VALUE(phy2log.dim() == 2 && phy2log.scalar_type() == at::kLong &&
                        phy_rank.sizes() == phy2log.sizes() && phy_rank.scalar_type() == at::kLong,
                    "eplb_log2phy: phy2log and phy_rank must be int64 [layers, replicas] tensors");
  TORCH_CHECK_VALUE(num_experts >= 1 && width >= 0, "eplb_log2phy: num_experts (", num_experts,
                    ") must be >= 1 and width (", width, ") >= 0");
  const at::Tensor p = phy2log.contiguous(), r = phy_rank.contiguous();
  const int64_t layers = p.size(0), replicas = p.size(1), row = num_experts * width;
  at::Tensor out = at::empty({layers, num_experts, width}, p.options());
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* rp = r.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  // Memory-bound and cheap per element: waking the thread pool only pays off for large rows.
  const int64_t per_layer = std::max<int64_t>(row + replicas, 1);
  const int64_t grain = std::max<int64_t>(1, kLog2PhyElementsPerTask / per_layer);
  std::atomic<bool> invalid{false}, too_narrow{false};
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
        if (k < width) {
          o[e * width + k] = s;
        } else {
          too_narrow.store(true, std::memory_order_relaxed);
        }
      }
    }
  });
  TORCH_CHECK_VALUE(!invalid.load(), "eplb_log2phy: phy2log/phy_rank hold an invalid slot entry");
  // Checked here rather than by the caller, so that a compiled sync-free plan on CPU needs no
  // extra reduction (Inductor would run it as an OpenMP region).
  TORCH_CHECK_VALUE(!too_narrow.load(), "an expert needs more replicas than max_replicas (",
                    width, ")");
  return out;
}

}  // namespace

std::string eplb_cpu_features() {
#ifdef DEEPPAR_EPLB_AVX512
  if (eplb_cpu::avx512_rank_sort()) return "avx512";
#endif
  return "portable";
}

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_log2phy", &eplb_log2phy_cpu);
  m.impl("eplb_rebalance", &eplb_rebalance_cpu);
  m.impl("eplb_rebalance_maps", &eplb_rebalance_maps_cpu);
  m.impl("eplb_pack", &eplb_pack_cpu);
  m.impl("eplb_replicate", &eplb_replicate_cpu);
}

}  // namespace deeppar
