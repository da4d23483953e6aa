// EPLB method="balanced" for one layer, written once for the host and the device: the CPU op
// (csrc/cpu/eplb_balanced.cpp) and the CUDA op (csrc/cuda/eplb_balanced.cu, one thread per
// layer) run these same functions on plain arrays, so the CPU tests test the device algorithm
// and both give bit-identical plans. Needs no torch headers (tools/cuda_compile_check.sh
// compiles it with plain nvcc).
//
// A plan with a max GPU load never above the spec's hierarchical plan's, and no two replicas
// of one expert on a GPU where that can be avoided. Same replication and node rules as the spec:
//   * each node replicates its experts with the spec's greedy, so replica counts are the spec's;
//   * two candidates: (0) the spec's nodes and GPU packing, (1) nodes balanced by swapping
//     groups between the most loaded node and another (and between any two nodes to even them
//     out when that stops), replicas filled heaviest first into the lightest GPU with room that
//     does not hold the expert yet;
//   * in both, pairwise swaps between the most loaded GPU of a node and another lower its max
//     while they can (down to the layer's lower bound or the largest max already reached on
//     another node: below that the layer's max cannot change), then duplicate replicas move
//     away by swaps that keep both GPUs under the layer's max and create no new duplicate;
//   * the candidate with the smaller max GPU load (float32 replica loads summed in float64,
//     recomputed from the plan; ties: candidate 1) is kept if it is at most the spec plan's,
//     else the spec's plan. Candidate 1 is planned first; candidate 0 is skipped when
//     candidate 1 is already below candidate 0's lower bound, and a candidate stops as soon
//     as one of its nodes cannot beat the best plan so far.
// Deterministic: every scan runs in index order, ties go to the lowest index. Arithmetic is
// IEEE on both sides: float32 division and additions of the spec, float64 sums and differences
// of the search, the one product explicitly rounded (no FMA contraction on the device). Every
// loop is bounded (the swap searches by a round limit), also on malformed input.
//
// Cost per layer: the spec's plan, then per candidate and node O(rounds * GPUs * (R/P)^2) for
// the swaps; scratch: Layout(sizes).bytes per layer (35 KB at V3 prefill, 106 KB at the
// stress shape).
#pragma once
#include <cstdint>
#include <cstring>
#ifdef __CUDACC__
#include <cstdio>
#endif

#ifdef __CUDACC__
#define DEEPPAR_HD __host__ __device__
#else
#define DEEPPAR_HD
#endif

namespace deeppar {
namespace eplb_balanced {

struct Sizes {
  int32_t experts, replicas, groups, nodes, gpus;
};

// Relative margin a swap must gain, so that rounding cannot make swaps cycle.
constexpr double kGain = 1e-12;
// Above every load (finite float32 values and their float64 sums): DBL_MAX.
constexpr double kHuge = 1.7976931348623157e308;

DEEPPAR_HD inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DEEPPAR_HD inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

DEEPPAR_HD inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Bits of a non-negative float (-0.0 made +0.0): they order like the floats, +inf included.
DEEPPAR_HD inline uint32_t float_bits(float v) {
  v = add_rn(v, 0.0f);
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
#endif
}

DEEPPAR_HD inline double max_d(double a, double b) { return a < b ? b : a; }

// Workspace of one layer: byte offsets of its arrays (8-byte aligned) and the total size.
struct Layout {
  // float64 [R] replica loads, [R] loads by position, [P] GPU loads, [G] group loads,
  // [G] group loads by position, [N] node loads
  int64_t item_load, member_load, pack_load, group_load_d, group_member_load, node_load;
  // uint64 [max(R, G)] sort keys, [max(P, N)] pack keys, [E] replication keys
  int64_t keys, pack_key, ratio;
  // int32 arrays
  int64_t group_load, group_pack, group_rank, spec_mlog, cand_mlog;
  int64_t spec_slot_expert, spec_count, spec_gpu, spec_rank_in_gpu, replica_load;
  int64_t slot_expert, count, slot_rank, pack_weight, pack_items;
  int64_t item_class, class_first, item_next, item_at, member, group_member, group_at;
  int64_t best_phy2log, best_logcnt, cand_phy2log, cand_logcnt, cand_replica_load, fill;
  int64_t node_order, node_sorted, mark, placed, tree, bytes;

  int64_t at = 0;
  // Reserves an array of `words` words of `word_bytes` bytes; returns its offset.
  DEEPPAR_HD int64_t take(int64_t words, int64_t word_bytes) {
    const int64_t here = at;
    at += (words * word_bytes + 7) / 8 * 8;
    return here;
  }

  DEEPPAR_HD explicit Layout(const Sizes& s) {
    const int64_t e = s.experts, r = s.replicas, g = s.groups, n = s.nodes, p = s.gpus;
    item_load = take(r, 8);
    member_load = take(r, 8);
    pack_load = take(p, 8);
    group_load_d = take(g, 8);
    group_member_load = take(g, 8);
    node_load = take(n, 8);
    keys = take(r > g ? r : g, 8);
    pack_key = take(p > n ? p : n, 8);
    ratio = take(e, 8);
    group_load = take(g, 4);
    group_pack = take(g, 4);
    group_rank = take(g, 4);
    spec_mlog = take(e, 4);
    cand_mlog = take(e, 4);
    spec_slot_expert = take(r, 4);
    spec_count = take(e, 4);
    spec_gpu = take(r, 4);
    spec_rank_in_gpu = take(r, 4);
    replica_load = take(r, 4);
    slot_expert = take(r, 4);
    count = take(e, 4);
    slot_rank = take(r, 4);
    pack_weight = take(p > n ? p : n, 4);
    pack_items = take(p > n ? p : n, 4);
    item_class = take(r, 4);
    class_first = take(e, 4);
    item_next = take(r, 4);
    item_at = take(r, 4);
    member = take(r, 4);
    group_member = take(g, 4);
    group_at = take(g, 4);
    best_phy2log = take(r, 4);
    best_logcnt = take(e, 4);
    cand_phy2log = take(r, 4);
    cand_logcnt = take(e, 4);
    cand_replica_load = take(r, 4);
    fill = take(e > p ? e : p, 4);
    node_order = take(n, 4);
    node_sorted = take(n, 4);
    mark = take(p, 4);
    placed = take(r, 4);
    int64_t leaves = 1;
    while (leaves < e) leaves <<= 1;
    tree = take(2 * leaves, 4);
    bytes = at;
  }
};

// Typed views of a layer's workspace.
struct Work {
  double *item_load, *member_load, *pack_load, *group_load_d, *group_member_load, *node_load;
  uint64_t *keys, *pack_key, *ratio;
  float *group_load, *replica_load, *pack_weight, *cand_replica_load;
  int32_t *group_pack, *group_rank, *spec_mlog, *cand_mlog;
  int32_t *spec_slot_expert, *spec_count, *spec_gpu, *spec_rank_in_gpu;
  int32_t *slot_expert, *count, *slot_rank, *pack_items;
  int32_t *item_class, *class_first, *item_next, *item_at, *member, *group_member, *group_at;
  int32_t *best_phy2log, *best_logcnt, *cand_phy2log, *cand_logcnt, *fill, *node_order, *node_sorted, *mark, *placed, *tree;

  DEEPPAR_HD Work(unsigned char* base, const Layout& l)
      : item_load(reinterpret_cast<double*>(base + l.item_load)),
        member_load(reinterpret_cast<double*>(base + l.member_load)),
        pack_load(reinterpret_cast<double*>(base + l.pack_load)),
        group_load_d(reinterpret_cast<double*>(base + l.group_load_d)),
        group_member_load(reinterpret_cast<double*>(base + l.group_member_load)),
        node_load(reinterpret_cast<double*>(base + l.node_load)),
        keys(reinterpret_cast<uint64_t*>(base + l.keys)),
        pack_key(reinterpret_cast<uint64_t*>(base + l.pack_key)),
        ratio(reinterpret_cast<uint64_t*>(base + l.ratio)),
        group_load(reinterpret_cast<float*>(base + l.group_load)),
        replica_load(reinterpret_cast<float*>(base + l.replica_load)),
        pack_weight(reinterpret_cast<float*>(base + l.pack_weight)),
        cand_replica_load(reinterpret_cast<float*>(base + l.cand_replica_load)),
        group_pack(reinterpret_cast<int32_t*>(base + l.group_pack)),
        group_rank(reinterpret_cast<int32_t*>(base + l.group_rank)),
        spec_mlog(reinterpret_cast<int32_t*>(base + l.spec_mlog)),
        cand_mlog(reinterpret_cast<int32_t*>(base + l.cand_mlog)),
        spec_slot_expert(reinterpret_cast<int32_t*>(base + l.spec_slot_expert)),
        spec_count(reinterpret_cast<int32_t*>(base + l.spec_count)),
        spec_gpu(reinterpret_cast<int32_t*>(base + l.spec_gpu)),
        spec_rank_in_gpu(reinterpret_cast<int32_t*>(base + l.spec_rank_in_gpu)),
        slot_expert(reinterpret_cast<int32_t*>(base + l.slot_expert)),
        count(reinterpret_cast<int32_t*>(base + l.count)),
        slot_rank(reinterpret_cast<int32_t*>(base + l.slot_rank)),
        pack_items(reinterpret_cast<int32_t*>(base + l.pack_items)),
        item_class(reinterpret_cast<int32_t*>(base + l.item_class)),
        class_first(reinterpret_cast<int32_t*>(base + l.class_first)),
        item_next(reinterpret_cast<int32_t*>(base + l.item_next)),
        item_at(reinterpret_cast<int32_t*>(base + l.item_at)),
        member(reinterpret_cast<int32_t*>(base + l.member)),
        group_member(reinterpret_cast<int32_t*>(base + l.group_member)),
        group_at(reinterpret_cast<int32_t*>(base + l.group_at)),
        best_phy2log(reinterpret_cast<int32_t*>(base + l.best_phy2log)),
        best_logcnt(reinterpret_cast<int32_t*>(base + l.best_logcnt)),
        cand_phy2log(reinterpret_cast<int32_t*>(base + l.cand_phy2log)),
        cand_logcnt(reinterpret_cast<int32_t*>(base + l.cand_logcnt)),
        fill(reinterpret_cast<int32_t*>(base + l.fill)),
        node_order(reinterpret_cast<int32_t*>(base + l.node_order)),
        node_sorted(reinterpret_cast<int32_t*>(base + l.node_sorted)),
        mark(reinterpret_cast<int32_t*>(base + l.mark)),
        placed(reinterpret_cast<int32_t*>(base + l.placed)),
        tree(reinterpret_cast<int32_t*>(base + l.tree)) {}
};

// ---------------------------------------------------------------------------------------------
// The spec's building blocks (specs/eplb.md), sequential, same tie rules as csrc/cpu/eplb.cpp.

// Max-heap sift-down of a[root] within a[0, end).
DEEPPAR_HD inline void sift_down(uint64_t* a, int32_t root, int32_t end) {
  const uint64_t v = a[root];
  for (int32_t child = 2 * root + 1; child < end; child = 2 * root + 1) {
    if (child + 1 < end && a[child] < a[child + 1]) ++child;
    if (!(v < a[child])) break;
    a[root] = a[child];
    root = child;
  }
  a[root] = v;
}

// Ascending in-place sort of n keys: insertion sort for short rows (fewer mispredicted branches
// than a heap sort there), heap sort beyond (no recursion, no extra memory). Keys are distinct,
// so the order is the one any sort gives.
constexpr int32_t kInsertionSortMax = 160;

DEEPPAR_HD inline void sort_keys(uint64_t* a, int32_t n) {
  if (n <= kInsertionSortMax) {
    for (int32_t i = 1; i < n; ++i) {
      const uint64_t v = a[i];
      int32_t j = i;
      for (; j > 0 && v < a[j - 1]; --j) a[j] = a[j - 1];
      a[j] = v;
    }
    return;
  }
  for (int32_t i = n / 2 - 1; i >= 0; --i) sift_down(a, i, n);
  for (int32_t end = n - 1; end > 0; --end) {
    const uint64_t top = a[0];
    a[0] = a[end];
    a[end] = top;
    sift_down(a, 0, end);
  }
}

// Items of w heaviest first, lowest index first among equals: keys (~float bits << 32 | index).
DEEPPAR_HD inline void sort_heaviest_first(const float* w, int32_t n, uint64_t* keys) {
  for (int32_t i = 0; i < n; ++i) {
    keys[i] = (static_cast<uint64_t>(~float_bits(w[i])) << 32) | static_cast<uint32_t>(i);
  }
  sort_keys(keys, n);
}

// Balanced packing of n items into m packs of n/m items (spec "Balanced packing"); leaves the
// items' order (sort_heaviest_first) in keys. pack_key: [m] scratch.
DEEPPAR_HD inline void spec_pack(const float* w, int32_t n, int32_t m, int32_t* pack,
                                 int32_t* rank, uint64_t* keys, float* weight, int32_t* items,
                                 uint64_t* pack_key) {
  const int32_t per_pack = n / m;
  if (per_pack == 1) {
    for (int32_t i = 0; i < n; ++i) {
      pack[i] = i;
      rank[i] = 0;
    }
    return;
  }
  sort_heaviest_first(w, n, keys);
  for (int32_t p = 0; p < m; ++p) {
    weight[p] = 0.0f;
    items[p] = 0;
    pack_key[p] = static_cast<uint64_t>(p);  // (weight bits << 32 | index); full: all ones
  }
  for (int32_t k = 0; k < n; ++k) {
    const int32_t item = static_cast<int32_t>(keys[k] & 0xffffffffu);
    uint64_t best_key = pack_key[0];  // lightest pack with room, lowest index on ties
    for (int32_t p = 1; p < m; ++p) best_key = pack_key[p] < best_key ? pack_key[p] : best_key;
    const int32_t best = static_cast<int32_t>(best_key & 0xffffffffu);
    pack[item] = best;
    rank[item] = items[best]++;
    weight[best] = add_rn(weight[best], w[item]);
    pack_key[best] = items[best] == per_pack
                         ? ~uint64_t{0}
                         : (static_cast<uint64_t>(float_bits(weight[best])) << 32) |
                               static_cast<uint32_t>(best);
  }
}

// Key of an expert for replication, larger first: weight/count bits, then fewer replicas
// (the lower index on ties: the first in index order).
DEEPPAR_HD inline uint64_t replica_key(float ratio, int32_t count) {
  return (static_cast<uint64_t>(float_bits(ratio)) << 32) |
         (0xffffffffu - static_cast<uint32_t>(count));
}

// Tournament tree over `size` (a power of two) leaves holding the indices [0, n), -1 padding:
// node 1 holds the index with the largest key, the lowest index on ties (a left subtree holds
// the lower indices). node: [2 * size].
DEEPPAR_HD inline int32_t larger_key(const uint64_t* key, int32_t a, int32_t b) {
  if (b < 0) return a;
  if (a < 0) return b;
  return key[b] > key[a] ? b : a;
}

DEEPPAR_HD inline void tree_build(int32_t* node, int32_t size, int32_t n, const uint64_t* key) {
  for (int32_t i = 0; i < size; ++i) node[size + i] = i < n ? i : -1;
  for (int32_t i = size - 1; i >= 1; --i) node[i] = larger_key(key, node[2 * i], node[2 * i + 1]);
}

DEEPPAR_HD inline void tree_update(int32_t* node, int32_t size, int32_t leaf, const uint64_t* key) {
  for (int32_t at = (size + leaf) >> 1; at >= 1; at >>= 1) {
    node[at] = larger_key(key, node[2 * at], node[2 * at + 1]);
  }
}

DEEPPAR_HD inline int32_t pow2_at_least(int32_t n) {
  int32_t size = 1;
  while (size < n) size <<= 1;
  return size;
}

// Replication of n experts into k >= n slots (spec "Replication"): the largest weight/count,
// then fewer replicas, then the lowest index. key: [n], tree: [2 * pow2_at_least(n)] scratch.
DEEPPAR_HD inline void spec_replicate(const float* w, int32_t n, int32_t k, int32_t* slot_expert,
                                      int32_t* slot_rank, int32_t* count, uint64_t* key,
                                      int32_t* tree) {
  for (int32_t i = 0; i < n; ++i) {
    slot_expert[i] = i;
    slot_rank[i] = 0;
    count[i] = 1;
    key[i] = replica_key(w[i], 1);
  }
  if (k == n) return;
  const int32_t size = pow2_at_least(n);
  tree_build(tree, size, n, key);
  for (int32_t j = n; j < k; ++j) {
    const int32_t e = tree[1];
    slot_expert[j] = e;
    slot_rank[j] = count[e];
    const int32_t c = ++count[e];
    key[e] = replica_key(div_rn(w[e], static_cast<float>(c)), c);
    tree_update(tree, size, e, key);
  }
}

// Steps 1-2 of the hierarchical policy: group loads packed onto nodes (group_pack, group_rank)
// and the node-major order spec_mlog.
DEEPPAR_HD inline void spec_node_order(const float* w, const Sizes& sh, Work& k) {
  const int32_t group_size = sh.experts / sh.groups;
  const int32_t groups_per_node = sh.groups / sh.nodes;
  for (int32_t g = 0; g < sh.groups; ++g) {
    float total = 0.0f;
    for (int32_t i = 0; i < group_size; ++i) total = add_rn(total, w[g * group_size + i]);
    k.group_load[g] = total;
  }
  spec_pack(k.group_load, sh.groups, sh.nodes, k.group_pack, k.group_rank, k.keys, k.pack_weight,
            k.pack_items, k.pack_key);
  for (int32_t g = 0; g < sh.groups; ++g) {
    const int32_t base = (k.group_pack[g] * groups_per_node + k.group_rank[g]) * group_size;
    for (int32_t i = 0; i < group_size; ++i) k.spec_mlog[base + i] = g * group_size + i;
  }
}

// Step 3 for every node in the order mlog, except nodes flagged in skip (if not null): slot_expert [R] (node-local expert of each node
// slot), slot_rank [R], count [E] (per node-local expert), replica_load [R] (float32 load of
// each replica, as the spec packs it).
DEEPPAR_HD inline void replicate_nodes(const float* w, const Sizes& sh, const int32_t* mlog,
                                       int32_t* slot_expert, int32_t* slot_rank, int32_t* count,
                                       float* replica_load, const int32_t* skip, Work& k) {
  const int32_t epn = sh.experts / sh.nodes, spn = sh.replicas / sh.nodes;
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = mlog + node * epn;
    if (skip != nullptr && skip[node]) continue;
    // The node's weights in mlog order (item_load is free here: float32 view of its storage).
    float* node_w = reinterpret_cast<float*>(k.item_load);
    for (int32_t i = 0; i < epn; ++i) node_w[i] = w[node_log[i]];
    int32_t* se = slot_expert + node * spn;
    int32_t* cnt = count + node * epn;
    spec_replicate(node_w, epn, spn, se, slot_rank + node * spn, cnt, k.ratio, k.tree);
    for (int32_t j = 0; j < spn; ++j) {
      replica_load[node * spn + j] = div_rn(node_w[se[j]], static_cast<float>(cnt[se[j]]));
    }
  }
}

// Largest GPU load of a plan: float32 replica loads summed in float64, slot order. Index is
// int64_t for the op's outputs and int32_t for the search's own rows.
template <typename Index>
DEEPPAR_HD inline double plan_max_load(const float* w, const Index* phy2log, const Index* logcnt,
                                       int32_t replicas, int32_t gpus) {
  const int32_t per_gpu = replicas / gpus;
  double top = 0.0;
  for (int32_t g = 0; g < gpus; ++g) {
    double sum = 0.0;
    for (int32_t s = 0; s < per_gpu; ++s) {
      const Index e = phy2log[g * per_gpu + s];
      sum += static_cast<double>(div_rn(w[e], static_cast<float>(logcnt[e])));
    }
    top = max_d(top, sum);
  }
  return top;
}

// ---------------------------------------------------------------------------------------------
// Local search: items packed into m packs of `per` positions each (fixed cardinality).

struct Packs {
  int32_t m, per;
  const double* item_load;    // [items]
  const int32_t* item_class;  // [items] class (expert) of each item; null: no duplicate rule
  const int32_t* class_first; // [classes] first item of each class, -1: none
  const int32_t* item_next;   // [items] next item of the same class, -1: none
  int32_t* item_at;           // [items] position (pack * per + index) holding it, -1: none
  int32_t* member;            // [m * per] item at each position
  double* member_load;        // [m * per] its load (contiguous for the scans)
  double* load;               // [m] sum of the loads of its items

  DEEPPAR_HD void start() {
    for (int32_t p = 0; p < m; ++p) load[p] = 0.0;
  }
  DEEPPAR_HD void put(int32_t p, int32_t i, int32_t item) {
    const int32_t at = p * per + i;
    member[at] = item;
    member_load[at] = item_load[item];
    item_at[item] = at;
    load[p] += item_load[item];
  }
  DEEPPAR_HD int32_t cls(int32_t at) const { return item_class ? item_class[member[at]] : -1; }

  // Whether pack p holds an item of class c other than the one at position skip (an expert
  // has few replicas: its list is short).
  DEEPPAR_HD bool holds(int32_t p, int32_t c, int32_t skip) const {
    if (c < 0) return false;
    const int32_t lo = p * per, hi = lo + per;
    for (int32_t it = class_first[c]; it >= 0; it = item_next[it]) {
      const int32_t at = item_at[it];
      if (at >= lo && at < hi && at != skip) return true;
    }
    return false;
  }

  DEEPPAR_HD int32_t heaviest() const {
    int32_t a = 0;
    for (int32_t p = 1; p < m; ++p) {
      if (load[p] > load[a]) a = p;
    }
    return a;
  }

  // Swaps positions at and bt (of packs p and q) and updates both loads.
  DEEPPAR_HD void swap(int32_t p, int32_t at, int32_t q, int32_t bt) {
    const double delta = member_load[at] - member_load[bt];
    load[p] -= delta;
    load[q] += delta;
    const int32_t x = member[at], y = member[bt];
    member[at] = y;
    member[bt] = x;
    item_at[y] = at;
    item_at[x] = bt;
    const double lx = member_load[at];
    member_load[at] = member_load[bt];
    member_load[bt] = lx;
  }
};

// Best swap between the heaviest pack a (load top) and pack q that brings both under `best`
// without creating a duplicate: lowers `best` and records the positions; false if none.
DEEPPAR_HD inline bool best_swap(const Packs& pk, int32_t a, int32_t q, double& best,
                                 int32_t& bi, int32_t& bj) {
  const double top = pk.load[a], other = pk.load[q];
  if (other >= best) return false;
  const int32_t a0 = a * pk.per, q0 = q * pk.per;
  const double* la = pk.member_load + a0;
  const double* lq = pk.member_load + q0;
  // pair = max(top - delta, other + delta) < best  <=>  top - best < delta < best - other.
  double low = top - best, high = best - other;
  bool found = false;
  for (int32_t i = 0; i < pk.per; ++i) {
    for (int32_t j = 0; j < pk.per; ++j) {
      const double delta = la[i] - lq[j];
      if (delta <= 0.0 || delta <= low || delta >= high) continue;
      const double pair = max_d(top - delta, other + delta);
      if (pair >= best) continue;
      if (pk.holds(a, pk.cls(q0 + j), a0 + i) || pk.holds(q, pk.cls(a0 + i), q0 + j)) continue;
      best = pair;
      low = top - best;
      high = best - other;
      bi = a0 + i;
      bj = q0 + j;
      found = true;
    }
  }
  return found;
}

// Pairwise swaps between the most loaded pack and another that lower the pair's max below the
// current max, until none does or the max is at most `target`; never creates a duplicate. The
// lightest pack is tried first (it usually has the best swap); only when it has none are all
// packs searched. Returns the max load reached.
DEEPPAR_HD inline double improve_max(Packs& pk, int32_t max_rounds, double target) {
  int32_t a = pk.heaviest();
  if (pk.m < 2) return pk.load[a];
  for (int32_t round = 0; round < max_rounds; ++round) {
    const double top = pk.load[a];
    if (top <= target) break;
    double best = top - mul_rn(top, kGain);
    int32_t light = a == 0 ? 1 : 0;
    for (int32_t q = 0; q < pk.m; ++q) {
      if (q != a && pk.load[q] < pk.load[light]) light = q;
    }
    int32_t bi = -1, bj = -1, bq = light;
    if (!best_swap(pk, a, light, best, bi, bj)) {
      for (int32_t q = 0; q < pk.m; ++q) {
        if (q != a && q != light && best_swap(pk, a, q, best, bi, bj)) bq = q;
      }
    }
    if (bi < 0) break;
    pk.swap(a, bi, bq, bj);
    a = pk.heaviest();
  }
  return pk.load[a];
}

// Moves duplicate replicas away by swaps that keep both packs at most `limit` and create no
// new duplicate; the swap with the smallest resulting pair max first. Returns whether any
// swap was made.
DEEPPAR_HD inline bool remove_duplicates(Packs& pk, double limit) {
  bool changed = false;
  for (int32_t p = 0; p < pk.m; ++p) {
    for (int32_t i = 0; i < pk.per; ++i) {
      const int32_t at = p * pk.per + i;
      const int32_t c = pk.cls(at);
      if (!pk.holds(p, c, at)) continue;
      double best = limit;
      int32_t bq = -1, bt = -1;
      for (int32_t q = 0; q < pk.m; ++q) {
        if (q == p || pk.holds(q, c, -1)) continue;
        for (int32_t j = 0; j < pk.per; ++j) {
          const int32_t qt = q * pk.per + j;
          if (pk.holds(p, pk.cls(qt), at)) continue;
          const double delta = pk.member_load[at] - pk.member_load[qt];
          const double pair = max_d(pk.load[p] - delta, pk.load[q] + delta);
          if (pair <= best && (bq < 0 || pair < best)) {
            best = pair;
            bq = q;
            bt = qt;
          }
        }
      }
      if (bq >= 0) {
        pk.swap(p, at, bq, bt);
        changed = true;
      }
    }
  }
  return changed;
}

// Heaviest item first (keys from sort_heaviest_first), each to the lightest pack with room
// that holds no item of its class, else to the lightest pack with room; ties: lowest index.
// fill, mark: [m], placed: [n] scratch.
DEEPPAR_HD inline void fill_distinct(const uint64_t* order, int32_t n, Packs& pk, int32_t* fill,
                                     int32_t* mark, int32_t* placed) {
  for (int32_t p = 0; p < pk.m; ++p) {
    fill[p] = 0;
    mark[p] = 0;
  }
  for (int32_t k = 0; k < n; ++k) {
    const int32_t item = static_cast<int32_t>(order[k] & 0xffffffffu);
    const int32_t c = pk.item_class[item];
    for (int32_t it = pk.class_first[c]; it >= 0; it = pk.item_next[it]) {
      if (pk.item_at[it] >= 0) mark[placed[it]] = 1;  // packs holding class c
    }
    int32_t any = -1, distinct = -1;  // selects without branches (loads are finite)
    double any_load = kHuge, distinct_load = kHuge;
    for (int32_t p = 0; p < pk.m; ++p) {
      const double l = pk.load[p];
      const bool room = fill[p] < pk.per;
      const bool lighter = room && l < any_load;
      any = lighter ? p : any;
      any_load = lighter ? l : any_load;
      const bool apart = room && mark[p] == 0 && l < distinct_load;
      distinct = apart ? p : distinct;
      distinct_load = apart ? l : distinct_load;
    }
    for (int32_t it = pk.class_first[c]; it >= 0; it = pk.item_next[it]) {
      if (pk.item_at[it] >= 0) mark[placed[it]] = 0;
    }
    const int32_t p = distinct >= 0 ? distinct : any;
    placed[item] = p;
    pk.put(p, fill[p]++, item);
  }
}

// Passes of even_out_pairs over the node pairs (it usually settles in two or three).
constexpr int32_t kEvenOutPasses = 8;

// Swaps between any two packs that bring their loads closer (the sum of squared loads falls,
// neither pack leaves the range of the two), the best swap of each pair, until a pass over
// all pairs changes nothing or `passes` passes ran. No duplicate rule (packs of groups).
DEEPPAR_HD inline void even_out_pairs(Packs& pk, int32_t passes) {
  for (int32_t pass = 0; pass < passes; ++pass) {
    bool changed = false;
    for (int32_t p = 0; p < pk.m; ++p) {
      for (int32_t q = p + 1; q < pk.m; ++q) {
        const bool p_heavier = pk.load[p] >= pk.load[q];
        const int32_t hi = p_heavier ? p : q, lo = p_heavier ? q : p;
        const double gap = pk.load[hi] - pk.load[lo];
        double best = gap - mul_rn(gap, 1e-9);  // |new gap| must fall below this
        int32_t bi = -1, bj = -1;
        for (int32_t i = 0; i < pk.per; ++i) {
          for (int32_t j = 0; j < pk.per; ++j) {
            const double delta = pk.member_load[hi * pk.per + i] - pk.member_load[lo * pk.per + j];
            if (delta <= 0.0 || delta >= gap) continue;
            const double left = gap - 2.0 * delta;
            const double size = left < 0.0 ? -left : left;
            if (size < best) {
              best = size;
              bi = hi * pk.per + i;
              bj = lo * pk.per + j;
            }
          }
        }
        if (bi >= 0) {
          pk.swap(hi, bi, lo, bj);
          changed = true;
        }
      }
    }
    if (!changed) return;
  }
}

// ---------------------------------------------------------------------------------------------
// The layer.

// Node-major order (as the spec's step 2) after swaps of groups between nodes that lower the
// largest node load, starting from the spec's group packing; when those stop, swaps that even
// out any two nodes (so that the most loaded node finds new swaps), then again swaps that lower
// the largest. Written to k.cand_mlog.
DEEPPAR_HD inline void improved_node_order(const Sizes& sh, Work& k) {
  const int32_t group_size = sh.experts / sh.groups;
  for (int32_t g = 0; g < sh.groups; ++g) k.group_load_d[g] = static_cast<double>(k.group_load[g]);
  Packs gp{sh.nodes,      sh.groups / sh.nodes, k.group_load_d, nullptr, nullptr, nullptr,
           k.group_at,    k.group_member,       k.group_member_load,     k.node_load};
  gp.start();
  for (int32_t g = 0; g < sh.groups; ++g) gp.put(k.group_pack[g], k.group_rank[g], g);
  if (sh.nodes > 1 && gp.per > 1) {
    improve_max(gp, 8 * sh.groups + 64, 0.0);
    even_out_pairs(gp, kEvenOutPasses);
    improve_max(gp, 8 * sh.groups + 64, 0.0);
  }
  for (int32_t pos = 0; pos < sh.groups; ++pos) {
    const int32_t g = gp.member[pos];
    for (int32_t i = 0; i < group_size; ++i) k.cand_mlog[pos * group_size + i] = g * group_size + i;
  }
}

// The packs of one node: pointers offset to the node's items, item numbers node-local.
DEEPPAR_HD inline Packs node_packs(const Sizes& sh, int32_t node, Work& k) {
  const int32_t epn = sh.experts / sh.nodes, spn = sh.replicas / sh.nodes;
  const int32_t gpn = sh.gpus / sh.nodes, i0 = node * spn;
  return Packs{gpn,
               sh.replicas / sh.gpus,
               k.item_load + i0,
               k.item_class + i0,
               k.class_first + node * epn,
               k.item_next + i0,
               k.item_at + i0,
               k.member + i0,
               k.member_load + i0,
               k.pack_load + node * gpn};
}

// Replicas of every node (from replicate_nodes: slot_expert, count, replica_load) placed on its
// GPUs: the spec's packing (gpu, rank_in_gpu non-null) or distinct-first filling (heaviest
// first: the order of a node's replicas is in keys already if keys_sorted[node]), then the swap
// search. A candidate that cannot beat `best` (the best max GPU load so far) stops early.
// Writes phy2log [R] and logcnt [E] (int32) and returns the plan's max GPU load, or -1 when it
// stopped early.
DEEPPAR_HD inline double place(const float* w, const Sizes& sh, const int32_t* mlog,
                               const int32_t* slot_expert, const int32_t* count,
                               const float* replica_load, const int32_t* gpu,
                               const int32_t* rank_in_gpu, const int32_t* keys_sorted, double best,
                               int32_t* phy2log, int32_t* logcnt, Work& k) {
  const int32_t epn = sh.experts / sh.nodes, spn = sh.replicas / sh.nodes;
  const int32_t gpn = sh.gpus / sh.nodes;
  const int32_t rounds = 8 * spn + 64;
  // Items: the R replicas, node after node, numbered within their node; classes: node-local
  // experts, each with a list of its items (first item, next item).
  for (int32_t node = 0; node < sh.nodes; ++node) {
    int32_t* first = k.class_first + node * epn;
    for (int32_t i = 0; i < epn; ++i) first[i] = -1;
    for (int32_t j = spn - 1; j >= 0; --j) {
      const int32_t item = node * spn + j, e = slot_expert[item];
      k.item_load[item] = static_cast<double>(replica_load[item]);
      k.item_at[item] = -1;
      k.item_class[item] = e;
      k.item_next[item] = first[e];
      first[e] = j;
    }
  }
  // Lower bound of the layer's max: no node's max is below its mean GPU load or its largest
  // replica. Nodes are searched from the largest bound down.
  double bound = 0.0;
  for (int32_t node = 0; node < sh.nodes; ++node) {
    double total = 0.0, largest = 0.0;
    for (int32_t j = node * spn; j < (node + 1) * spn; ++j) {
      total += k.item_load[j];
      largest = max_d(largest, k.item_load[j]);
    }
    k.node_load[node] = max_d(total / gpn, largest);
    bound = max_d(bound, k.node_load[node]);
    int32_t at = node;  // insertion by descending bound, index order on ties
    while (at > 0 && k.node_load[k.node_order[at - 1]] < k.node_load[node]) {
      k.node_order[at] = k.node_order[at - 1];
      --at;
    }
    k.node_order[at] = node;
  }
  // A candidate above `best` by more than rounding cannot win (sums in another order).
  const double give_up = best + mul_rn(best, 1e-9);
  double layer_max = bound;
  for (int32_t n = 0; n < sh.nodes; ++n) {
    const int32_t node = k.node_order[n];
    Packs pk = node_packs(sh, node, k);
    pk.start();
    if (gpu != nullptr) {
      for (int32_t j = 0; j < spn; ++j) pk.put(gpu[node * spn + j], rank_in_gpu[node * spn + j], j);
    } else {
      uint64_t* order = k.keys + node * spn;
      if (!keys_sorted[node]) sort_heaviest_first(replica_load + node * spn, spn, order);
      fill_distinct(order, spn, pk, k.fill, k.mark, k.placed);
    }
    // Lowering a node's max below the largest max of the layer reached so far cannot lower
    // the layer's max: stop there.
    layer_max = max_d(layer_max, improve_max(pk, rounds, layer_max));
    if (layer_max > give_up) return -1.0;
  }
  for (int32_t node = 0; node < sh.nodes; ++node) {
    Packs pk = node_packs(sh, node, k);
    // Moving a duplicate on a node at the layer's max may open further swaps there.
    if (remove_duplicates(pk, layer_max) && pk.load[pk.heaviest()] >= layer_max) {
      improve_max(pk, rounds, bound);
    }
  }
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = mlog + node * epn;
    for (int32_t pos = 0; pos < spn; ++pos) {
      const int32_t item = k.member[node * spn + pos];
      phy2log[node * spn + pos] = node_log[slot_expert[node * spn + item]];
    }
    for (int32_t i = 0; i < epn; ++i) logcnt[node_log[i]] = count[node * epn + i];
  }
  return plan_max_load(w, phy2log, logcnt, sh.replicas, sh.gpus);
}

// The spec's plan of one layer (method="deepseek", the bar to beat and the fallback of
// balanced_layer): w [E] -> phy2log [R], phy_rank [R], logcnt [E]; leaves its steps in k
// (spec_mlog, group_pack, group_rank, spec_slot_expert, spec_count, replica_load, spec_gpu,
// spec_rank_in_gpu, each node's replicas sorted in keys). Must equal eplb_rebalance's plan bit
// for bit (tests/test_eplb_balanced_header.py).
DEEPPAR_HD inline void spec_layer(const float* w, const Sizes& sh, int64_t* phy2log,
                                  int64_t* phy_rank, int64_t* logcnt, Work& k) {
  const int32_t epn = sh.experts / sh.nodes, spn = sh.replicas / sh.nodes;
  const int32_t gpn = sh.gpus / sh.nodes, per_gpu = sh.replicas / sh.gpus;
  spec_node_order(w, sh, k);
  replicate_nodes(w, sh, k.spec_mlog, k.spec_slot_expert, k.slot_rank, k.spec_count,
                  k.replica_load, nullptr, k);
  for (int32_t node = 0; node < sh.nodes; ++node) {
    spec_pack(k.replica_load + node * spn, spn, gpn, k.spec_gpu + node * spn,
              k.spec_rank_in_gpu + node * spn, k.keys + node * spn, k.pack_weight, k.pack_items,
              k.pack_key);
    const int32_t* node_log = k.spec_mlog + node * epn;
    for (int32_t j = 0; j < spn; ++j) {
      const int32_t at = node * spn + j;
      const int32_t slot = node * spn + k.spec_gpu[at] * per_gpu + k.spec_rank_in_gpu[at];
      phy2log[slot] = node_log[k.spec_slot_expert[at]];
      phy_rank[slot] = k.slot_rank[at];
    }
    for (int32_t i = 0; i < epn; ++i) logcnt[node_log[i]] = k.spec_count[node * epn + i];
  }
}

// One layer: w [E] (finite, non-negative) -> phy2log [R], phy_rank [R], logcnt [E].
DEEPPAR_HD inline void balanced_layer(const float* w, const Sizes& sh, int64_t* phy2log,
                                      int64_t* phy_rank, int64_t* logcnt, Work& k) {
  const int32_t epn = sh.experts / sh.nodes, spn = sh.replicas / sh.nodes;
  const int32_t gpn = sh.gpus / sh.nodes, per_gpu = sh.replicas / sh.gpus;
  // The spec's plan, written to the outputs.
  spec_layer(w, sh, phy2log, phy_rank, logcnt, k);
  if (per_gpu == 1) return;  // one replica per GPU: no placement choice, no duplicates
  double best = plan_max_load(w, phy2log, logcnt, sh.replicas, sh.gpus);
  const int32_t* phy = nullptr;  // the chosen candidate's maps; null: the spec's plan
  const int32_t* cnt = nullptr;
  // Candidate 1: nodes balanced by group swaps, distinct-first filling, swaps. A node with the
  // spec node's experts in the same order has its replicas and their sorted order already.
  improved_node_order(sh, k);
  for (int32_t node = 0; node < sh.nodes; ++node) {
    bool same = true;
    for (int32_t i = node * epn; i < (node + 1) * epn && same; ++i) {
      same = k.cand_mlog[i] == k.spec_mlog[i];
    }
    k.node_sorted[node] = same;
    if (!same) continue;
    for (int32_t j = node * spn; j < (node + 1) * spn; ++j) {
      k.slot_expert[j] = k.spec_slot_expert[j];
      k.cand_replica_load[j] = k.replica_load[j];
    }
    for (int32_t i = node * epn; i < (node + 1) * epn; ++i) k.count[i] = k.spec_count[i];
  }
  replicate_nodes(w, sh, k.cand_mlog, k.slot_expert, k.slot_rank, k.count, k.cand_replica_load,
                  k.node_sorted, k);
  double top = place(w, sh, k.cand_mlog, k.slot_expert, k.count, k.cand_replica_load, nullptr,
                     nullptr, k.node_sorted, best, k.cand_phy2log, k.cand_logcnt, k);
  const bool first_won = top >= 0.0 && top <= best;
  if (first_won) {
    best = top;
    phy = k.cand_phy2log;
    cnt = k.cand_logcnt;
  }
  // Candidate 0: the spec's nodes and packing, improved by swaps (never above the spec's max).
  // It replaces candidate 1 only with a strictly smaller max (ties: candidate 1, fewer
  // duplicates by construction), so it is skipped when candidate 1 is already below its lower
  // bound (a node's mean GPU load or its largest replica; margin for rounding).
  double bound0 = 0.0;
  for (int32_t node = 0; node < sh.nodes; ++node) {
    double total = 0.0, largest = 0.0;
    for (int32_t j = node * spn; j < (node + 1) * spn; ++j) {
      const double load = static_cast<double>(k.replica_load[j]);
      total += load;
      largest = max_d(largest, load);
    }
    bound0 = max_d(bound0, max_d(total / gpn, largest));
  }
  if (!(first_won && best < bound0 - mul_rn(bound0, 1e-9))) {
    top = place(w, sh, k.spec_mlog, k.spec_slot_expert, k.spec_count, k.replica_load, k.spec_gpu,
                k.spec_rank_in_gpu, k.node_sorted, best, k.best_phy2log, k.best_logcnt, k);
    if (top >= 0.0 && (first_won ? top < best : top <= best)) {
      phy = k.best_phy2log;
      cnt = k.best_logcnt;
    }
  }
  if (phy == nullptr) return;
  for (int32_t s = 0; s < sh.replicas; ++s) phy2log[s] = phy[s];
  for (int32_t e = 0; e < sh.experts; ++e) {
    logcnt[e] = cnt[e];
    k.fill[e] = 0;  // replicas seen so far, per expert
  }
  for (int32_t s = 0; s < sh.replicas; ++s) phy_rank[s] = k.fill[phy[s]]++;
}

#ifdef __CUDACC__
// One thread per layer; workspace: layers * Layout(sizes).bytes bytes of global memory.
__global__ void eplb_balanced_kernel(const float* __restrict__ weight, int64_t* __restrict__ phy2log,
                                     int64_t* __restrict__ phy_rank, int64_t* __restrict__ logcnt,
                                     unsigned char* __restrict__ workspace, Sizes sh,
                                     int64_t layers, int64_t layer_bytes) {
  const int64_t layer = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (layer >= layers) return;
  const float* w = weight + layer * sh.experts;
  for (int32_t e = 0; e < sh.experts; ++e) {
    const float v = w[e];
    if (!(v >= 0.0f && v <= 3.40282347e+38f)) {
      // Device-side assert (no host sync), as the spec kernel: NaN, inf and negative loads.
      printf("eplb_rebalance_balanced: weight must hold finite non-negative loads, got %f "
             "(layer %lld)\n", v, static_cast<long long>(layer));
      __trap();
    }
  }
  const Layout layout(sh);
  Work k(workspace + layer * layer_bytes, layout);
  balanced_layer(w, sh, phy2log + layer * sh.replicas, phy_rank + layer * sh.replicas,
                 logcnt + layer * sh.experts, k);
}
#endif

}  // namespace eplb_balanced
}  // namespace deeppar
