// CPU kernels of deeppar::moe_permute / moe_unpermute (semantics in csrc/ops.cpp).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "op_checks.h"

namespace deeppar {
namespace {

constexpr int64_t kPairsPerChunk = 4096;

// Counting sort of the T*k (token, slot) pairs by expert, stable in pair order: each chunk of
// pairs counts its experts, a serial prefix sum gives each (chunk, expert) its first row, then
// each chunk places its pairs in order. Rows are then copied in parallel.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_permute_cpu(
    const at::Tensor& x,         // [T, H] floating
    const at::Tensor& topk_ids,  // [T, k] int64
    int64_t num_experts, int64_t num_ranks, int64_t num_sms) {
  check_moe_permute_args(x, topk_ids, num_experts, num_ranks, num_sms);
  const at::Tensor xc = x.contiguous(), ids = topk_ids.contiguous();
  const int64_t tokens = ids.size(0), top_k = ids.size(1), hidden = xc.size(1);
  const int64_t pairs = tokens * top_k, experts = num_experts;
  const auto long_opts = ids.options();
  at::Tensor out = at::empty({pairs, hidden}, xc.options());
  at::Tensor pos = at::empty({tokens, top_k}, long_opts);
  at::Tensor rank_counts = at::zeros({num_ranks}, long_opts);
  at::Tensor expert_counts = at::zeros({experts}, long_opts);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  int64_t* pos_p = pos.mutable_data_ptr<int64_t>();

  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads() * 4, (pairs + kPairsPerChunk - 1) / kPairsPerChunk));
  const int64_t per_chunk = (pairs + chunks - 1) / chunks;
  std::vector<int64_t> offsets(chunks * experts, 0);  // counts, then first row, per chunk
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* count = offsets.data() + c * experts;
      for (int64_t i = c * per_chunk, stop = std::min(pairs, (c + 1) * per_chunk); i < stop; ++i) {
        const int64_t e = id[i];
        TORCH_CHECK_VALUE(e >= 0 && e < experts, "moe_permute: topk_ids holds an expert id ", e,
                          " outside [0, ", experts, ")");
        ++count[e];
      }
    }
  });
  int64_t* ec = expert_counts.mutable_data_ptr<int64_t>();
  int64_t* rc = rank_counts.mutable_data_ptr<int64_t>();
  const int64_t per_rank = experts / num_ranks;
  int64_t row = 0;
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = offsets[c * experts + e];
      offsets[c * experts + e] = row;
      row += n;
      ec[e] += n;
    }
    rc[e / per_rank] += ec[e];
  }
  std::vector<int64_t> source(pairs);  // pair index of each permuted row
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int64_t* next = offsets.data() + c * experts;
      for (int64_t i = c * per_chunk, stop = std::min(pairs, (c + 1) * per_chunk); i < stop; ++i) {
        const int64_t r = next[id[i]]++;
        pos_p[i] = r;
        source[r] = i;
      }
    }
  });
  const int64_t row_bytes = hidden * static_cast<int64_t>(xc.element_size());
  const char* src = static_cast<const char*>(xc.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(dst + r * row_bytes, src + (source[r] / top_k) * row_bytes, row_bytes);
    }
  });
  return {out, pos, rank_counts, expert_counts};
}

template <typename scalar_t, typename acc_t>
void unpermute_rows(const scalar_t* y, const int64_t* pos, const acc_t* w, scalar_t* out,
                    int64_t tokens, int64_t top_k, int64_t hidden) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(hidden * top_k, 1));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(hidden);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t* p = pos + t * top_k;
      const acc_t* wt = w + t * top_k;
      const scalar_t* row = y + p[0] * hidden;
      for (int64_t h = 0; h < hidden; ++h) acc[h] = wt[0] * static_cast<acc_t>(row[h]);
      for (int64_t j = 1; j < top_k; ++j) {
        row = y + p[j] * hidden;
        const acc_t wj = wt[j];
        for (int64_t h = 0; h < hidden; ++h) acc[h] = acc[h] + wj * static_cast<acc_t>(row[h]);
      }
      scalar_t* o = out + t * hidden;
      for (int64_t h = 0; h < hidden; ++h) o[h] = static_cast<scalar_t>(acc[h]);
    }
  });
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y,        // [T*k, H] floating
                             const at::Tensor& pos,      // [T, k] int64
                             const at::Tensor& weights,  // [T, k] floating
                             int64_t num_sms) {
  check_moe_unpermute_args(y, pos, weights, num_sms);
  const at::Tensor yc = y.contiguous(), pc = pos.contiguous();
  const int64_t tokens = pc.size(0), top_k = pc.size(1), hidden = yc.size(1);
  at::Tensor out = at::empty({tokens, hidden}, yc.options());
  if (tokens == 0 || hidden == 0) return out;
  if (top_k == 0) return out.zero_();
  const int64_t* p = pc.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < pc.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < yc.size(0), "moe_unpermute: pos holds a row ", p[i],
                      " outside [0, ", yc.size(0), ")");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor w = weights.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    unpermute_rows<scalar_t, acc_t>(yc.const_data_ptr<scalar_t>(), p, w.const_data_ptr<acc_t>(),
                                    out.mutable_data_ptr<scalar_t>(), tokens, top_k, hidden);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
}

}  // namespace deeppar
