// CPU kernels of migration-aware EPLB (deeppar.eplb.migrate): the warm-start search, the GPU
// relabelling of a plan and the transfer plan, each a loop over layers (eplb_migrate.h holds
// the per-layer rules), layers split over threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/eplb_migrate.h"
#include "op_checks.h"

namespace deeppar {
namespace {

using eplb_migrate::MigrateScratch;
using eplb_migrate::MigrateShape;
using eplb_migrate::RelabelScratch;
using eplb_migrate::SourceScratch;

// Two placements [L, R] int64 of experts in [0, experts), R a multiple of gpus, gpus of nodes,
// small enough for the per-thread tables (kMaxMigrationTableItems).
void check_placements(const char* op, const at::Tensor& a, const at::Tensor& b, int64_t experts,
                      int64_t num_gpus, int64_t num_nodes) {
  TORCH_CHECK_VALUE(a.dim() == 2 && a.scalar_type() == at::kLong && b.sizes() == a.sizes() &&
                        b.scalar_type() == at::kLong,
                    op, ": placements must be two int64 [layers, replicas] tensors of one shape");
  TORCH_CHECK_VALUE(experts >= 1 && experts < kMaxRowItems && a.size(1) < kMaxRowItems, op,
                    ": sizes must be below 2^24");
  TORCH_CHECK_VALUE(num_gpus > 0 && num_nodes > 0 && num_gpus % num_nodes == 0 &&
                        a.size(1) % num_gpus == 0 && a.size(1) >= num_gpus,
                    op, ": replicas (", a.size(1), ") must be a multiple of num_gpus (", num_gpus,
                    "), num_gpus a multiple of num_nodes (", num_nodes, ")");
  TORCH_CHECK_VALUE(num_gpus * std::max(experts, num_gpus) < kMaxMigrationTableItems, op,
                    ": num_gpus (", num_gpus, ") * max(experts (", experts,
                    "), num_gpus) must be below ", kMaxMigrationTableItems,
                    " (the size of the per-thread tables)");
  for (const at::Tensor* t : {&a, &b}) {
    if (t->numel() == 0) continue;
    const int64_t lo = t->min().item<int64_t>(), hi = t->max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < experts, op, ": placements must hold experts in [0, ",
                      experts, "), found ", lo < 0 ? lo : hi);
  }
}

int64_t experts_of(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 1;
  return std::max(a.max().item<int64_t>(), b.max().item<int64_t>()) + 1;
}

// The shape shared by eplb_relabel and eplb_source_slots: checks the placements, then fills an
// [L, R] int64 result with row(old_row, plan_row, replicas, experts, layer, out_row, scratch),
// layers split over threads, one RowScratch per thread.
template <typename RowScratch, typename Row>
at::Tensor map_placement_rows(const char* op_name, const at::Tensor& current,
                              const at::Tensor& plan, int64_t num_gpus, int64_t num_nodes,
                              const Row& row) {
  const int64_t experts = experts_of(current, plan);
  check_placements(op_name, current, plan, experts, num_gpus, num_nodes);
  const at::Tensor old = current.contiguous(), p = plan.contiguous();
  const int64_t layers = old.size(0), replicas = old.size(1);
  at::Tensor out = at::empty({layers, replicas}, old.options());
  const int64_t* op = old.const_data_ptr<int64_t>();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t l = begin; l < end; ++l) {
      row(op + l * replicas, pp + l * replicas, static_cast<int32_t>(replicas),
          static_cast<int32_t>(experts), l, dst + l * replicas, scratch);
    }
  });
  return out;
}

at::Tensor eplb_relabel_cpu(const at::Tensor& current,  // [L, R] int64
                            const at::Tensor& plan,     // [L, R] int64
                            int64_t num_gpus, int64_t num_nodes) {
  return map_placement_rows<RelabelScratch>(
      "eplb_relabel", current, plan, num_gpus, num_nodes,
      [&](const int64_t* old_row, const int64_t* plan_row, int32_t replicas, int32_t experts,
          int64_t, int64_t* out, RelabelScratch& r) {
        eplb_migrate::relabel_row(old_row, plan_row, replicas, experts,
                                  static_cast<int32_t>(num_gpus),
                                  static_cast<int32_t>(num_nodes), out, r);
      });
}

// Per thread: the transfer plan's scratch and which experts the current row holds.
struct SourceRowScratch {
  SourceScratch source;
  std::vector<int32_t> held;
};

at::Tensor eplb_source_slots_cpu(const at::Tensor& current,  // [L, R] int64, covers experts
                                 const at::Tensor& plan,     // [L, R] int64
                                 int64_t num_gpus, int64_t num_nodes) {
  return map_placement_rows<SourceRowScratch>(
      "eplb_source_slots", current, plan, num_gpus, num_nodes,
      [&](const int64_t* old_row, const int64_t* plan_row, int32_t replicas, int32_t experts,
          int64_t layer, int64_t* out, SourceRowScratch& t) {
        t.held.assign(experts, 0);
        for (int32_t s = 0; s < replicas; ++s) t.held[old_row[s]] = 1;
        for (int32_t s = 0; s < replicas; ++s) {
          TORCH_CHECK_VALUE(t.held[plan_row[s]], "eplb_source_slots: plan's layer ", layer,
                            " needs expert ", plan_row[s],
                            ", which the current placement does not hold");
        }
        eplb_migrate::source_row(old_row, plan_row, replicas, experts,
                                 static_cast<int32_t>(num_gpus), static_cast<int32_t>(num_nodes),
                                 out, t.source);
      });
}

std::tuple<at::Tensor, at::Tensor> eplb_migrate_cpu(
    const at::Tensor& weight,   // [L, E] float32, finite, non-negative
    const at::Tensor& current,  // [L, R] int64, every expert in every layer
    const at::Tensor& fresh,    // [L, R] int64, a plan at most target, relabelled to current
    const at::Tensor& target,   // [L] float64, max GPU load to reach
    const at::Tensor& cap,      // [L] float64, replica load bound when counts are chosen
    int64_t num_groups, int64_t num_nodes, int64_t num_gpus, int64_t max_steps) {
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.scalar_type() == at::kFloat,
                    "eplb_migrate: weight must be a float32 [layers, experts] tensor");
  const int64_t layers = weight.size(0), experts = weight.size(1);
  check_placements("eplb_migrate", current, fresh, experts, num_gpus, num_nodes);
  TORCH_CHECK_VALUE(current.size(0) == layers, "eplb_migrate: current has ", current.size(0),
                    " layers, weight ", layers);
  TORCH_CHECK_VALUE(current.size(1) >= experts, "eplb_migrate: replicas (", current.size(1),
                    ") must be at least experts (", experts, ")");
  TORCH_CHECK_VALUE(num_groups > 0 && experts % num_groups == 0 && num_groups % num_nodes == 0,
                    "eplb_migrate: experts (", experts, ") must be a multiple of num_groups (",
                    num_groups, "), num_groups of num_nodes (", num_nodes, ")");
  for (const at::Tensor* t : {&target, &cap}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == layers && t->scalar_type() == at::kDouble,
                      "eplb_migrate: target and cap must be float64 [layers] tensors");
  }
  TORCH_CHECK_VALUE(max_steps >= 0 && max_steps < (int64_t{1} << 31),
                    "eplb_migrate: max_steps must be in [0, 2^31), got ", max_steps);
  const at::Tensor w = weight.contiguous(), old = current.contiguous(), f = fresh.contiguous();
  const at::Tensor tg = target.contiguous(), cp = cap.contiguous();
  const int64_t replicas = old.size(1);
  at::Tensor out = at::empty({layers, replicas}, old.options());
  at::Tensor reached = at::empty({layers}, old.options().dtype(at::kBool));
  const MigrateShape sh{static_cast<int32_t>(experts), static_cast<int32_t>(replicas),
                        static_cast<int32_t>(num_groups), static_cast<int32_t>(num_nodes),
                        static_cast<int32_t>(num_gpus)};
  const float* wp = w.const_data_ptr<float>();
  const int64_t* op = old.const_data_ptr<int64_t>();
  const int64_t* fp = f.const_data_ptr<int64_t>();
  const double* tp = tg.const_data_ptr<double>();
  const double* capp = cp.const_data_ptr<double>();
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  bool* ok = reached.mutable_data_ptr<bool>();
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    MigrateScratch m;
    for (int64_t l = begin; l < end; ++l) {
      eplb_cpu::check_row(wp + l * experts, experts, "eplb_migrate");
      ok[l] = eplb_migrate::migrate_row(wp + l * experts, op + l * replicas, fp + l * replicas,
                                        tp[l], capp[l], sh, static_cast<int32_t>(max_steps),
                                        dst + l * replicas, m);
    }
  });
  return {out, reached};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_migrate", &eplb_migrate_cpu);
  m.impl("eplb_relabel", &eplb_relabel_cpu);
  m.impl("eplb_source_slots", &eplb_source_slots_cpu);
}

}  // namespace deeppar
