// Device code of deeppar::slot_loads. Needs no torch headers, so `nvcc -c` checks it on a
// machine whose torch has no CUDA (see csrc/cuda/compile_check.cu).
#pragma once
#include <cstdint>
#include <cstdio>

namespace deeppar {

// One thread per (layer, slot).
__global__ void slot_loads_kernel(const float* __restrict__ weight,     // [L, E]
                                  const int64_t* __restrict__ phy2log,  // [L, R]
                                  const int64_t* __restrict__ logcnt,   // [L, E]
                                  float* __restrict__ out,              // [L, R]
                                  int64_t layers, int64_t experts, int64_t replicas) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= layers * replicas) return;
  const int64_t l = i / replicas;
  const int64_t e = phy2log[i];
  if (e < 0 || e >= experts) {
    // Device-side assert, as the CPU kernel's check: never read outside the weight row.
    printf("slot_loads: phy2log holds an invalid expert id %lld (experts: %lld)\n",
           static_cast<long long>(e), static_cast<long long>(experts));
    __trap();
  }
  // __fdiv_rn: correctly rounded division whatever the compiler flags, to match the CPU.
  out[i] = __fdiv_rn(weight[l * experts + e], static_cast<float>(logcnt[l * experts + e]));
}

}  // namespace deeppar
