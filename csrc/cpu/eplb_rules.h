// The EPLB spec's rules (specs/eplb.md) for one row, shared by the CPU ops: balanced packing,
// replication and the hierarchical policy. Float32 arithmetic only, in the spec's order: files
// that include this must not be compiled with -ffast-math.
//
// Every choice is the best of a tournament tree whose keys hold the whole tie rule, so a
// choice costs log2(candidates) branch-free comparisons (a heap's comparisons branch on data
// and mispredict about half the time, which dominated the planner's time).
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace deeppar {
namespace eplb_cpu {

// Bits of a non-negative float (-0.0 made +0.0): they order like the floats, +inf included.
inline uint32_t float_bits(float v) {
  v += 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

// Tournament tree over n leaves: node 1 holds the best key (the smallest for MinTree, the
// largest for MaxTree); leaves live at [size, size + n), padding leaves never win.
template <class Key, bool kMin>
struct Tree {
  std::vector<Key> node;
  int32_t size = 1;

  static Key pick(Key a, Key b) {
    if constexpr (kMin) {
      return b < a ? b : a;
    } else {
      return a < b ? b : a;
    }
  }
  static Key padding() { return kMin ? std::numeric_limits<Key>::max() : Key{0}; }

  // Starts a tree of n leaves; set them with leaf(), then build().
  void reset(int32_t n) {
    size = 1;
    while (size < n) size <<= 1;
    node.assign(2 * static_cast<size_t>(size), padding());
  }
  Key& leaf(int32_t i) { return node[size + i]; }
  void build() {
    for (int32_t i = size - 1; i >= 1; --i) node[i] = pick(node[2 * i], node[2 * i + 1]);
  }
  void update(int32_t i, Key key) {
    int32_t at = size + i;
    node[at] = key;
    for (at >>= 1; at >= 1; at >>= 1) node[at] = pick(node[2 * at], node[2 * at + 1]);
  }
  Key best() const { return node[1]; }
};

using u128 = unsigned __int128;

// Reusable per-thread buffers, so that planning a row allocates nothing after the first.
struct Scratch {
  std::vector<uint64_t> keys;        // items sorted heaviest first: (~float bits, index)
  std::vector<uint64_t> radix;       // the radix sort's second buffer
  std::vector<int32_t> pack_items;   // items held by each pack
  std::vector<float> pack_weight;    // accumulated weight of each pack
  Tree<uint64_t, true> packs;        // packs with room: (weight bits, index), smallest wins
  Tree<u128, false> experts;         // (w/count bits, -count, -index), largest wins
  std::vector<int32_t> rep_count;    // replicas of each expert
  // Hierarchical policy.
  std::vector<float> group_load;
  std::vector<int32_t> group_pack, group_rank, mlog2log;
  std::vector<float> node_weight, replica_load;
  std::vector<int32_t> slot_expert, slot_rank, gpu, rank_in_gpu;
};

// Below this many items std::sort beats the radix sort (measured: at 72 items the four
// 256-entry histograms cost more than the comparisons they save).
constexpr int32_t kRadixMinItems = 256;

// Items of w sorted heaviest first, lowest index first among equal weights, into s.keys as
// (~float bits << 32 | index) (non-negative float bits order like the floats). Larger rows
// use a stable LSD radix sort on the 32 weight bits of items taken in index order (so equal
// weights keep index order): no data-dependent branches, unlike a comparison sort.
inline void sort_heaviest_first(const float* w, int32_t n, Scratch& s) {
  s.keys.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    s.keys[i] = (static_cast<uint64_t>(~float_bits(w[i])) << 32) | static_cast<uint32_t>(i);
  }
  if (n < kRadixMinItems) {
    std::sort(s.keys.begin(), s.keys.end());
    return;
  }
  s.radix.resize(n);
  uint64_t* from = s.keys.data();
  uint64_t* to = s.radix.data();
  for (int32_t shift = 32; shift < 64; shift += 8) {
    int32_t count[256] = {};
    for (int32_t i = 0; i < n; ++i) ++count[(from[i] >> shift) & 0xff];
    if (count[(from[0] >> shift) & 0xff] == n) continue;  // one digit everywhere: no-op pass
    int32_t at = 0;
    for (int32_t d = 0; d < 256; ++d) {
      const int32_t c = count[d];
      count[d] = at;
      at += c;
    }
    for (int32_t i = 0; i < n; ++i) to[count[(from[i] >> shift) & 0xff]++] = from[i];
    std::swap(from, to);
  }
  if (from != s.keys.data()) std::copy(from, from + n, s.keys.data());
}

// Balanced packing of n items into m packs of n/m items (spec "Balanced packing").
inline void pack_row(const float* w, int32_t n, int32_t m, int32_t* pack, int32_t* rank,
                     Scratch& s) {
  const int32_t per_pack = n / m;
  if (per_pack == 1) {
    for (int32_t i = 0; i < n; ++i) {
      pack[i] = i;
      rank[i] = 0;
    }
    return;
  }
  sort_heaviest_first(w, n, s);
  s.pack_weight.assign(m, 0.0f);
  s.pack_items.assign(m, 0);
  s.packs.reset(m);
  for (int32_t p = 0; p < m; ++p) s.packs.leaf(p) = static_cast<uint64_t>(p);  // weight 0
  s.packs.build();
  for (int32_t k = 0; k < n; ++k) {
    const int32_t item = static_cast<int32_t>(s.keys[k] & 0xffffffffu);
    // Lightest pack with room, lowest index on ties: the smallest (weight bits, index) key.
    const int32_t p = static_cast<int32_t>(s.packs.best() & 0xffffffffu);
    pack[item] = p;
    rank[item] = s.pack_items[p];
    s.pack_weight[p] += w[item];
    const bool full = ++s.pack_items[p] == per_pack;
    s.packs.update(p, full ? std::numeric_limits<uint64_t>::max()
                           : (static_cast<uint64_t>(float_bits(s.pack_weight[p])) << 32) |
                                 static_cast<uint32_t>(p));
  }
}

// Key of an expert for replication: larger weight/count first, then fewer replicas, then the
// lower index (counts and indices are below 2^32).
inline u128 replica_key(float ratio, int32_t count, int32_t expert) {
  const uint64_t high = (static_cast<uint64_t>(float_bits(ratio)) << 32) |
                        (0xffffffffu - static_cast<uint32_t>(count));
  return (static_cast<u128>(high) << 64) | (~static_cast<uint64_t>(static_cast<uint32_t>(expert)));
}

// Replication of n experts into k >= n slots (spec "Replication").
inline void replicate_row(const float* w, int32_t n, int32_t k, int32_t* slot_expert,
                          int32_t* slot_rank, int32_t* count, Scratch& s) {
  for (int32_t i = 0; i < n; ++i) {
    slot_expert[i] = i;
    slot_rank[i] = 0;
    count[i] = 1;
  }
  if (k == n) return;
  s.experts.reset(n);
  for (int32_t i = 0; i < n; ++i) s.experts.leaf(i) = replica_key(w[i], 1, i);
  s.experts.build();
  for (int32_t j = n; j < k; ++j) {
    const int32_t e = static_cast<int32_t>(~static_cast<uint64_t>(s.experts.best()) & 0xffffffffu);
    slot_expert[j] = e;
    slot_rank[j] = count[e];
    const int32_t c = ++count[e];
    s.experts.update(e, replica_key(w[e] / static_cast<float>(c), c, e));
  }
}

// The spec's rules assume finite non-negative loads (a NaN would break the orderings).
inline void check_row(const float* w, int64_t n, const char* op) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = w[i];
    if (v >= 0.0f && v <= std::numeric_limits<float>::max()) continue;
    const char* what = v != v                                       ? "a NaN value"
                       : std::abs(v) == std::numeric_limits<float>::infinity() ? "an infinite value"
                                                                                : "a negative value";
    TORCH_CHECK_VALUE(false, op, ": weight must hold finite non-negative loads; found ", what,
                      " (", v, ")");
  }
}

struct Shape {
  int32_t experts, replicas, groups, nodes, gpus;
};

// Steps 1-2 of the hierarchical policy: group loads packed onto nodes, and the node-major
// order mlog2log (s.mlog2log).
inline void node_major_order(const float* w, const Shape& sh, Scratch& s) {
  const int32_t group_size = sh.experts / sh.groups;
  const int32_t groups_per_node = sh.groups / sh.nodes;
  s.group_load.resize(sh.groups);
  for (int32_t g = 0; g < sh.groups; ++g) {
    float total = 0.0f;
    for (int32_t i = 0; i < group_size; ++i) total += w[g * group_size + i];
    s.group_load[g] = total;
  }
  s.group_pack.resize(sh.groups);
  s.group_rank.resize(sh.groups);
  pack_row(s.group_load.data(), sh.groups, sh.nodes, s.group_pack.data(), s.group_rank.data(), s);
  s.mlog2log.resize(sh.experts);
  for (int32_t g = 0; g < sh.groups; ++g) {
    const int32_t base = (s.group_pack[g] * groups_per_node + s.group_rank[g]) * group_size;
    for (int32_t i = 0; i < group_size; ++i) s.mlog2log[base + i] = g * group_size + i;
  }
}

// Hierarchical policy for one layer (spec "Hierarchical policy").
inline void hierarchical_row(const float* w, const Shape& sh, int64_t* phy2log,
                             int64_t* phy_rank, int64_t* logcnt, Scratch& s) {
  const int32_t experts_per_node = sh.experts / sh.nodes;
  const int32_t slots_per_node = sh.replicas / sh.nodes;
  const int32_t gpus_per_node = sh.gpus / sh.nodes;
  const int32_t slots_per_gpu = sh.replicas / sh.gpus;
  node_major_order(w, sh, s);

  s.node_weight.resize(experts_per_node);
  s.rep_count.resize(experts_per_node);
  s.slot_expert.resize(slots_per_node);
  s.slot_rank.resize(slots_per_node);
  s.replica_load.resize(slots_per_node);
  s.gpu.resize(slots_per_node);
  s.rank_in_gpu.resize(slots_per_node);
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = s.mlog2log.data() + node * experts_per_node;
    for (int32_t i = 0; i < experts_per_node; ++i) s.node_weight[i] = w[node_log[i]];
    // Step 3: replicate within the node.
    int32_t* count = s.rep_count.data();
    replicate_row(s.node_weight.data(), experts_per_node, slots_per_node, s.slot_expert.data(),
                  s.slot_rank.data(), count, s);
    // Step 4: pack the node's replicas onto its GPUs.
    for (int32_t j = 0; j < slots_per_node; ++j) {
      const int32_t e = s.slot_expert[j];
      s.replica_load[j] = s.node_weight[e] / static_cast<float>(count[e]);
    }
    pack_row(s.replica_load.data(), slots_per_node, gpus_per_node, s.gpu.data(),
             s.rank_in_gpu.data(), s);
    // Step 5: physical slots.
    for (int32_t j = 0; j < slots_per_node; ++j) {
      const int32_t slot = node * slots_per_node + s.gpu[j] * slots_per_gpu + s.rank_in_gpu[j];
      phy2log[slot] = node_log[s.slot_expert[j]];
      phy_rank[slot] = s.slot_rank[j];
    }
    for (int32_t i = 0; i < experts_per_node; ++i) logcnt[node_log[i]] = count[i];
  }
}

}  // namespace eplb_cpu
}  // namespace deeppar
