// CPU kernel of deeppar::slot_loads (the pattern every native op follows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "op_checks.h"

namespace deeppar {
namespace {

at::Tensor slot_loads_cpu(const at::Tensor& weight,   // [L, E] float32
                          const at::Tensor& phy2log,  // [L, R] int64
                          const at::Tensor& logcnt) { // [L, E] int64
  check_slot_loads_args(weight, phy2log, logcnt);
  const at::Tensor w = weight.contiguous(), p = phy2log.contiguous(), c = logcnt.contiguous();
  const int64_t layers = w.size(0), experts = w.size(1), replicas = p.size(1);
  at::Tensor out = at::empty({layers, replicas}, w.options());
  const float* wp = w.const_data_ptr<float>();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  float* op = out.mutable_data_ptr<float>();
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      for (int64_t s = 0; s < replicas; ++s) {
        const int64_t e = pp[l * replicas + s];
        TORCH_CHECK_VALUE(e >= 0 && e < experts, "slot_loads: phy2log holds an invalid expert id ",
                          e);
        op[l * replicas + s] = wp[l * experts + e] / static_cast<float>(cp[l * experts + e]);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) { m.impl("slot_loads", &slot_loads_cpu); }

}  // namespace deeppar
