// Argument checks shared by the CPU and CUDA kernels of each op, so both reject the same inputs
// with the same messages.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

namespace deeppar {

// Memory safety only: the EPLB kernels index rows with int32 and compute sizes up to about 16
// words per item (the CUDA shared-memory layout) and 8 * slots + 64 (the round limit of
// cuda/eplb_balanced_kernel.cuh), so rows
// stay below 2^24 items, far from int32 overflow. The planner's size limits, and why, are
// deeppar.eplb._validate.PlannerLimits, checked in Python before any kernel runs.
constexpr int64_t kMaxRowItems = int64_t{1} << 24;

// Memory bound of the migration kernels (eplb_migrate.h): the search keeps four dense
// [gpus, experts] int32 tables per thread and the relabelling a [gpus, gpus] one, so
// gpus * max(experts, gpus) stays below 2^24 (at most 256 MiB of tables per thread).
// deeppar.eplb._validate.PlannerLimits.migration_table_below is the same limit, checked first.
constexpr int64_t kMaxMigrationTableItems = int64_t{1} << 24;

// slot_loads(weight [L, E] float32, phy2log [L, R] int64, logcnt [L, E] int64)
inline void check_slot_loads_args(const at::Tensor& weight, const at::Tensor& phy2log,
                                  const at::Tensor& logcnt) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
                    "slot_loads: weight must be a float32 [layers, experts] tensor");
  TORCH_CHECK_VALUE(phy2log.dim() == 2 && phy2log.scalar_type() == at::kLong &&
                        phy2log.size(0) == weight.size(0),
                    "slot_loads: phy2log must be an int64 [layers, replicas] tensor");
  TORCH_CHECK_VALUE(logcnt.sizes() == weight.sizes() && logcnt.scalar_type() == at::kLong,
                    "slot_loads: logcnt must be an int64 tensor shaped like weight");
}

// eplb_rebalance(weight [L, E] float32, R, G, N, P): the spec's divisibility rules, and row
// sizes below kMaxRowItems.
inline void check_eplb_rebalance_args(const at::Tensor& weight, int64_t num_replicas,
                                      int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
                    "eplb_rebalance: weight must be a float32 [layers, experts] tensor");
  const int64_t experts = weight.size(1);
  TORCH_CHECK_VALUE(experts >= 1 && experts < kMaxRowItems,
                    "eplb_rebalance: the number of experts must be in [1, 2^24)");
  TORCH_CHECK_VALUE(num_groups > 0 && num_nodes > 0 && num_gpus > 0 && num_replicas > 0,
                    "eplb_rebalance: num_replicas, num_groups, num_nodes and num_gpus must be "
                    "positive");
  TORCH_CHECK_VALUE(experts % num_groups == 0, "eplb_rebalance: experts (", experts,
                    ") must be a multiple of num_groups (", num_groups, ")");
  TORCH_CHECK_VALUE(num_groups % num_nodes == 0, "eplb_rebalance: num_groups (", num_groups,
                    ") must be a multiple of num_nodes (", num_nodes, ")");
  TORCH_CHECK_VALUE(num_gpus % num_nodes == 0, "eplb_rebalance: num_gpus (", num_gpus,
                    ") must be a multiple of num_nodes (", num_nodes, ")");
  TORCH_CHECK_VALUE(num_replicas % num_gpus == 0, "eplb_rebalance: num_replicas (", num_replicas,
                    ") must be a multiple of num_gpus (", num_gpus, ")");
  TORCH_CHECK_VALUE(num_replicas >= experts && num_replicas < kMaxRowItems,
                    "eplb_rebalance: num_replicas (", num_replicas, ") must be in [experts, 2^24)");
  TORCH_CHECK_VALUE(weight.size(0) < (int64_t{1} << 31), "eplb_rebalance: too many layers");
}

// The outputs of every eplb_rebalance backend, int64 on weight's device: phy2log [L, R],
// replica rank [L, R] and logcnt [L, E].
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_plan_maps(const at::Tensor& weight,
                                                                      int64_t num_replicas) {
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const auto opts = weight.options().dtype(at::kLong);
  return {at::empty({layers, num_replicas}, opts), at::empty({layers, num_replicas}, opts),
          at::empty({layers, experts}, opts)};
}

}  // namespace deeppar

namespace deeppar {

// moe_permute(x [T, H] floating, topk_ids [T, k] int64, E, R, num_sms): expert ids are checked
// by the kernels themselves (CPU) or by the Python wrapper (GPU).
inline void check_moe_permute_args(const at::Tensor& x, const at::Tensor& topk_ids,
                                   int64_t num_experts, int64_t num_ranks, int64_t num_sms) {
  TORCH_CHECK_VALUE(x.dim() == 2 && at::isFloatingType(x.scalar_type()),
                    "moe_permute: x must be a floating-point [tokens, hidden] tensor");
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.scalar_type() == at::kLong &&
                        topk_ids.size(0) == x.size(0),
                    "moe_permute: topk_ids must be an int64 [tokens, top_k] tensor matching x");
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts < (int64_t{1} << 31),
                    "moe_permute: num_experts must be in [1, 2^31)");
  TORCH_CHECK_VALUE(num_ranks >= 1 && num_experts % num_ranks == 0,
                    "moe_permute: num_ranks must divide num_experts");
  TORCH_CHECK_VALUE(num_sms >= 0, "moe_permute: num_sms must be >= 0");
  TORCH_CHECK_VALUE(x.device() == topk_ids.device(),
                    "moe_permute: x and topk_ids on different devices");
}

// moe_unpermute(y [T*k, H] floating, pos [T, k] int64, weights [T, k] floating, num_sms)
inline void check_moe_unpermute_args(const at::Tensor& y, const at::Tensor& pos,
                                     const at::Tensor& weights, int64_t num_sms) {
  TORCH_CHECK_VALUE(y.dim() == 2 && at::isFloatingType(y.scalar_type()),
                    "moe_unpermute: y must be a floating-point [tokens * top_k, hidden] tensor");
  TORCH_CHECK_VALUE(pos.dim() == 2 && pos.scalar_type() == at::kLong && pos.numel() == y.size(0),
                    "moe_unpermute: pos must be an int64 [tokens, top_k] tensor with one entry per "
                    "row of y");
  TORCH_CHECK_VALUE(weights.sizes() == pos.sizes() && at::isFloatingType(weights.scalar_type()),
                    "moe_unpermute: weights must be a floating-point tensor shaped like pos");
  TORCH_CHECK_VALUE(num_sms >= 0, "moe_unpermute: num_sms must be >= 0");
  TORCH_CHECK_VALUE(y.device() == pos.device() && y.device() == weights.device(),
                    "moe_unpermute: y, pos and weights on different devices");
}

}  // namespace deeppar

namespace deeppar {

// route_replicas(topk_ids [T, k] integer, log2phy [E, X] int64, logcnt [E] int64, offset,
// local_gpu (< 0: no locality), slots_per_gpu, gpus_per_node (<= 0: no node tier)): value
// checks (ids, logcnt) are made by the kernels, which read every value anyway.
inline void check_route_replicas_args(const at::Tensor& topk_ids, const at::Tensor& log2phy,
                                      const at::Tensor& logcnt, int64_t local_gpu,
                                      int64_t slots_per_gpu) {
  TORCH_CHECK_TYPE(topk_ids.dim() == 2 && at::isIntegralType(topk_ids.scalar_type(), false),
                   "route_replicas: topk_ids must be an integer [tokens, k] tensor");
  TORCH_CHECK_VALUE(log2phy.dim() == 2 && log2phy.size(1) >= 1 &&
                        log2phy.scalar_type() == at::kLong,
                    "route_replicas: log2phy must be an int64 [experts, max_replicas] tensor");
  TORCH_CHECK_VALUE(logcnt.dim() == 1 && logcnt.size(0) == log2phy.size(0) &&
                        logcnt.scalar_type() == at::kLong,
                    "route_replicas: logcnt must be an int64 [experts] tensor");
  TORCH_CHECK_VALUE(local_gpu < 0 || slots_per_gpu >= 1,
                    "route_replicas: slots_per_gpu must be positive with local_gpu");
  TORCH_CHECK_VALUE(topk_ids.device() == log2phy.device() && topk_ids.device() == logcnt.device(),
                    "route_replicas: topk_ids, log2phy and logcnt on different devices");
}

// expert_counts_add_(counts [R, E] int64 contiguous, topk_ids integer with R rows' worth of ids):
// ids are range-checked by the kernels.
inline void check_expert_counts_add_args(const at::Tensor& counts, const at::Tensor& topk_ids) {
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) >= 1 && counts.size(1) >= 1 &&
                        counts.scalar_type() == at::kLong && counts.is_contiguous(),
                    "expert_counts_add_: counts must be a contiguous int64 [rows, experts] tensor");
  TORCH_CHECK_TYPE(at::isIntegralType(topk_ids.scalar_type(), false),
                   "expert_counts_add_: topk_ids must be an integer tensor");
  TORCH_CHECK_VALUE(topk_ids.numel() % counts.size(0) == 0,
                    "expert_counts_add_: topk_ids must hold the same number of ids per row of "
                    "counts");
  TORCH_CHECK_VALUE(counts.device() == topk_ids.device(),
                    "expert_counts_add_: counts and topk_ids on different devices");
}

// The error of route_replicas and expert_counts_add_ for host ids [numel] outside [0, experts), once a
// kernel has found one: names the smallest id if negative, else the largest, as the Python-side
// checks of the other backends do.
template <typename id_t>
[[noreturn]] void throw_expert_id_out_of_range(const id_t* ids, int64_t numel, int64_t experts) {
  int64_t low = static_cast<int64_t>(ids[0]), high = low;
  for (int64_t i = 1; i < numel; ++i) {
    const int64_t v = static_cast<int64_t>(ids[i]);
    low = v < low ? v : low;
    high = v > high ? v : high;
  }
  TORCH_CHECK_VALUE(false, "topk_ids holds expert id ", low < 0 ? low : high, ", outside [0, ",
                    experts, ")");
  __builtin_unreachable();
}

}  // namespace deeppar
