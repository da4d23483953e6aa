// The EPLB spec's rules (specs/eplb.md) for one row, shared by the CPU ops: balanced packing,
// replication and the hierarchical policy. Float32 arithmetic only, in the spec's order: files
// that include this must not be compiled with -ffast-math.
//
// Every choice is the best of a tournament tree whose keys hold the whole tie rule, so a
// choice costs log2(candidates) branch-free comparisons (a heap's comparisons branch on data
// and mispredict about half the time, which dominated the planner's time). Sorts are
// branch-free too: counted ranks for small rows, an LSD radix sort for larger ones.
#pragma once
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define DEEPPAR_EPLB_AVX512 1
#endif

namespace deeppar {
namespace eplb_cpu {

// Bits of a non-negative float (-0.0 made +0.0): they order like the floats, +inf included.
inline uint32_t float_bits(float v) {
  v += 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

inline uint32_t raw_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}

inline float bits_float(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
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
  Key build() {
    for (int32_t i = size - 1; i >= 1; --i) node[i] = pick(node[2 * i], node[2 * i + 1]);
    return node[1];
  }
  // Sets leaf i and returns the new best. The path's value stays in a register (only the
  // siblings are loaded), so an update costs no store-to-load round trip per level.
  Key update(int32_t i, Key key) {
    int32_t at = size + i;
    node[at] = key;
    for (; at > 1; at >>= 1) {
      key = pick(key, node[at ^ 1]);
      node[at >> 1] = key;
    }
    return key;
  }
  Key best() const { return node[1]; }
};

using u128 = unsigned __int128;

// Reusable per-thread buffers, so that planning a row allocates nothing after the first.
struct Scratch {
  std::vector<uint64_t> keys;        // items sorted heaviest first: (~float bits, index)
  std::vector<uint64_t> radix;       // the sorts' second buffer
  std::vector<int32_t> high;         // the rank sort's weight bits
  std::vector<int32_t> pack_items;   // items held by each pack
  std::vector<float> pack_weight;    // accumulated weight of each pack
  Tree<uint64_t, true> packs;        // packs with room: (weight bits, index), smallest wins
                                     // (hierarchical_row: index << bits | items held)
  Tree<u128, false> experts;         // (w/count bits, -count, -index), largest wins
  Tree<uint64_t, false> short_experts;  // the same in 64 bits (counts, indices < 2^16)
  std::vector<u128> next_key;           // each expert's key once it has one more replica
  std::vector<uint64_t> short_next_key;
  std::vector<int32_t> rep_count;    // replicas of each expert
  // Hierarchical policy.
  std::vector<float> group_load;
  std::vector<int32_t> group_pack, group_rank, mlog2log;
  std::vector<float> node_weight;
  std::vector<int32_t> slot_expert, slot_rank;
  // hierarchical_row: each slot's next slot of the same expert, and the packing order.
  std::vector<int32_t> last_slot, next_slot, item_slot;
  std::vector<float> item_load;
};

// Up to this many items a sort counts each item's rank (branch-free, vectorised comparisons,
// O(n^2)); above it an LSD radix sort (four 256-entry histograms) is cheaper.
constexpr int32_t kRankSortMaxItems = 64;

#ifdef DEEPPAR_EPLB_AVX512
// Whether the AVX-512 rank sort may run: the CPU has it and torch's CPU capability (which
// ATEN_CPU_CAPABILITY=default or avx2 lowers) allows it.
inline bool avx512_rank_sort() {
  static const bool enabled =
      __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return enabled;
}

// The rank sort below for n <= 64 with AVX-512: the n high halves sit in four registers, and
// an item's rank is two population counts of 64-bit comparison masks (about twice as fast).
__attribute__((target("avx512f,popcnt"))) inline void rank_sort_avx512(uint64_t* keys,
                                                                        uint64_t* tmp,
                                                                        int32_t n) {
  alignas(64) int32_t high[64];
  for (int32_t i = 0; i < 64; ++i) {  // padding above every key: never counted
    high[i] = i < n ? static_cast<int32_t>(keys[i] >> 32) : std::numeric_limits<int32_t>::max();
  }
  const __m512i h0 = _mm512_load_si512(high), h1 = _mm512_load_si512(high + 16);
  const __m512i h2 = _mm512_load_si512(high + 32), h3 = _mm512_load_si512(high + 48);
  for (int32_t i = 0; i < n; ++i) {
    const __m512i h = _mm512_set1_epi32(high[i]);
    const uint64_t below = static_cast<uint64_t>(_mm512_cmplt_epi32_mask(h0, h)) |
                           static_cast<uint64_t>(_mm512_cmplt_epi32_mask(h1, h)) << 16 |
                           static_cast<uint64_t>(_mm512_cmplt_epi32_mask(h2, h)) << 32 |
                           static_cast<uint64_t>(_mm512_cmplt_epi32_mask(h3, h)) << 48;
    const uint64_t equal = static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(h0, h)) |
                           static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(h1, h)) << 16 |
                           static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(h2, h)) << 32 |
                           static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(h3, h)) << 48;
    const uint64_t before = (uint64_t{1} << i) - 1;  // i < 64
    tmp[__builtin_popcountll(below) + __builtin_popcountll(equal & before)] = keys[i];
  }
  std::copy(tmp, tmp + n, keys);
}
#endif

// Sorts keys[0, n) ascending, where equal high halves (the weight bits) come in ascending
// order of their low halves (an index). Neither sort branches on the data (a comparison sort
// mispredicts about half its branches). tmp: n words; high: n ints.
inline void sort_weight_keys(uint64_t* keys, uint64_t* tmp, int32_t* high, int32_t n) {
#ifdef DEEPPAR_EPLB_AVX512
  static_assert(kRankSortMaxItems <= 64, "rank_sort_avx512 holds at most 64 keys");
  if (n <= kRankSortMaxItems && avx512_rank_sort()) {
    rank_sort_avx512(keys, tmp, n);
    return;
  }
#endif
  if (n <= kRankSortMaxItems) {
    // High halves are ~float bits of non-negative floats: top bit set, so they order the same
    // as signed ints. Rank of item i: items below it, and equal ones before it.
    for (int32_t i = 0; i < n; ++i) high[i] = static_cast<int32_t>(keys[i] >> 32);
    for (int32_t i = 0; i < n; ++i) {
      const int32_t h = high[i];
      int32_t rank = 0;
      for (int32_t j = 0; j < i; ++j) rank += high[j] <= h;
      for (int32_t j = i + 1; j < n; ++j) rank += high[j] < h;
      tmp[rank] = keys[i];
    }
    std::copy(tmp, tmp + n, keys);
    return;
  }
  int32_t count[4][256] = {};
  for (int32_t i = 0; i < n; ++i) {
    const uint32_t h = static_cast<uint32_t>(keys[i] >> 32);
    ++count[0][h & 0xff];
    ++count[1][(h >> 8) & 0xff];
    ++count[2][(h >> 16) & 0xff];
    ++count[3][h >> 24];
  }
  uint64_t* from = keys;
  uint64_t* to = tmp;
  for (int32_t digit = 0; digit < 4; ++digit) {
    const int32_t shift = 32 + 8 * digit;
    int32_t* c = count[digit];
    if (c[(from[0] >> shift) & 0xff] == n) continue;  // one digit everywhere: no-op pass
    int32_t at = 0;
    for (int32_t d = 0; d < 256; ++d) {
      const int32_t here = c[d];
      c[d] = at;
      at += here;
    }
    for (int32_t i = 0; i < n; ++i) to[c[(from[i] >> shift) & 0xff]++] = from[i];
    std::swap(from, to);
  }
  if (from != keys) std::copy(from, from + n, keys);
}

// Items of w sorted heaviest first, lowest index first among equal weights, into s.keys as
// (~float bits << 32 | index) (non-negative float bits order like the floats).
inline void sort_heaviest_first(const float* w, int32_t n, Scratch& s) {
  s.keys.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    s.keys[i] = (static_cast<uint64_t>(~float_bits(w[i])) << 32) | static_cast<uint32_t>(i);
  }
  s.radix.resize(n);
  s.high.resize(n);
  sort_weight_keys(s.keys.data(), s.radix.data(), s.high.data(), n);
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
inline int32_t replica_expert(u128 key) {
  return static_cast<int32_t>(~static_cast<uint64_t>(key) & 0xffffffffu);
}

// The same order in one word, for counts and indices below 2^16 (every real shape): a
// comparison of two words instead of four.
constexpr int32_t kShortKeyLimit = 1 << 16;
inline uint64_t short_replica_key(float ratio, int32_t count, int32_t expert) {
  return (static_cast<uint64_t>(float_bits(ratio)) << 32) |
         (static_cast<uint64_t>(0xffffu - static_cast<uint32_t>(count)) << 16) |
         (0xffffu - static_cast<uint32_t>(expert));
}
inline int32_t replica_expert(uint64_t key) {
  return static_cast<int32_t>(0xffffu - static_cast<uint32_t>(key & 0xffffu));
}

// The greedy of the spec's replication over a tournament tree. Each expert's key for its next
// replica is computed ahead (next_key), so the division w / count runs beside the tree update
// instead of on the chain from one pick to the next.
template <class Key, class MakeKey>
void replicate_greedy(const float* w, int32_t n, int32_t k, int32_t* slot_expert,
                      int32_t* slot_rank, int32_t* count, Tree<Key, false>& experts,
                      std::vector<Key>& next_key, MakeKey make_key) {
  experts.reset(n);
  next_key.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    experts.leaf(i) = make_key(w[i], 1, i);
    next_key[i] = make_key(w[i] * 0.5f, 2, i);  // w / 2, correctly rounded either way
  }
  Key best = experts.build();
  for (int32_t j = n; j < k; ++j) {
    const int32_t e = replica_expert(best);
    slot_expert[j] = e;
    const int32_t c = count[e]++;
    slot_rank[j] = c;
    best = experts.update(e, next_key[e]);
    next_key[e] = make_key(w[e] / static_cast<float>(c + 2), c + 2, e);
  }
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
  if (k < kShortKeyLimit) {  // counts <= k - n + 1, indices < n
    replicate_greedy(w, n, k, slot_expert, slot_rank, count, s.short_experts,
                     s.short_next_key, short_replica_key);
  } else {
    replicate_greedy(w, n, k, slot_expert, slot_rank, count, s.experts, s.next_key,
                     replica_key);
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

// A node's k replicas in the packing's visiting order (spec "Balanced packing": replica load
// w / count heaviest first, lowest slot first on ties), into s.item_slot and s.item_load, after
// replicate_row (s.slot_expert, s.rep_count). Every replica of an expert has the same load and
// its slots ascend with its replica rank, so one sort of the n experts by that load suffices,
// each expert expanded into its slots; only a run of equal loads over several experts, one of
// them replicated, can then be out of slot order, and such a run is sorted by slot.
inline void replica_order(const float* w, int32_t n, int32_t k, Scratch& s) {
  const int32_t* count = s.rep_count.data();
  s.keys.resize(n);
  s.radix.resize(n);
  s.high.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    s.keys[i] = (static_cast<uint64_t>(~float_bits(w[i] / static_cast<float>(count[i]))) << 32) |
                static_cast<uint32_t>(i);
  }
  sort_weight_keys(s.keys.data(), s.radix.data(), s.high.data(), n);
  // next_slot[j]: the next slot of the expert in slot j (replicas were appended in slot order).
  s.next_slot.resize(k);
  s.last_slot.resize(n);
  for (int32_t i = 0; i < n; ++i) s.last_slot[i] = i;
  for (int32_t j = n; j < k; ++j) {
    const int32_t e = s.slot_expert[j];
    s.next_slot[s.last_slot[e]] = j;
    s.last_slot[e] = j;
  }
  s.item_slot.resize(k);
  s.item_load.resize(k);
  int32_t t = 0;
  for (int32_t i = 0; i < n; ++i) {
    const uint64_t key = s.keys[i];
    const int32_t e = static_cast<int32_t>(key & 0xffffffffu);
    const float load = bits_float(~static_cast<uint32_t>(key >> 32));
    int32_t j = e;
    for (int32_t r = 0; r < count[e]; ++r, ++t) {
      s.item_slot[t] = j;
      s.item_load[t] = load;
      j = s.next_slot[j];
    }
  }
  int32_t first = k;  // the first item out of order
  for (int32_t i = k - 1; i >= 1; --i) {
    const bool tie = s.item_load[i] == s.item_load[i - 1];
    first = tie & (s.item_slot[i] < s.item_slot[i - 1]) ? i - 1 : first;
  }
  if (first == k) return;
  while (first > 0 && s.item_load[first - 1] == s.item_load[first]) --first;
  for (int32_t lo = first; lo < k;) {
    int32_t hi = lo + 1;
    while (hi < k && s.item_load[hi] == s.item_load[lo]) ++hi;
    if (hi - lo > 1) std::sort(s.item_slot.begin() + lo, s.item_slot.begin() + hi);
    lo = hi;
  }
}

// Hierarchical policy for one layer (spec "Hierarchical policy"). Leaves the group packing
// (s.group_load, s.group_pack, s.group_rank) and the node-major order (s.mlog2log) in s.
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
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = s.mlog2log.data() + node * experts_per_node;
    for (int32_t i = 0; i < experts_per_node; ++i) s.node_weight[i] = w[node_log[i]];
    // Step 3: replicate within the node.
    replicate_row(s.node_weight.data(), experts_per_node, slots_per_node, s.slot_expert.data(),
                  s.slot_rank.data(), s.rep_count.data(), s);
    int64_t* node_phy2log = phy2log + static_cast<int64_t>(node) * slots_per_node;
    int64_t* node_rank = phy_rank + static_cast<int64_t>(node) * slots_per_node;
    if (slots_per_gpu == 1) {  // steps 4-5: replica j on GPU j
      for (int32_t j = 0; j < slots_per_node; ++j) {
        node_phy2log[j] = node_log[s.slot_expert[j]];
        node_rank[j] = s.slot_rank[j];
      }
    } else {
      // Step 4: each replica, heaviest first, to the lightest GPU of the node with room.
      replica_order(s.node_weight.data(), experts_per_node, slots_per_node, s);
      // A GPU's key: (weight bits, GPU << rank_bits | replicas it holds). Among equal weights
      // the lower GPU wins (the count sits below the index bits), and the count is read from
      // the key rather than from memory, off the chain of dependent choices.
      int32_t rank_bits = 1;
      while ((int32_t{1} << rank_bits) < slots_per_gpu) ++rank_bits;  // 2 * R/N < 2^25
      s.packs.reset(gpus_per_node);
      for (int32_t p = 0; p < gpus_per_node; ++p) {
        s.packs.leaf(p) = static_cast<uint64_t>(static_cast<uint32_t>(p) << rank_bits);
      }
      uint64_t best = s.packs.build();
      for (int32_t t = 0; t < slots_per_node; ++t) {
        // The lightest GPU with room, lowest index on ties: the smallest key; its weight
        // (never -0.0: sums start at +0.0) is read back from the key.
        const uint32_t low = static_cast<uint32_t>(best);
        const int32_t p = static_cast<int32_t>(low >> rank_bits);
        const int32_t rank = static_cast<int32_t>(low & ((uint32_t{1} << rank_bits) - 1));
        const float weight = bits_float(static_cast<uint32_t>(best >> 32)) + s.item_load[t];
        // Step 5: physical slot node * (R/N) + gpu * (R/P) + rank in GPU.
        const int32_t j = s.item_slot[t];
        node_phy2log[p * slots_per_gpu + rank] = node_log[s.slot_expert[j]];
        node_rank[p * slots_per_gpu + rank] = s.slot_rank[j];
        best = s.packs.update(p, rank + 1 == slots_per_gpu
                                     ? std::numeric_limits<uint64_t>::max()
                                     : (static_cast<uint64_t>(raw_bits(weight)) << 32) | (low + 1));
      }
    }
    for (int32_t i = 0; i < experts_per_node; ++i) logcnt[node_log[i]] = s.rep_count[i];
  }
}

}  // namespace eplb_cpu
}  // namespace deeppar
