// Device code of deeppar::moe_permute / moe_unpermute. Needs no torch headers, so `nvcc -c`
// checks it on a machine whose torch has no CUDA (tools/cuda_compile_check.sh).
//
// Every kernel runs on a fixed grid of G persistent blocks (the caller's num_sms), so the SMs a
// communication stream holds are known. Permute is a stable counting sort in two launches:
// moe_count_kernel counts the experts of each block's contiguous chunk of (token, slot) pairs;
// moe_scatter_kernel derives its chunk's first row per expert from all counts, ranks its pairs in
// order with one warp (__match_any_sync), then all warps copy the rows.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace deeppar {

// Pairs [block * per_chunk, min(pairs, (block + 1) * per_chunk)) belong to this block.
__global__ void moe_count_kernel(const int64_t* __restrict__ ids,  // [N] expert of each pair
                                 int64_t* __restrict__ hist,       // [G, E] out
                                 int64_t pairs, int64_t per_chunk, int experts) {
  extern __shared__ int counts[];  // [E]
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * per_chunk;
  const int64_t stop = start + per_chunk < pairs ? start + per_chunk : pairs;
  for (int64_t i = start + threadIdx.x; i < stop; i += blockDim.x) {
    const int64_t e = ids[i];
    if (e >= 0 && e < experts) atomicAdd(&counts[e], 1);  // ids are validated by the caller
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    hist[static_cast<int64_t>(blockIdx.x) * experts + e] = counts[e];
  }
}

// Copies `bytes` from src to dst with the lanes of one warp: 16-byte words when aligned, four
// loads in flight per lane before their stores.
__device__ __forceinline__ void warp_copy_row(char* __restrict__ dst, const char* __restrict__ src,
                                              int64_t bytes, int lane, bool vec16) {
  if (vec16) {
    constexpr int kUnroll = 4;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    const int64_t words = bytes / 16;
    for (int64_t w0 = lane; w0 < words; w0 += 32 * kUnroll) {
      uint4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (w0 + u * 32 < words) r[u] = s[w0 + u * 32];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (w0 + u * 32 < words) d[w0 + u * 32] = r[u];
      }
    }
  } else {
    for (int64_t b = lane; b < bytes; b += 32) dst[b] = src[b];
  }
}

__global__ void moe_scatter_kernel(const char* __restrict__ x,       // [T, H] rows, row_bytes each
                                   const int64_t* __restrict__ ids,  // [N]
                                   const int64_t* __restrict__ hist,  // [G, E]
                                   char* __restrict__ out,             // [N, H] permuted rows
                                   int64_t* __restrict__ pos,          // [N] out: row of each pair
                                   int64_t* __restrict__ rank_counts,  // [R] out
                                   int64_t* __restrict__ expert_counts,  // [E] out
                                   int64_t pairs, int64_t per_chunk, int experts,
                                   int experts_per_rank, int64_t row_bytes, int64_t top_k,
                                   bool vec16) {
  extern __shared__ long long next_row[];  // [2E]: first free row per expert, then totals
  long long* totals = next_row + experts;
  const int grid = gridDim.x;
  for (int e = threadIdx.x; e < experts; e += blockDim.x) {
    long long total = 0, before = 0;
    for (int g = 0; g < grid; ++g) {
      const long long n = hist[static_cast<int64_t>(g) * experts + e];
      total += n;
      if (g < static_cast<int>(blockIdx.x)) before += n;
    }
    totals[e] = total;
    next_row[e] = before;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive prefix over experts (E is small)
    long long base = 0;
    for (int e = 0; e < experts; ++e) {
      next_row[e] += base;
      base += totals[e];
      if (blockIdx.x == 0) {
        expert_counts[e] = totals[e];
        rank_counts[e / experts_per_rank] += totals[e];  // zero-initialised by the caller
      }
    }
  }
  __syncthreads();
  const int64_t start = static_cast<int64_t>(blockIdx.x) * per_chunk;
  const int64_t stop = start + per_chunk < pairs ? start + per_chunk : pairs;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  if (warp == 0) {  // rank the chunk's pairs in order, 32 at a time
    const unsigned lower = (1u << lane) - 1u;
    for (int64_t first = start; first < stop; first += 32) {
      const int64_t i = first + lane;
      const bool valid = i < stop;
      const long long e = valid ? ids[i] : -1;
      const unsigned peers = __match_any_sync(0xffffffffu, e);
      const long long row = valid ? next_row[e] + __popc(peers & lower) : 0;
      __syncwarp();
      if (valid && lane == __ffs(peers) - 1) next_row[e] += __popc(peers);
      __syncwarp();
      if (valid) pos[i] = row;
    }
  }
  __syncthreads();  // pos of this chunk, written by warp 0, is visible to the whole block
  for (int64_t i = start + warp; i < stop; i += warps) {
    warp_copy_row(out + pos[i] * row_bytes, x + (i / top_k) * row_bytes, row_bytes, lane, vec16);
  }
}

// Accumulation arithmetic without fused multiply-add, so results equal the CPU kernel's.
__device__ __forceinline__ float mul_add_rn(float acc, float w, float v) {
  return __fadd_rn(acc, __fmul_rn(w, v));
}
__device__ __forceinline__ double mul_add_rn(double acc, double w, double v) {
  return __dadd_rn(acc, __dmul_rn(w, v));
}
__device__ __forceinline__ float mul_rn(float w, float v) { return __fmul_rn(w, v); }
__device__ __forceinline__ double mul_rn(double w, double v) { return __dmul_rn(w, v); }

// Conversions between storage and accumulation types (round to nearest even when narrowing).
template <typename A, typename S> __device__ __forceinline__ A load_acc(S v) {
  return static_cast<A>(v);
}
template <> __device__ __forceinline__ float load_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <> __device__ __forceinline__ float load_acc<float, __half>(__half v) {
  return __half2float(v);
}
template <typename S, typename A> __device__ __forceinline__ S store_acc(A v) {
  return static_cast<S>(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 store_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half store_acc<__half, float>(float v) {
  return __float2half_rn(v);
}

// VEC elements moved as one word: 16 bytes, or a single element.
template <typename S, int VEC> struct VecWord { using type = uint4; };
template <typename S> struct VecWord<S, 1> { using type = S; };
template <typename S, int VEC> union Packed {
  typename VecWord<S, VEC>::type word;
  S elems[VEC];
};

// out[t] = sum_j w[t, j] * y[pos[t, j]] in slot order; tokens strided over the grid, VEC
// consecutive elements per thread (VEC * sizeof(scalar_t) = 16 bytes when hidden allows). The
// rows of up to kSlots slots are loaded before they are summed, to keep loads in flight.
template <typename scalar_t, typename acc_t, int VEC>
__global__ void moe_unpermute_kernel(const scalar_t* __restrict__ y,  // [T*k, H]
                                     const int64_t* __restrict__ pos,  // [T, k]
                                     const acc_t* __restrict__ w,      // [T, k]
                                     scalar_t* __restrict__ out,       // [T, H]
                                     int64_t tokens, int64_t top_k, int64_t hidden) {
  using word_t = typename VecWord<scalar_t, VEC>::type;
  static_assert(sizeof(word_t) == VEC * sizeof(scalar_t), "VEC must fill one word");
  constexpr int kSlots = 8;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t* p = pos + t * top_k;
    const acc_t* wt = w + t * top_k;
    for (int64_t h = static_cast<int64_t>(threadIdx.x) * VEC; h < hidden;
         h += static_cast<int64_t>(blockDim.x) * VEC) {
      acc_t acc[VEC];
      for (int64_t j0 = 0; j0 < top_k; j0 += kSlots) {
        const int64_t n = top_k - j0 < kSlots ? top_k - j0 : kSlots;
        Packed<scalar_t, VEC> rows[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          if (s < n) rows[s].word = *reinterpret_cast<const word_t*>(y + p[j0 + s] * hidden + h);
        }
#pragma unroll
        for (int s = 0; s < kSlots; ++s) {
          if (s < n) {
            const acc_t wj = wt[j0 + s];
            if (j0 + s == 0) {
#pragma unroll
              for (int u = 0; u < VEC; ++u) acc[u] = mul_rn(wj, load_acc<acc_t>(rows[s].elems[u]));
            } else {
#pragma unroll
              for (int u = 0; u < VEC; ++u) {
                acc[u] = mul_add_rn(acc[u], wj, load_acc<acc_t>(rows[s].elems[u]));
              }
            }
          }
        }
      }
      Packed<scalar_t, VEC> result;
#pragma unroll
      for (int u = 0; u < VEC; ++u) result.elems[u] = store_acc<scalar_t>(acc[u]);
      *reinterpret_cast<word_t*>(out + t * hidden + h) = result.word;
    }
  }
}

}  // namespace deeppar
