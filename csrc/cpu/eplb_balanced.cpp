// CPU kernel of deeppar::eplb_rebalance_balanced: EPLB plans with a smaller max GPU load than
// the published greedy, never a larger one, and no two replicas of one expert on a GPU where
// that can be avoided. Same replication and node rules as the spec's hierarchical policy:
//   * each node replicates its experts with the spec's greedy (it minimises the largest
//     per-replica load), so replica counts are the spec's;
//   * two candidates per layer: (0) the spec's nodes and GPU packing, (1) nodes balanced by
//     swapping groups between the most loaded node and another, replicas filled heaviest first
//     into the lightest GPU with room that does not hold the expert yet;
//   * in both, pairwise swaps between the most loaded GPU and another lower the max while
//     they can, and duplicate replicas move away by swaps that keep both GPUs under the
//     layer's max load and create no new duplicate;
//   * the candidate with the smaller max GPU load (float32 replica loads summed in float64)
//     is kept if it is at most the spec's plan's, else the spec's plan is (candidate 0 can
//     only lower the spec's max, up to rounding).
// Deterministic: every scan runs in index order and ties keep the first candidate.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu/eplb_layers.h"
#include "cpu/eplb_rules.h"
#include "op_checks.h"

namespace deeppar {
namespace {

using eplb_cpu::check_row;
using eplb_cpu::hierarchical_row;
using eplb_cpu::node_major_order;
using eplb_cpu::replicate_row;
using eplb_cpu::Scratch;
using eplb_cpu::Shape;
using eplb_cpu::sort_heaviest_first;

// Relative margin a swap must gain, so that rounding cannot make swaps cycle.
constexpr double kGain = 1e-12;

// Items packed into m packs of per_pack positions each (fixed cardinality).
struct Packing {
  int32_t m = 0, per_pack = 0;
  const double* item_load = nullptr;    // [n]
  const int32_t* item_class = nullptr;  // [n] expert of each item; -1: no duplicate rule
  std::vector<int32_t> member;          // [m * per_pack] item at each position
  std::vector<double> member_load;      // [m * per_pack] its load (contiguous for the scans)
  std::vector<double> load;             // [m] sum of its items' loads

  void start(int32_t packs, int32_t items_per_pack, const double* loads, const int32_t* classes) {
    m = packs;
    per_pack = items_per_pack;
    item_load = loads;
    item_class = classes;
    member.assign(static_cast<size_t>(m) * per_pack, -1);
    member_load.assign(member.size(), 0.0);
    load.assign(m, 0.0);
  }
  int32_t* pack(int32_t p) { return member.data() + static_cast<size_t>(p) * per_pack; }
  const double* loads_of(int32_t p) const {
    return member_load.data() + static_cast<size_t>(p) * per_pack;
  }
  void put(int32_t p, int32_t i, int32_t item) {
    pack(p)[i] = item;
    member_load[static_cast<size_t>(p) * per_pack + i] = item_load[item];
    load[p] += item_load[item];
  }

  // Whether pack p holds an item of class c other than the one at position skip.
  bool holds(int32_t p, int32_t c, int32_t skip) {
    if (c < 0) return false;
    const int32_t* items = pack(p);
    for (int32_t q = 0; q < per_pack; ++q) {
      if (q != skip && item_class[items[q]] == c) return true;
    }
    return false;
  }

  int32_t heaviest() const {
    return static_cast<int32_t>(std::max_element(load.begin(), load.end()) - load.begin());
  }
  double max_load() const { return *std::max_element(load.begin(), load.end()); }

  // Swaps positions (p, i) and (q, j) and updates both loads.
  void swap(int32_t p, int32_t i, int32_t q, int32_t j) {
    const size_t at = static_cast<size_t>(p) * per_pack + i;
    const size_t bt = static_cast<size_t>(q) * per_pack + j;
    const double delta = member_load[at] - member_load[bt];
    load[p] -= delta;
    load[q] += delta;
    std::swap(member[at], member[bt]);
    std::swap(member_load[at], member_load[bt]);
  }
};

// Heaviest item first (order: sorted keys of Scratch), each to the lightest pack with room
// that holds no item of its class, else to the lightest pack with room; ties: lowest index.
void fill_distinct(const uint64_t* order, int32_t n, Packing& pk, std::vector<int32_t>& fill) {
  fill.assign(pk.m, 0);
  for (int32_t k = 0; k < n; ++k) {
    const int32_t item = static_cast<int32_t>(order[k] & 0xffffffffu);
    const int32_t c = pk.item_class[item];
    int32_t any = -1, distinct = -1;
    for (int32_t p = 0; p < pk.m; ++p) {
      if (fill[p] == pk.per_pack) continue;
      if (any < 0 || pk.load[p] < pk.load[any]) any = p;
      if ((distinct < 0 || pk.load[p] < pk.load[distinct]) && !pk.holds(p, c, -1)) distinct = p;
    }
    const int32_t p = distinct >= 0 ? distinct : any;
    pk.put(p, fill[p]++, item);
  }
}

// Best swap between the heaviest pack a (load top) and pack q that brings both under `best`
// without creating a duplicate: lowers `best` and records the positions; false if none.
bool best_swap(Packing& pk, int32_t a, int32_t q, double& best, int32_t& bi, int32_t& bj) {
  const double top = pk.load[a], other = pk.load[q];
  if (other >= best) return false;
  const double* la = pk.loads_of(a);
  const double* lq = pk.loads_of(q);
  // pair = max(top - delta, other + delta) < best  <=>  top - best < delta < best - other.
  double low = top - best, high = best - other;
  bool found = false;
  for (int32_t i = 0; i < pk.per_pack; ++i) {
    for (int32_t j = 0; j < pk.per_pack; ++j) {
      const double delta = la[i] - lq[j];
      if (delta <= 0.0 || delta <= low || delta >= high) continue;
      const double pair = std::max(top - delta, other + delta);
      if (pair >= best) continue;
      const int32_t ci = pk.item_class[pk.pack(a)[i]], cj = pk.item_class[pk.pack(q)[j]];
      if (pk.holds(a, cj, i) || pk.holds(q, ci, j)) continue;
      best = pair;
      low = top - best;
      high = best - other;
      bi = i;
      bj = j;
      found = true;
    }
  }
  return found;
}

// Pairwise swaps between the most loaded pack and another that lower the pair's max below the
// current max, until none does; never creates a duplicate. The lightest pack is tried first
// (it usually has the best swap); only when it has none are all packs searched.
void improve_max(Packing& pk, int32_t max_rounds) {
  if (pk.m < 2) return;
  for (int32_t round = 0; round < max_rounds; ++round) {
    const int32_t a = pk.heaviest();
    const double top = pk.load[a];
    double best = top - top * kGain;
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
    if (bi < 0) return;
    pk.swap(a, bi, bq, bj);
  }
}

// Moves duplicate replicas away by swaps that keep both packs at most `limit` and create no
// new duplicate; the swap with the smallest resulting pair max first. Returns whether any
// swap was made.
bool remove_duplicates(Packing& pk, double limit) {
  bool changed = false;
  for (int32_t p = 0; p < pk.m; ++p) {
    for (int32_t i = 0; i < pk.per_pack; ++i) {
      const int32_t c = pk.item_class[pk.pack(p)[i]];
      if (c < 0 || !pk.holds(p, c, i)) continue;
      double best = limit;
      int32_t bq = -1, bj = -1;
      for (int32_t q = 0; q < pk.m; ++q) {
        if (q == p || pk.holds(q, c, -1)) continue;
        for (int32_t j = 0; j < pk.per_pack; ++j) {
          const int32_t cj = pk.item_class[pk.pack(q)[j]];
          if (pk.holds(p, cj, i)) continue;
          const double delta = pk.loads_of(p)[i] - pk.loads_of(q)[j];
          const double pair = std::max(pk.load[p] - delta, pk.load[q] + delta);
          if (pair <= best && (bq < 0 || pair < best)) {
            best = pair;
            bq = q;
            bj = j;
          }
        }
      }
      if (bq >= 0) {
        pk.swap(p, i, bq, bj);
        changed = true;
      }
    }
  }
  return changed;
}

struct BalancedScratch {
  Scratch rules;
  std::vector<int64_t> spec_phy2log, spec_rank, spec_logcnt;  // the spec's plan
  std::vector<int64_t> cand_phy2log[2], cand_logcnt[2];        // two candidates
  std::vector<double> group_load, replica_load;
  std::vector<int32_t> no_class, replica_class, node_slot_expert, node_count, fill;
  std::vector<int32_t> spec_mlog2log, mlog2log;
  std::vector<float> node_weight, replica_load_f;
  std::vector<int32_t> gpu, rank_in_gpu;
  std::vector<Packing> node_packs;
  Packing groups;
};

// Largest GPU load of a layer's plan: float32 replica loads (as planned) summed in float64.
double max_gpu_load(const float* w, const int64_t* phy2log, const int64_t* logcnt,
                    int32_t replicas, int32_t gpus) {
  const int32_t per_gpu = replicas / gpus;
  double top = 0.0;
  for (int32_t g = 0; g < gpus; ++g) {
    double sum = 0.0;
    for (int32_t k = 0; k < per_gpu; ++k) {
      const int64_t e = phy2log[g * per_gpu + k];
      sum += static_cast<double>(w[e] / static_cast<float>(logcnt[e]));
    }
    top = std::max(top, sum);
  }
  return top;
}

// Node-major order (as the spec's step 2) after swaps of groups between nodes that lower the
// largest node load, starting from the spec's group packing left in s.
void improved_node_order(const Shape& sh, BalancedScratch& b) {
  const Scratch& s = b.rules;
  const int32_t group_size = sh.experts / sh.groups;
  b.group_load.assign(s.group_load.begin(), s.group_load.end());
  b.no_class.assign(sh.groups, -1);
  Packing& gp = b.groups;
  gp.start(sh.nodes, sh.groups / sh.nodes, b.group_load.data(), b.no_class.data());
  for (int32_t g = 0; g < sh.groups; ++g) gp.put(s.group_pack[g], s.group_rank[g], g);
  if (sh.nodes > 1 && gp.per_pack > 1) improve_max(gp, 8 * sh.groups + 64);
  b.mlog2log.resize(sh.experts);
  for (int32_t pos = 0; pos < sh.groups; ++pos) {
    const int32_t g = gp.member[pos];
    for (int32_t i = 0; i < group_size; ++i) b.mlog2log[pos * group_size + i] = g * group_size + i;
  }
}

// Replicas of every node (spec's replication of its experts in mlog2log order) placed on its
// GPUs: from the spec's packing (from_spec) or distinct-first filling, then swaps. Writes
// phy2log and logcnt; returns the plan's max GPU load.
double place(const float* w, const Shape& sh, const int32_t* mlog2log, bool from_spec,
             int64_t* phy2log, int64_t* logcnt, BalancedScratch& b) {
  Scratch& s = b.rules;
  const int32_t experts_per_node = sh.experts / sh.nodes;
  const int32_t slots_per_node = sh.replicas / sh.nodes;
  const int32_t gpus_per_node = sh.gpus / sh.nodes;
  const int32_t slots_per_gpu = sh.replicas / sh.gpus;
  const int32_t rounds = 8 * slots_per_node + 64;
  b.node_packs.resize(sh.nodes);
  b.node_slot_expert.resize(sh.replicas);
  b.node_count.resize(sh.experts);
  b.replica_load.resize(sh.replicas);
  b.replica_class.resize(sh.replicas);
  b.node_weight.resize(experts_per_node);
  b.replica_load_f.resize(slots_per_node);
  b.gpu.resize(slots_per_node);
  b.rank_in_gpu.resize(slots_per_node);
  s.slot_rank.resize(slots_per_node);
  double layer_max = 0.0;
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = mlog2log + node * experts_per_node;
    int32_t* slot_expert = b.node_slot_expert.data() + node * slots_per_node;
    int32_t* count = b.node_count.data() + node * experts_per_node;
    for (int32_t i = 0; i < experts_per_node; ++i) b.node_weight[i] = w[node_log[i]];
    replicate_row(b.node_weight.data(), experts_per_node, slots_per_node, slot_expert,
                  s.slot_rank.data(), count, s);
    double* load = b.replica_load.data() + node * slots_per_node;
    int32_t* cls = b.replica_class.data() + node * slots_per_node;
    for (int32_t j = 0; j < slots_per_node; ++j) {
      const int32_t e = slot_expert[j];
      b.replica_load_f[j] = b.node_weight[e] / static_cast<float>(count[e]);
      load[j] = static_cast<double>(b.replica_load_f[j]);
      cls[j] = e;
    }
    Packing& pk = b.node_packs[node];
    pk.start(gpus_per_node, slots_per_gpu, load, cls);
    if (from_spec) {
      eplb_cpu::pack_row(b.replica_load_f.data(), slots_per_node, gpus_per_node, b.gpu.data(),
                         b.rank_in_gpu.data(), s);
      for (int32_t j = 0; j < slots_per_node; ++j) pk.put(b.gpu[j], b.rank_in_gpu[j], j);
    } else {
      sort_heaviest_first(b.replica_load_f.data(), slots_per_node, s);
      fill_distinct(s.keys.data(), slots_per_node, pk, b.fill);
    }
    if (slots_per_gpu > 1) improve_max(pk, rounds);
    layer_max = std::max(layer_max, pk.max_load());
  }
  if (slots_per_gpu > 1) {
    for (int32_t node = 0; node < sh.nodes; ++node) {
      // Still a local optimum of improve_max unless a duplicate moved.
      if (remove_duplicates(b.node_packs[node], layer_max)) {
        improve_max(b.node_packs[node], rounds);
      }
    }
  }
  for (int32_t node = 0; node < sh.nodes; ++node) {
    const int32_t* node_log = mlog2log + node * experts_per_node;
    const int32_t* slot_expert = b.node_slot_expert.data() + node * slots_per_node;
    const int32_t* count = b.node_count.data() + node * experts_per_node;
    const Packing& pk = b.node_packs[node];
    for (int32_t pos = 0; pos < slots_per_node; ++pos) {
      phy2log[node * slots_per_node + pos] = node_log[slot_expert[pk.member[pos]]];
    }
    for (int32_t i = 0; i < experts_per_node; ++i) logcnt[node_log[i]] = count[i];
  }
  return max_gpu_load(w, phy2log, logcnt, sh.replicas, sh.gpus);
}

void balanced_row(const float* w, const Shape& sh, int64_t* phy2log, int64_t* phy_rank,
                  int64_t* logcnt, BalancedScratch& b) {
  // The spec's plan: the bar to beat, and the fallback.
  b.spec_phy2log.resize(sh.replicas);
  b.spec_rank.resize(sh.replicas);
  b.spec_logcnt.resize(sh.experts);
  hierarchical_row(w, sh, b.spec_phy2log.data(), b.spec_rank.data(), b.spec_logcnt.data(),
                   b.rules);
  if (sh.replicas == sh.gpus) {  // one replica per GPU: no placement choice, no duplicates
    std::copy(b.spec_phy2log.begin(), b.spec_phy2log.end(), phy2log);
    std::copy(b.spec_rank.begin(), b.spec_rank.end(), phy_rank);
    std::copy(b.spec_logcnt.begin(), b.spec_logcnt.end(), logcnt);
    return;
  }
  const double spec_max = max_gpu_load(w, b.spec_phy2log.data(), b.spec_logcnt.data(),
                                       sh.replicas, sh.gpus);
  b.spec_mlog2log.assign(b.rules.mlog2log.begin(), b.rules.mlog2log.end());
  // Candidate 0: the spec's nodes and packing, improved by swaps (never above spec_max).
  // Candidate 1: nodes balanced by group swaps, distinct-first filling, swaps.
  improved_node_order(sh, b);
  double best = spec_max;
  int32_t chosen = -1;
  for (int32_t c = 0; c < 2; ++c) {
    b.cand_phy2log[c].resize(sh.replicas);
    b.cand_logcnt[c].resize(sh.experts);
    const int32_t* order = c == 0 ? b.spec_mlog2log.data() : b.mlog2log.data();
    const double top = place(w, sh, order, c == 0, b.cand_phy2log[c].data(),
                             b.cand_logcnt[c].data(), b);
    if (top <= best) {  // ties: the later candidate (fewer duplicates by construction)
      best = top;
      chosen = c;
    }
  }
  if (chosen < 0) {
    std::copy(b.spec_phy2log.begin(), b.spec_phy2log.end(), phy2log);
    std::copy(b.spec_rank.begin(), b.spec_rank.end(), phy_rank);
    std::copy(b.spec_logcnt.begin(), b.spec_logcnt.end(), logcnt);
    return;
  }
  std::copy(b.cand_phy2log[chosen].begin(), b.cand_phy2log[chosen].end(), phy2log);
  std::copy(b.cand_logcnt[chosen].begin(), b.cand_logcnt[chosen].end(), logcnt);
  b.fill.assign(sh.experts, 0);  // replicas seen so far, per logical expert
  for (int32_t slot = 0; slot < sh.replicas; ++slot) phy_rank[slot] = b.fill[phy2log[slot]]++;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eplb_rebalance_balanced_cpu(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus) {
  // About 0.1 ms per layer: batches of model size stay on the calling thread (waking the pool
  // costs milliseconds on a busy machine), only very large ones are split.
  return eplb_cpu::plan_layers<BalancedScratch>(weight, num_replicas, num_groups, num_nodes,
                                                num_gpus, int64_t{1} << 20,
                                                "eplb_rebalance_balanced",
                                                [](auto... row) { balanced_row(row...); });
}

}  // namespace

TORCH_LIBRARY_IMPL(deeppar, CPU, m) {
  m.impl("eplb_rebalance_balanced", &eplb_rebalance_balanced_cpu);
}

}  // namespace deeppar
