// The layer loop shared by the CPU planner ops (deeppar::eplb_rebalance and
// eplb_rebalance_balanced): checks the op's arguments, allocates its three outputs and plans
// every layer of a [L, E] float32 weight with one row function, layers split over threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "cpu/eplb_rules.h"
#include "op_checks.h"

namespace deeppar {
namespace eplb_cpu {

// plan_row(weight row [E], shape, phy2log row [R], replica rank row [R], logcnt row [E],
// scratch) plans one layer; RowScratch is its per-thread scratch space. Layers are grouped into
// parallel tasks of about slots_per_task slots, so small batches stay on the calling thread.
template <typename RowScratch, typename PlanRow>
std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_layers(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus,
    int64_t slots_per_task, const char* op, PlanRow plan_row) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const at::Tensor w = weight.contiguous();
  const auto opts = w.options().dtype(at::kLong);
  at::Tensor phy2log = at::empty({layers, num_replicas}, opts);   // [L, R]
  at::Tensor phy_rank = at::empty({layers, num_replicas}, opts);  // [L, R]
  at::Tensor logcnt = at::empty({layers, experts}, opts);         // [L, E]
  const Shape sh{static_cast<int32_t>(experts), static_cast<int32_t>(num_replicas),
                 static_cast<int32_t>(num_groups), static_cast<int32_t>(num_nodes),
                 static_cast<int32_t>(num_gpus)};
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = phy2log.mutable_data_ptr<int64_t>();
  int64_t* rp = phy_rank.mutable_data_ptr<int64_t>();
  int64_t* cp = logcnt.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, slots_per_task / num_replicas);
  at::parallel_for(0, layers, grain, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t l = begin; l < end; ++l) {
      check_row(wp + l * experts, experts, op);
      plan_row(wp + l * experts, sh, pp + l * num_replicas, rp + l * num_replicas,
               cp + l * experts, scratch);
    }
  });
  return {phy2log, phy_rank, logcnt};
}

}  // namespace eplb_cpu
}  // namespace deeppar
