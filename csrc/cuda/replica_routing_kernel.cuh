// Device code of deeppar::route_replicas (rule in csrc/ops.cpp). Needs no torch headers, so
// `nvcc -c` checks it on a machine whose torch has no CUDA (tools/cuda_compile_check.sh).
#pragma once
#include <cstdint>
#include <cstdio>

namespace deeppar {

__host__ __device__ inline int64_t route_floor_div(int64_t a, int64_t b) {  // b > 0
  const int64_t q = a / b;
  return (a % b < 0) ? q - 1 : q;
}

__host__ __device__ inline int64_t route_floor_mod(int64_t a, int64_t b) {  // b > 0
  const int64_t r = a % b;
  return r < 0 ? r + b : r;
}

// The slot of one (token, k) pair whose expert has the n replicas `row` (log2phy order):
// candidate (position mod candidates) of the replicas on local_gpu if any, else on its node
// (gpus_per_node > 0) if any, else all (local_gpu < 0: all). The tier is found by scanning the
// row (a few cached words), so no per-expert table is built. Host-callable for checks.
__host__ __device__ inline int64_t route_pair_slot(const int64_t* row, int64_t n, int64_t position,
                                                   int64_t local_gpu, int64_t slots_per_gpu,
                                                   int64_t gpus_per_node) {
  if (local_gpu < 0) return row[route_floor_mod(position, n)];
  const int64_t node = gpus_per_node > 0 ? local_gpu / gpus_per_node : -1;
  int64_t here = 0, near = 0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t gpu = route_floor_div(row[r], slots_per_gpu);
    here += gpu == local_gpu;
    near += gpus_per_node > 0 && route_floor_div(gpu, gpus_per_node) == node;
  }
  const int tier = here > 0 ? 2 : (near > 0 ? 1 : 0);
  int64_t j = route_floor_mod(position, here > 0 ? here : (near > 0 ? near : n));
  for (int64_t r = 0; r < n; ++r) {
    const int64_t gpu = route_floor_div(row[r], slots_per_gpu);
    const bool candidate = tier == 2   ? gpu == local_gpu
                           : tier == 1 ? route_floor_div(gpu, gpus_per_node) == node
                                       : true;
    if (candidate && j-- == 0) return row[r];
  }
  return -1;  // not reached: the tier holds position mod its size + 1 candidates
}

// One thread per (token, k) pair (grid-stride), fused: check the id and its expert's count, then
// route_pair_slot with position token + token_offset. Ids outside
// [0, experts) and counts outside [1, width] stop the kernel (device-side assert: no host sync).
template <typename id_t>
__global__ void route_replicas_kernel(const id_t* __restrict__ ids,         // [T * k]
                                      const int64_t* __restrict__ log2phy,  // [E, width]
                                      const int64_t* __restrict__ logcnt,   // [E]
                                      int64_t* __restrict__ out,            // [T * k]
                                      int64_t pairs, int64_t top_k, int64_t experts,
                                      int64_t width, int64_t token_offset, int64_t local_gpu,
                                      int64_t slots_per_gpu, int64_t gpus_per_node) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += stride) {
    const int64_t e = static_cast<int64_t>(ids[i]);
    if (e < 0 || e >= experts) {
      printf("route_replicas: topk_ids holds expert id %lld, outside [0, %lld)\n",
             static_cast<long long>(e), static_cast<long long>(experts));
      __trap();
    }
    const int64_t n = logcnt[e];
    if (n < 1 || n > width) {
      printf("route_replicas: logcnt must be in [1, %lld], got %lld for expert %lld\n",
             static_cast<long long>(width), static_cast<long long>(n),
             static_cast<long long>(e));
      __trap();
    }
    out[i] = route_pair_slot(log2phy + e * width, n, i / top_k + token_offset, local_gpu,
                             slots_per_gpu, gpus_per_node);
  }
}

}  // namespace deeppar
