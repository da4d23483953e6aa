// Device code of deeppar::eplb_rebalance (specs/eplb.md): the hierarchical EPLB policy, one
// thread block per layer. Needs no torch headers, so plain `nvcc -c` checks it on a machine
// without a CUDA torch (tools/cuda_compile_check.sh).
//
// Same algorithm and arithmetic as csrc/cpu/eplb.cpp, so results are bit-identical:
//   * group loads summed left to right in float32 by one thread each;
//   * packing visits items in the order of the 64-bit key (~float bits << 32 | index), i.e.
//     heaviest first, lowest index on ties (loads are +0.0-normalised and non-negative, so
//     float bits order like the floats); each item goes to the pack with the smallest
//     (weight, index) among packs with room, pack weights grow by float32 addition;
//   * replication gives each extra slot to the expert with the largest (weight/count, -count,
//     -index), weight/count with __fdiv_rn (IEEE, whatever the compiler flags).
// Argmin/argmax run in one warp with shuffles over the full tie-break key; lane 0's result is
// broadcast, so every lane acts on the same choice even for malformed input (NaN).
#pragma once
#include <cstdint>
#include <cstdio>

namespace deeppar {
namespace eplb_detail {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kMaxFinite = 3.40282347e+38f;  // FLT_MAX

// Shared-memory layout of one block (one layer), in 4-byte words.
struct Layout {
  int w, group_load, group_pack, group_rank, mlog2log, ratio, node_weight, count, slot_expert, slot_rank,
      replica_load, order, gpu, rank_in_gpu, pack_weight, pack_items, words;
  __host__ __device__ Layout(int experts, int replicas, int groups, int gpus) {
    int at = 0;
    w = at; at += experts;
    group_load = at; at += groups;
    group_pack = at; at += groups;
    group_rank = at; at += groups;
    mlog2log = at; at += experts;
    ratio = at; at += experts;
    node_weight = at; at += experts;
    count = at; at += experts;
    slot_expert = at; at += replicas;
    slot_rank = at; at += replicas;
    replica_load = at; at += replicas;
    order = at; at += replicas;
    gpu = at; at += replicas;
    rank_in_gpu = at; at += replicas;
    pack_weight = at; at += gpus;
    pack_items = at; at += gpus;
    words = at;
  }
};

// Dynamic shared memory a block needs for these sizes.
inline __host__ __device__ int64_t eplb_smem_bytes(int experts, int replicas, int groups,
                                                   int gpus) {
  return static_cast<int64_t>(Layout(experts, replicas, groups, gpus).words) * 4;
}

__device__ __forceinline__ uint64_t order_key(float v, int index) {
  return (static_cast<uint64_t>(~__float_as_uint(v)) << 32) | static_cast<uint32_t>(index);
}

// Candidate pack for argmin: (weight, index), valid only if the pack has room.
struct PackPick {
  float weight;
  int index;
  bool valid;
};

__device__ __forceinline__ PackPick better_pack(const PackPick& a, const PackPick& b) {
  if (!b.valid) return a;
  if (!a.valid) return b;
  if (b.weight < a.weight || (b.weight == a.weight && b.index < a.index)) return b;
  return a;
}

// Candidate expert for argmax: (weight/count, count, index).
struct ExpertPick {
  float ratio;
  int count;
  int index;
  bool valid;
};

__device__ __forceinline__ ExpertPick better_expert(const ExpertPick& a, const ExpertPick& b) {
  if (!b.valid) return a;
  if (!a.valid) return b;
  if (b.ratio > a.ratio) return b;
  if (b.ratio == a.ratio) {
    if (b.count < a.count) return b;
    if (b.count == a.count && b.index < a.index) return b;
  }
  return a;
}

// Balanced packing of n items (weights w) into m packs, by one warp. Writes pack[i] and
// rank[i]; uses order[n], pack_weight[m], pack_items[m] as scratch.
__device__ void warp_pack(const float* w,     // [n] item weights
                          int n, int m,
                          int* pack,          // [n] out: pack of each item
                          int* rank,          // [n] out: rank of each item in its pack
                          int* order,         // [n] scratch: items in visiting order
                          float* pack_weight, // [m] scratch
                          int* pack_items) {  // [m] scratch
  const int lane = threadIdx.x & 31;
  const int per_pack = n / m;
  if (per_pack == 1) {
    for (int i = lane; i < n; i += 32) {
      pack[i] = i;
      rank[i] = 0;
    }
    __syncwarp();
    return;
  }
  // Visiting order: position of item i = number of items with a smaller key (keys distinct).
  for (int i = lane; i < n; i += 32) {
    const uint64_t key = order_key(w[i], i);
    int position = 0;
    for (int j = 0; j < n; ++j) position += order_key(w[j], j) < key;
    order[position] = i;
  }
  for (int p = lane; p < m; p += 32) {
    pack_weight[p] = 0.0f;
    pack_items[p] = 0;
  }
  __syncwarp();
  for (int k = 0; k < n; ++k) {
    const int item = order[k];
    PackPick best{0.0f, 0, false};
    for (int p = lane; p < m; p += 32) {
      best = better_pack(best, PackPick{pack_weight[p], p, pack_items[p] < per_pack});
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      PackPick other;
      other.weight = __shfl_xor_sync(kFullMask, best.weight, offset);
      other.index = __shfl_xor_sync(kFullMask, best.index, offset);
      other.valid = __shfl_xor_sync(kFullMask, static_cast<int>(best.valid), offset) != 0;
      best = better_pack(best, other);
    }
    const int p = __shfl_sync(kFullMask, best.index, 0);
    if (lane == 0) {
      pack[item] = p;
      rank[item] = pack_items[p];
      pack_items[p] += 1;
      pack_weight[p] = pack_weight[p] + w[item];
    }
    __syncwarp();
  }
}

// Replication of n experts (weights w) into k >= n slots, by one warp.
__device__ void warp_replicate(const float* w,    // [n] expert weights
                               int n, int k,
                               int* slot_expert,  // [k] out: expert of each slot
                               int* slot_rank,    // [k] out: replica rank of each slot
                               int* count,        // [n] out: replicas of each expert
                               float* ratio) {    // [n] scratch: w / count
  const int lane = threadIdx.x & 31;
  for (int i = lane; i < n; i += 32) {
    slot_expert[i] = i;
    slot_rank[i] = 0;
    count[i] = 1;
    ratio[i] = w[i];
  }
  __syncwarp();
  for (int j = n; j < k; ++j) {
    ExpertPick best{0.0f, 0, 0, false};
    for (int e = lane; e < n; e += 32) {
      best = better_expert(best, ExpertPick{ratio[e], count[e], e, true});
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
      ExpertPick other;
      other.ratio = __shfl_xor_sync(kFullMask, best.ratio, offset);
      other.count = __shfl_xor_sync(kFullMask, best.count, offset);
      other.index = __shfl_xor_sync(kFullMask, best.index, offset);
      other.valid = __shfl_xor_sync(kFullMask, static_cast<int>(best.valid), offset) != 0;
      best = better_expert(best, other);
    }
    const int e = __shfl_sync(kFullMask, best.index, 0);
    if (lane == 0) {
      slot_expert[j] = e;
      slot_rank[j] = count[e];
      const int c = count[e] + 1;
      count[e] = c;
      ratio[e] = __fdiv_rn(w[e], static_cast<float>(c));
    }
    __syncwarp();
  }
}

}  // namespace eplb_detail

// Hierarchical EPLB policy; grid = layers, block = a multiple of 32 threads, dynamic shared
// memory = eplb_smem_bytes(experts, replicas, groups, gpus). Warp 0 packs the groups; then
// warp v handles nodes v, v + warps, ...
__global__ void eplb_rebalance_kernel(const float* __restrict__ weight,  // [L, E] float32
                                      int64_t* __restrict__ phy2log,     // [L, R] out
                                      int64_t* __restrict__ phy_rank,    // [L, R] out
                                      int64_t* __restrict__ logcnt,      // [L, E] out
                                      int experts, int replicas, int groups, int nodes,
                                      int gpus) {
  using namespace eplb_detail;
  extern __shared__ float smem[];
  const Layout lay(experts, replicas, groups, gpus);
  float* w = smem + lay.w;
  float* group_load = smem + lay.group_load;
  int* group_pack = reinterpret_cast<int*>(smem + lay.group_pack);
  int* group_rank = reinterpret_cast<int*>(smem + lay.group_rank);
  int* mlog2log = reinterpret_cast<int*>(smem + lay.mlog2log);
  float* ratio = smem + lay.ratio;
  float* node_weight = smem + lay.node_weight;
  int* count = reinterpret_cast<int*>(smem + lay.count);
  int* slot_expert = reinterpret_cast<int*>(smem + lay.slot_expert);
  int* slot_rank = reinterpret_cast<int*>(smem + lay.slot_rank);
  float* replica_load = smem + lay.replica_load;
  int* order = reinterpret_cast<int*>(smem + lay.order);
  int* gpu = reinterpret_cast<int*>(smem + lay.gpu);
  int* rank_in_gpu = reinterpret_cast<int*>(smem + lay.rank_in_gpu);
  float* pack_weight = smem + lay.pack_weight;
  int* pack_items = reinterpret_cast<int*>(smem + lay.pack_items);

  const int layer = blockIdx.x;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int warps = blockDim.x >> 5;
  const int group_size = experts / groups;
  const int groups_per_node = groups / nodes;
  const int experts_per_node = experts / nodes;
  const int slots_per_node = replicas / nodes;
  const int gpus_per_node = gpus / nodes;
  const int slots_per_gpu = replicas / gpus;
  const float* row = weight + static_cast<int64_t>(layer) * experts;

  for (int e = tid; e < experts; e += blockDim.x) {
    const float v = row[e];
    if (!(v >= 0.0f && v <= kMaxFinite)) {
      // Device-side assert (the op takes no host sync): as the CPU kernel, refuse NaN, inf and
      // negative loads; the spec's ordering is undefined for them.
      printf("eplb_rebalance: weight must hold finite non-negative loads, got %f (layer %d)\n",
             v, layer);
      __trap();
    }
    w[e] = __fadd_rn(v, 0.0f);  // -0 -> +0
  }
  __syncthreads();
  // Step 1: group loads, left to right, then packed onto nodes by warp 0.
  for (int g = tid; g < groups; g += blockDim.x) {
    float total = 0.0f;
    for (int i = 0; i < group_size; ++i) total = __fadd_rn(total, w[g * group_size + i]);
    group_load[g] = total;
  }
  __syncthreads();
  if (warp == 0) {
    warp_pack(group_load, groups, nodes, group_pack, group_rank, order, pack_weight, pack_items);
  }
  __syncthreads();
  // Step 2: node-major order.
  for (int g = tid; g < groups; g += blockDim.x) {
    const int base = (group_pack[g] * groups_per_node + group_rank[g]) * group_size;
    for (int i = 0; i < group_size; ++i) mlog2log[base + i] = g * group_size + i;
  }
  __syncthreads();
  // Steps 3-5, one warp per node. Node-local slices of every array: no sharing between warps.
  for (int node = warp; node < nodes; node += warps) {
    const int lane = tid & 31;
    const int* node_log = mlog2log + node * experts_per_node;
    float* node_w = node_weight + node * experts_per_node;
    int* node_count = count + node * experts_per_node;
    int* node_slot_expert = slot_expert + node * slots_per_node;
    int* node_slot_rank = slot_rank + node * slots_per_node;
    float* node_load = replica_load + node * slots_per_node;
    for (int i = lane; i < experts_per_node; i += 32) node_w[i] = w[node_log[i]];
    __syncwarp();
    // Step 3: replicate within the node.
    warp_replicate(node_w, experts_per_node, slots_per_node, node_slot_expert, node_slot_rank,
                   node_count, ratio + node * experts_per_node);
    // Step 4: per-replica loads, packed onto the node's GPUs.
    for (int j = lane; j < slots_per_node; j += 32) {
      const int e = node_slot_expert[j];
      node_load[j] = __fdiv_rn(node_w[e], static_cast<float>(node_count[e]));
    }
    __syncwarp();
    warp_pack(node_load, slots_per_node, gpus_per_node, gpu + node * slots_per_node,
              rank_in_gpu + node * slots_per_node, order + node * slots_per_node,
              pack_weight + node * gpus_per_node, pack_items + node * gpus_per_node);
    // Step 5: physical slots.
    int64_t* out_p = phy2log + static_cast<int64_t>(layer) * replicas;
    int64_t* out_r = phy_rank + static_cast<int64_t>(layer) * replicas;
    for (int j = lane; j < slots_per_node; j += 32) {
      const int slot = node * slots_per_node + gpu[node * slots_per_node + j] * slots_per_gpu +
                       rank_in_gpu[node * slots_per_node + j];
      out_p[slot] = node_log[node_slot_expert[j]];
      out_r[slot] = node_slot_rank[j];
    }
    int64_t* out_c = logcnt + static_cast<int64_t>(layer) * experts;
    for (int i = lane; i < experts_per_node; i += 32) out_c[node_log[i]] = node_count[i];
    __syncwarp();
  }
}

}  // namespace deeppar
