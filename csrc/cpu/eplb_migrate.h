// Migration-aware EPLB, one layer at a time (deeppar.eplb.migrate): relabelling a plan's GPUs
// to overlap the placement in use, the warm-start search that reaches a target max GPU load
// from that placement with few moved replicas, and the transfer plan (which old slot each new
// slot copies). Plain C++ over raw rows; csrc/cpu/eplb_migrate.cpp runs it over layers.
//
// Moved replicas are counted per GPU as multisets: a GPU receives an expert instance over the
// network for every copy of it beyond what the GPU held before (the reported figure, a GPU
// receiving an expert it did not hold, can only be lower).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/eplb_rules.h"

namespace deeppar {
namespace eplb_migrate {

// ---------------------------------------------------------------------------------------------
// Relabelling: the GPUs (and nodes) of a plan renumbered to overlap the placement in use most.

struct RelabelScratch {
  std::vector<int32_t> holder_start, holder_unit;  // old copies of each expert: offsets, units
  std::vector<int32_t> overlap;                    // [units * units] multiset overlap
  std::vector<std::array<int32_t, 3>> pairs;       // (-overlap, new unit, old unit)
  std::vector<int32_t> match, used, node_match, content, place;
};

// Greedy matching of new units [left_begin, left_end) to old units [right_begin, right_end):
// pairs by largest overlap first (ties: lowest new unit, then lowest old unit), then the
// unmatched new units in index order take the unused old units in index order. `overlap` is
// [units * units], row = new unit. Writes r.match[a] for the new units.
inline void greedy_match(const int32_t* overlap, int32_t units, int32_t left_begin,
                         int32_t left_end, int32_t right_begin, int32_t right_end,
                         RelabelScratch& r) {
  r.pairs.clear();
  for (int32_t a = left_begin; a < left_end; ++a) {
    for (int32_t b = right_begin; b < right_end; ++b) {
      const int32_t ov = overlap[static_cast<size_t>(a) * units + b];
      if (ov > 0) r.pairs.push_back({-ov, a, b});
    }
  }
  std::sort(r.pairs.begin(), r.pairs.end());
  for (int32_t a = left_begin; a < left_end; ++a) r.match[a] = -1;
  for (int32_t b = right_begin; b < right_end; ++b) r.used[b] = 0;
  for (const auto& [neg_overlap, a, b] : r.pairs) {
    if (r.match[a] < 0 && !r.used[b]) {
      r.match[a] = b;
      r.used[b] = 1;
    }
  }
  int32_t next = right_begin;
  for (int32_t a = left_begin; a < left_end; ++a) {
    if (r.match[a] >= 0) continue;
    while (r.used[next]) ++next;
    r.match[a] = next;
    r.used[next] = 1;
  }
}

// Multiset overlap of experts between units of replicas / units slots each:
// overlap[a * units + b] = sum over experts of min(copies on new unit a, copies on old unit b).
inline void unit_overlaps(const int64_t* old_row, const int64_t* new_row, int32_t replicas,
                          int32_t experts, int32_t units, RelabelScratch& r) {
  const int32_t per_unit = replicas / units;
  // Old holders of each expert as (unit, copies), grouped by expert (slots are unit-major, so
  // one expert's copies on a unit are counted where its unit changes).
  r.holder_start.assign(experts + 1, 0);
  for (int32_t s = 0; s < replicas; ++s) ++r.holder_start[old_row[s] + 1];
  for (int32_t e = 0; e < experts; ++e) r.holder_start[e + 1] += r.holder_start[e];
  r.holder_unit.assign(replicas, 0);  // old units of each expert's copies, in slot order
  r.content.assign(experts, 0);
  for (int32_t s = 0; s < replicas; ++s) {
    const int64_t e = old_row[s];
    r.holder_unit[r.holder_start[e] + r.content[e]++] = s / per_unit;
  }
  r.overlap.assign(static_cast<size_t>(units) * units, 0);
  r.place.assign(experts, 0);  // copies of each expert on the current new unit
  for (int32_t a = 0; a < units; ++a) {
    const int64_t* row = new_row + static_cast<size_t>(a) * per_unit;
    for (int32_t k = 0; k < per_unit; ++k) ++r.place[row[k]];
    for (int32_t k = 0; k < per_unit; ++k) {
      const int64_t e = row[k];
      const int32_t mine = r.place[e];
      if (mine == 0) continue;  // this expert of unit a is counted already
      r.place[e] = 0;
      const int32_t* units_of = r.holder_unit.data() + r.holder_start[e];
      const int32_t n = r.holder_start[e + 1] - r.holder_start[e];
      for (int32_t i = 0; i < n;) {
        int32_t j = i;
        while (j < n && units_of[j] == units_of[i]) ++j;
        r.overlap[static_cast<size_t>(a) * units + units_of[i]] += std::min(mine, j - i);
        i = j;
      }
    }
  }
}

// Fills GPU slots [base, base + per_gpu) of out with the experts `content` (per_gpu of them):
// an expert that old_row held in a slot keeps that slot, the others fill the rest in order.
inline void place_in_gpu(const int64_t* old_row, int32_t base, int32_t per_gpu,
                         std::vector<int32_t>& content, std::vector<int32_t>& place,
                         int64_t* out) {
  place.assign(per_gpu, -1);
  for (int32_t p = 0; p < per_gpu; ++p) {
    const auto it = std::find(content.begin(), content.end(), static_cast<int32_t>(old_row[base + p]));
    if (it == content.end()) continue;
    place[p] = *it;
    content.erase(it);
  }
  size_t rest = 0;
  for (int32_t p = 0; p < per_gpu; ++p) out[base + p] = place[p] >= 0 ? place[p] : content[rest++];
}

// new_row's GPUs (nodes first when nodes > 1) renumbered to overlap old_row most; inside each
// GPU an expert held before keeps its slot, the others fill the rest in their order.
inline void relabel_row(const int64_t* old_row, const int64_t* new_row, int32_t replicas,
                        int32_t experts, int32_t gpus, int32_t nodes, int64_t* out,
                        RelabelScratch& r) {
  const int32_t per_gpu = replicas / gpus;
  const int32_t gpn = gpus / nodes;
  r.match.assign(gpus, -1);
  r.used.assign(gpus, 0);
  if (nodes > 1) {
    unit_overlaps(old_row, new_row, replicas, experts, nodes, r);
    greedy_match(r.overlap.data(), nodes, 0, nodes, 0, nodes, r);
    r.node_match.assign(r.match.begin(), r.match.begin() + nodes);
    unit_overlaps(old_row, new_row, replicas, experts, gpus, r);
    r.match.assign(gpus, -1);
    r.used.assign(gpus, 0);
    for (int32_t node = 0; node < nodes; ++node) {
      const int32_t to = r.node_match[node];
      greedy_match(r.overlap.data(), gpus, node * gpn, (node + 1) * gpn, to * gpn,
                   (to + 1) * gpn, r);
    }
  } else {
    unit_overlaps(old_row, new_row, replicas, experts, gpus, r);
    greedy_match(r.overlap.data(), gpus, 0, gpus, 0, gpus, r);
  }
  for (int32_t g = 0; g < gpus; ++g) {
    r.content.assign(new_row + static_cast<size_t>(g) * per_gpu,
                     new_row + static_cast<size_t>(g + 1) * per_gpu);
    place_in_gpu(old_row, r.match[g] * per_gpu, per_gpu, r.content, r.place, out);
  }
}

// ---------------------------------------------------------------------------------------------
// Transfer plan: the old slot each new slot copies.

struct SourceScratch {
  std::vector<int32_t> start, holders, sends;
};

// src[s] = s when the slot keeps its expert; else a slot of the same GPU that held it (the
// lowest); else a holder on the same node if any, spreading sends over GPUs (fewest sends so
// far, then lowest slot). Every expert of new_row must be held somewhere in old_row.
inline void source_row(const int64_t* old_row, const int64_t* new_row, int32_t replicas,
                       int32_t experts, int32_t gpus, int32_t nodes, int64_t* src,
                       SourceScratch& t) {
  const int32_t per_gpu = replicas / gpus;
  const int32_t per_node = replicas / nodes;
  t.start.assign(experts + 1, 0);
  for (int32_t s = 0; s < replicas; ++s) ++t.start[old_row[s] + 1];
  for (int32_t e = 0; e < experts; ++e) t.start[e + 1] += t.start[e];
  t.holders.resize(replicas);
  t.sends.assign(experts + 1, 0);  // reused below as fill positions, then per-GPU sends
  for (int32_t s = 0; s < replicas; ++s) {
    const int64_t e = old_row[s];
    t.holders[t.start[e] + t.sends[e]++] = s;
  }
  t.sends.assign(gpus, 0);
  for (int32_t s = 0; s < replicas; ++s) {
    const int64_t e = new_row[s];
    src[s] = s;
    if (old_row[s] == e) continue;
    const int32_t g = s / per_gpu;
    const int32_t* h = t.holders.data() + t.start[e];
    const int32_t n = t.start[e + 1] - t.start[e];
    int32_t local = -1;
    for (int32_t k = 0; k < n && local < 0; ++k) {
      if (h[k] / per_gpu == g) local = h[k];
    }
    if (local >= 0) {
      src[s] = local;
      continue;
    }
    int32_t best = -1;
    for (int32_t k = 0; k < n; ++k) {  // holders ascending: strict < keeps the lowest slot
      if (best < 0) {
        best = h[k];
        continue;
      }
      const bool far_k = h[k] / per_node != s / per_node, far_b = best / per_node != s / per_node;
      const int32_t sk = t.sends[h[k] / per_gpu], sb = t.sends[best / per_gpu];
      if (far_k < far_b || (far_k == far_b && sk < sb)) best = h[k];
    }
    ++t.sends[best / per_gpu];
    src[s] = best;
  }
}

// ---------------------------------------------------------------------------------------------
// Warm-start search.

struct MigrateShape {
  int32_t experts, replicas, groups, nodes, gpus;  // nodes == 1: one region, no group rule
};

struct MigrateScratch {
  eplb_cpu::Scratch rules;
  std::vector<int32_t> cur;              // [R] expert of each slot, -1 while free
  // [P * E] copies of each expert on each GPU, now and before (dense: 4 such tables of
  // P * E int32 per thread, with start_held and best_held)
  std::vector<int32_t> held, had;
  std::vector<int32_t> count, need_min;  // [E] replicas now; fewest under the cap
  std::vector<int32_t> group_node, seen, experts_here, fill, rep_slot, rep_rank, rep_count, wanted;
  std::vector<double> slot_load, load, group_load, node_load;
  std::vector<float> region_w;
  std::vector<int32_t> start_cur, start_held, start_count, best_cur, best_held, best_count;
  std::vector<int32_t> gpu_content, gpu_place;
};

// Replica load of an expert with `count` replicas: float32 as the planner and slot_loads
// compute it, summed in float64.
inline double replica_load(const float* w, int32_t e, int32_t count) {
  return static_cast<double>(w[e] / static_cast<float>(count));
}

// Fewest replicas (>= 1) that bring expert load v to at most cap per replica.
inline int32_t fewest_replicas(float v, double cap, int32_t most) {
  if (!(cap > 0.0)) return v > 0.0f ? most : 1;
  int32_t c = static_cast<int32_t>(std::min<double>(most, std::max(1.0, std::ceil(v / cap))));
  while (c > 1 && static_cast<double>(v / static_cast<float>(c - 1)) <= cap) --c;
  while (c < most && static_cast<double>(v / static_cast<float>(c)) > cap) ++c;
  return c;
}

struct MigrateRow {
  const float* w;
  const MigrateShape& sh;
  double target;
  MigrateScratch& m;
  int32_t per_gpu, gpn, per_node;
  int32_t fit = 0;  // search()'s choice among swaps that leave both GPUs at most the target

  MigrateRow(const float* w_, const MigrateShape& sh_, double target_, MigrateScratch& m_)
      : w(w_), sh(sh_), target(target_), m(m_), per_gpu(sh_.replicas / sh_.gpus),
        gpn(sh_.gpus / sh_.nodes), per_node(sh_.replicas / sh_.nodes) {}

  int32_t& held(int32_t g, int32_t e) { return m.held[static_cast<size_t>(g) * sh.experts + e]; }
  int32_t had(int32_t g, int32_t e) const {
    return m.had[static_cast<size_t>(g) * sh.experts + e];
  }
  // Network receptions saved by taking one copy of e off GPU g (1 if it was a received copy).
  int32_t drop_gain(int32_t g, int32_t e) { return held(g, e) > had(g, e) ? 1 : 0; }
  // Network receptions caused by putting one more copy of e on GPU g.
  int32_t add_cost(int32_t g, int32_t e) { return held(g, e) >= had(g, e) ? 1 : 0; }

  void put(int32_t slot, int32_t e) {
    m.cur[slot] = e;
    ++held(slot / per_gpu, e);
  }
  void take(int32_t slot) {
    --held(slot / per_gpu, m.cur[slot]);
    m.cur[slot] = -1;
  }

  void compute_loads() {
    m.slot_load.assign(sh.replicas, 0.0);
    m.load.assign(sh.gpus, 0.0);
    for (int32_t s = 0; s < sh.replicas; ++s) {
      const int32_t e = m.cur[s];
      if (e < 0) continue;
      m.slot_load[s] = replica_load(w, e, m.count[e]);
      m.load[s / per_gpu] += m.slot_load[s];
    }
  }

  // Hierarchical rule: every group on one node. Swaps groups between the most loaded node and
  // another until no node exceeds gpn * target (or no swap lowers the top); the slots of a
  // group that leaves its node are freed. False if the placement splits a group.
  // With `fresh` (non-null), every group goes to its node there instead.
  bool regroup(const int64_t* fresh) {
    const int32_t groups = sh.groups, nodes = sh.nodes;
    const int32_t group_size = sh.experts / groups;
    m.group_node.assign(groups, -1);
    for (int32_t s = 0; s < sh.replicas; ++s) {
      int32_t& node = m.group_node[m.cur[s] / group_size];
      if (node < 0) node = s / per_node;
      if (node != s / per_node) return false;
    }
    if (fresh != nullptr) {
      for (int32_t s = 0; s < sh.replicas; ++s) m.group_node[fresh[s] / group_size] = s / per_node;
      for (int32_t s = 0; s < sh.replicas; ++s) {
        if (m.group_node[m.cur[s] / group_size] != s / per_node) take(s);
      }
      return true;
    }
    m.group_load.assign(groups, 0.0);
    m.node_load.assign(nodes, 0.0);
    for (int32_t g = 0; g < groups; ++g) {
      for (int32_t i = 0; i < group_size; ++i) m.group_load[g] += w[g * group_size + i];
      m.node_load[m.group_node[g]] += m.group_load[g];
    }
    const double limit = gpn * target;
    for (int32_t round = 0; round < groups; ++round) {
      const int32_t top = static_cast<int32_t>(
          std::max_element(m.node_load.begin(), m.node_load.end()) - m.node_load.begin());
      if (m.node_load[top] <= limit) break;
      double best = m.node_load[top];
      int32_t bg = -1, bh = -1;
      for (int32_t g = 0; g < groups; ++g) {
        if (m.group_node[g] != top) continue;
        for (int32_t h = 0; h < groups; ++h) {
          const int32_t other = m.group_node[h];
          if (other == top) continue;
          const double delta = m.group_load[g] - m.group_load[h];
          if (delta <= 0.0) continue;
          const double pair = std::max(m.node_load[top] - delta, m.node_load[other] + delta);
          if (pair < best) {
            best = pair;
            bg = g;
            bh = h;
          }
        }
      }
      if (bg < 0) break;
      const int32_t other = m.group_node[bh];
      const double delta = m.group_load[bg] - m.group_load[bh];
      m.node_load[top] -= delta;
      m.node_load[other] += delta;
      m.group_node[bg] = other;
      m.group_node[bh] = top;
    }
    for (int32_t s = 0; s < sh.replicas; ++s) {
      if (m.group_node[m.cur[s] / group_size] != s / per_node) take(s);
    }
    return true;
  }

  // Replica counts of the experts of one region (slots [first, first + slots)): at least the
  // fewest that keep every replica load at most `cap` (a larger cap if the region cannot), at
  // least what they have where that fits; surplus replicas dropped from the experts that stay
  // lightest per replica, missing ones added by the spec's replication rule. Dropped replicas
  // free slots (received copies and loaded GPUs first), which new replicas then fill.
  void set_counts(int32_t region, double cap) {
    const int32_t first = region * per_node, slots = per_node;
    auto& ex = m.experts_here;
    ex.clear();
    if (sh.nodes > 1) {
      const int32_t group_size = sh.experts / sh.groups;
      for (int32_t g = 0; g < sh.groups; ++g) {
        if (m.group_node[g] != region) continue;
        for (int32_t i = 0; i < group_size; ++i) ex.push_back(g * group_size + i);
      }
    } else {
      for (int32_t e = 0; e < sh.experts; ++e) ex.push_back(e);
    }
    const int32_t n = static_cast<int32_t>(ex.size());
    const int32_t most = slots - n + 1;
    int64_t total = 0;
    for (int32_t e : ex) total += (m.need_min[e] = fewest_replicas(w[e], cap, most));
    if (total > slots) {  // the region's own min-max replication sets the cap
      m.region_w.resize(n);
      for (int32_t i = 0; i < n; ++i) m.region_w[i] = w[ex[i]];
      m.rep_slot.resize(slots);
      m.rep_rank.resize(slots);
      m.rep_count.resize(n);
      eplb_cpu::replicate_row(m.region_w.data(), n, slots, m.rep_slot.data(), m.rep_rank.data(),
                              m.rep_count.data(), m.rules);
      double region_cap = 0.0;
      for (int32_t i = 0; i < n; ++i) {
        region_cap = std::max(region_cap, replica_load(w, ex[i], m.rep_count[i]));
      }
      total = 0;
      for (int32_t e : ex) total += (m.need_min[e] = fewest_replicas(w[e], region_cap, most));
    }
    auto& want = m.wanted;  // target count per expert of the region
    want.assign(sh.experts, 0);
    total = 0;
    for (int32_t e : ex) total += (want[e] = std::max(m.count[e], m.need_min[e]));
    while (total > slots) {  // drop where one fewer replica stays lightest
      int32_t pick = -1;
      double pick_load = 0.0;
      for (int32_t e : ex) {
        if (want[e] <= m.need_min[e]) continue;
        const double v = replica_load(w, e, want[e] - 1);
        if (pick < 0 || v < pick_load) {
          pick = e;
          pick_load = v;
        }
      }
      --want[pick];
      --total;
    }
    while (total < slots) {  // spec's rule: largest load per replica, fewer replicas, lower id
      int32_t pick = -1;
      for (int32_t e : ex) {
        if (pick < 0) {
          pick = e;
          continue;
        }
        const float a = w[e] / static_cast<float>(want[e]);
        const float b = w[pick] / static_cast<float>(want[pick]);
        if (a > b || (a == b && want[e] < want[pick])) pick = e;
      }
      ++want[pick];
      ++total;
    }
    // Drop surplus replicas: a received copy first, then the most loaded GPU, lowest slot.
    compute_loads();
    for (int32_t e : ex) {
      while (m.count[e] > want[e]) {
        int32_t pick = -1;
        for (int32_t s = first; s < first + slots; ++s) {
          if (m.cur[s] != e) continue;
          if (pick < 0) {
            pick = s;
            continue;
          }
          const int32_t gs = s / per_gpu, gp = pick / per_gpu;
          const int32_t ds = drop_gain(gs, e), dp = drop_gain(gp, e);
          if (ds > dp || (ds == dp && m.load[gs] > m.load[gp])) pick = s;
        }
        m.load[pick / per_gpu] -= m.slot_load[pick];
        take(pick);
        --m.count[e];
      }
    }
    // New replicas, heaviest first, each into a free slot: a GPU that held the expert before,
    // else one without a copy, then the least loaded GPU, lowest index.
    auto& fill = m.fill;
    fill.clear();
    for (int32_t e : ex) {
      for (int32_t k = m.count[e]; k < want[e]; ++k) fill.push_back(e);
      m.count[e] = want[e];
    }
    std::stable_sort(fill.begin(), fill.end(), [&](int32_t a, int32_t b) {
      return replica_load(w, a, m.count[a]) > replica_load(w, b, m.count[b]);
    });
    compute_loads();
    for (int32_t e : fill) {
      int32_t pick = -1, pick_key = 0;
      for (int32_t s = first; s < first + slots; ++s) {
        if (m.cur[s] >= 0) continue;
        const int32_t g = s / per_gpu;
        const int32_t key = (held(g, e) < had(g, e) ? 0 : 2) + (held(g, e) > 0 ? 1 : 0);
        if (pick < 0 || key < pick_key ||
            (key == pick_key && m.load[g] < m.load[pick / per_gpu])) {
          pick = s;
          pick_key = key;
        }
      }
      put(pick, e);
      m.slot_load[pick] = replica_load(w, e, m.count[e]);
      m.load[pick / per_gpu] += m.slot_load[pick];
    }
  }

  void swap_slots(int32_t a, int32_t b) {
    const int32_t x = m.cur[a], y = m.cur[b];
    const double delta = m.slot_load[a] - m.slot_load[b];
    take(a);
    take(b);
    put(a, y);
    put(b, x);
    std::swap(m.slot_load[a], m.slot_load[b]);
    m.load[a / per_gpu] -= delta;
    m.load[b / per_gpu] += delta;
  }

  // Receptions a swap of slots a and b (other GPUs, other experts) adds; also false through
  // `ok` when it would put two copies of one expert on a GPU.
  int32_t swap_cost(int32_t a, int32_t b, bool& ok) {
    const int32_t g = a / per_gpu, h = b / per_gpu, x = m.cur[a], y = m.cur[b];
    ok = held(g, y) == 0 && held(h, x) == 0;
    return add_cost(g, y) + add_cost(h, x) - drop_gain(g, x) - drop_gain(h, y);
  }

  // The first GPU of [g0, g1) with the largest load.
  int32_t most_loaded(int32_t g0, int32_t g1) const {
    int32_t g = g0;
    for (int32_t q = g0 + 1; q < g1; ++q) {
      if (m.load[q] > m.load[g]) g = q;
    }
    return g;
  }

  // Whether every GPU of [g0, g1) is at most the target.
  bool within_target(int32_t g0, int32_t g1) const {
    for (int32_t q = g0; q < g1; ++q) {
      if (m.load[q] > target) return false;
    }
    return true;
  }

  // Lowers the most loaded GPU of a region until every GPU is at most the target: swaps with
  // another GPU of the region that leave both at most the target (fewest receptions, then the
  // partner with the least room left), else that bring the top GPU under it (fewest
  // receptions, then the smallest load passed on), else that lower the pair's max (fewest
  // receptions, then the smallest max). Returns whether the region reached the target.
  bool search(int32_t region, int32_t rounds) {
    const int32_t g0 = region * gpn, g1 = g0 + gpn;
    for (int32_t round = 0; round < rounds; ++round) {
      const int32_t g = most_loaded(g0, g1);
      const double top = m.load[g];
      if (top <= target) return true;
      int32_t best_kind = 3, best_cost = 0, best_a = -1, best_b = -1;
      double best_key = 0.0;
      for (int32_t i = 0; i < per_gpu; ++i) {
        const int32_t a = g * per_gpu + i;
        for (int32_t b = g0 * per_gpu; b < g1 * per_gpu; ++b) {
          const int32_t h = b / per_gpu;
          if (h == g || m.cur[a] == m.cur[b]) continue;
          const double delta = m.slot_load[a] - m.slot_load[b];
          if (delta <= 0.0) continue;
          const double new_g = top - delta, new_h = m.load[h] + delta;
          if (std::max(new_g, new_h) >= top) continue;
          const int32_t kind = new_h <= target ? (new_g <= target ? 0 : 2)
                                               : (new_g <= target ? 1 : 2);
          if (kind > best_kind) continue;
          bool ok = false;
          const int32_t cost = swap_cost(a, b, ok);
          if (!ok) continue;
          const double key = kind == 0 ? (fit == 0 ? -m.load[h] : -new_g) : std::max(new_g, new_h);
          if (kind < best_kind || (kind == best_kind && (cost < best_cost ||
                                   (cost == best_cost && key < best_key)))) {
            best_kind = kind;
            best_cost = cost;
            best_key = key;
            best_a = a;
            best_b = b;
          }
        }
      }
      if (best_a < 0) return false;
      swap_slots(best_a, best_b);
    }
    return within_target(g0, g1);
  }

  // Where search() stops with GPUs above the target by a little: for the most loaded GPU g,
  // pairs of swaps, one that brings g to at most the target by loading a GPU h above it and
  // one between h and a third GPU k that brings both to at most the target; the pair with the
  // fewest receptions (then the smallest resulting max) wins. Repeats while GPUs are above the
  // target and such a pair exists. Returns whether the region reached the target.
  bool finish(int32_t region, int32_t rounds) {
    const int32_t g0 = region * gpn, g1 = g0 + gpn;
    for (int32_t round = 0; round < rounds; ++round) {
      const int32_t g = most_loaded(g0, g1);
      if (m.load[g] <= target) return true;
      int32_t best_cost = std::numeric_limits<int32_t>::max();
      double best_key = 0.0;
      int32_t best[4] = {-1, -1, -1, -1};
      for (int32_t i = 0; i < per_gpu; ++i) {
        const int32_t a = g * per_gpu + i;
        for (int32_t b = g0 * per_gpu; b < g1 * per_gpu; ++b) {
          const int32_t h = b / per_gpu;
          if (h == g || m.cur[a] == m.cur[b]) continue;
          const double d1 = m.slot_load[a] - m.slot_load[b];
          if (m.load[g] - d1 > target || m.load[h] + d1 <= target) continue;
          bool ok = false;
          const int32_t cost1 = swap_cost(a, b, ok);
          if (!ok || cost1 >= best_cost) continue;
          swap_slots(a, b);  // tried in place, undone below
          const double over = m.load[h] - target;
          for (int32_t k = g0; k < g1; ++k) {
            if (k == g || k == h || m.load[k] + over > target) continue;  // no room for it
            for (int32_t j = 0; j < per_gpu; ++j) {
              const int32_t c = h * per_gpu + j;
              for (int32_t d = k * per_gpu; d < (k + 1) * per_gpu; ++d) {
              if (m.cur[c] == m.cur[d]) continue;
              const double d2 = m.slot_load[c] - m.slot_load[d];
              if (d2 < over || m.load[k] + d2 > target) continue;
              const int32_t cost = cost1 + swap_cost(c, d, ok);
              if (!ok) continue;
              const double key = std::max(m.load[h] - d2, m.load[k] + d2);
              if (cost < best_cost || (cost == best_cost && key < best_key)) {
                best_cost = cost;
                best_key = key;
                best[0] = a;
                best[1] = b;
                best[2] = c;
                best[3] = d;
              }
              }
            }
          }
          swap_slots(a, b);
        }
      }
      if (best[0] < 0) return false;
      swap_slots(best[0], best[1]);
      swap_slots(best[2], best[3]);
    }
    return within_target(g0, g1);
  }

  // Swaps that undo receptions while every GPU stays at most the target, until none is left.
  void undo_receptions(int32_t region) {
    const int32_t first = region * per_node, last = first + per_node;
    for (int32_t pass = 0; pass < 8; ++pass) {
      bool changed = false;
      for (int32_t a = first; a < last; ++a) {
        const int32_t g = a / per_gpu;
        if (!drop_gain(g, m.cur[a])) continue;
        int32_t best_b = -1, best_cost = 0;
        for (int32_t b = first; b < last; ++b) {
          const int32_t h = b / per_gpu;
          if (h == g || m.cur[a] == m.cur[b]) continue;
          const double delta = m.slot_load[a] - m.slot_load[b];
          if (m.load[g] - delta > target || m.load[h] + delta > target) continue;
          bool ok = false;
          const int32_t cost = swap_cost(a, b, ok);
          if (!ok || cost >= best_cost) continue;
          best_cost = cost;
          best_b = b;
        }
        if (best_b >= 0) {
          swap_slots(a, best_b);
          changed = true;
        }
      }
      if (!changed) break;
    }
  }

  // Receptions of the GPUs of one region (copies beyond what each GPU held before).
  int64_t region_cost(int32_t region) const {
    int64_t cost = 0;
    const size_t first = static_cast<size_t>(region) * gpn * sh.experts;
    for (size_t i = first; i < first + static_cast<size_t>(gpn) * sh.experts; ++i) {
      cost += std::max(0, m.held[i] - m.had[i]);
    }
    return cost;
  }

  // Saves (store) or restores one region's slots, GPU contents and its experts' counts.
  void keep_region(int32_t region, bool store, std::vector<int32_t>& cur,
                   std::vector<int32_t>& held, std::vector<int32_t>& count) {
    const size_t s0 = static_cast<size_t>(region) * per_node;
    const size_t h0 = static_cast<size_t>(region) * gpn * sh.experts;
    const size_t hn = static_cast<size_t>(gpn) * sh.experts;
    if (store) {
      std::copy(m.cur.begin() + s0, m.cur.begin() + s0 + per_node, cur.begin() + s0);
      std::copy(m.held.begin() + h0, m.held.begin() + h0 + hn, held.begin() + h0);
      count = m.count;
    } else {
      std::copy(cur.begin() + s0, cur.begin() + s0 + per_node, m.cur.begin() + s0);
      std::copy(held.begin() + h0, held.begin() + h0 + hn, m.held.begin() + h0);
      m.count = count;
    }
  }

  // Whether a region of `fresh` holds the same experts as the region after regrouping.
  bool same_experts(int32_t region, const int64_t* fresh) const {
    if (sh.nodes == 1) return true;
    const int32_t group_size = sh.experts / sh.groups;
    m.seen.assign(sh.groups, 0);
    for (int32_t s = region * per_node; s < (region + 1) * per_node; ++s) {
      const int32_t g = static_cast<int32_t>(fresh[s] / group_size);
      if (m.group_node[g] != region) return false;
      m.seen[g] = 1;
    }
    for (int32_t g = 0; g < sh.groups; ++g) {
      if ((m.group_node[g] == region) != (m.seen[g] == 1)) return false;
    }
    return true;
  }

  // The whole row: regrouping (hierarchical), then per region each variant of the search
  // (cap scale, fit rule) from the same start, and the region of `fresh` (a plan at most the
  // target, GPUs relabelled to the placement in use; null: none) when it holds the same
  // groups; the region keeps the cheapest variant that reached the target (the first on ties;
  // the first variant if none did).
  bool run(const int64_t* old, const int64_t* fresh, bool fresh_groups, double cap,
           int32_t rounds, int64_t* out) {
    static constexpr int32_t kVariants = 4;
    static constexpr double kCapScale[kVariants] = {1.0, 1.0, 0.85, 1.3};
    static constexpr int32_t kFit[kVariants] = {0, 1, 0, 1};
    const int32_t experts = sh.experts, replicas = sh.replicas;
    m.cur.resize(replicas);
    m.had.assign(static_cast<size_t>(sh.gpus) * experts, 0);
    for (int32_t s = 0; s < replicas; ++s) {
      m.cur[s] = static_cast<int32_t>(old[s]);
      ++m.had[static_cast<size_t>(s / per_gpu) * experts + old[s]];
    }
    m.held = m.had;
    if (sh.nodes > 1 && !regroup(fresh_groups ? fresh : nullptr)) {
      std::copy(old, old + replicas, out);
      return false;
    }
    m.count.assign(experts, 0);
    for (int32_t s = 0; s < replicas; ++s) {
      if (m.cur[s] >= 0) ++m.count[m.cur[s]];
    }
    m.need_min.assign(experts, 1);
    m.start_cur = m.cur;
    m.start_held = m.held;
    m.start_count = m.count;
    m.best_cur.resize(replicas);
    m.best_held.resize(m.held.size());
    bool all = true;
    for (int32_t region = 0; region < sh.nodes; ++region) {
      bool found = false;
      int64_t best = 0;
      for (int32_t v = 0; v < kVariants; ++v) {
        keep_region(region, false, m.start_cur, m.start_held, m.start_count);
        fit = kFit[v];
        set_counts(region, cap * kCapScale[v]);
        compute_loads();
        // One slot per GPU: swaps only permute GPU loads, so no chain of them can help.
        const bool ok = search(region, rounds) || (per_gpu > 1 && finish(region, gpn));
        undo_receptions(region);
        const int64_t cost = region_cost(region);
        if ((ok && (!found || cost < best)) || (!found && v == 0)) {
          keep_region(region, true, m.best_cur, m.best_held, m.best_count);
          best = cost;
          found = found || ok;
        }
      }
      if (fresh != nullptr && same_experts(region, fresh)) {
        // The fresh plan's region (at most the target by construction), with the swaps that
        // undo receptions.
        keep_region(region, false, m.start_cur, m.start_held, m.start_count);
        const int32_t first = region * per_node;
        for (int32_t s = first; s < first + per_node; ++s) {
          if (m.cur[s] < 0) continue;
          --m.count[m.cur[s]];
          take(s);
        }
        for (int32_t s = first; s < first + per_node; ++s) {
          put(s, static_cast<int32_t>(fresh[s]));
          ++m.count[fresh[s]];
        }
        compute_loads();
        undo_receptions(region);
        const int64_t cost = region_cost(region);
        if (!found || cost < best) {
          keep_region(region, true, m.best_cur, m.best_held, m.best_count);
          best = cost;
          found = true;
        }
      }
      keep_region(region, false, m.best_cur, m.best_held, m.best_count);
      m.start_count = m.count;  // later regions start from this region's chosen counts
      all = all && found;
    }
    for (int32_t s = 0; s < replicas; ++s) out[s] = m.cur[s];
    return all;
  }
};

// One layer: from old_row, a placement whose max GPU load is at most `target` (checked here
// in float64 on float32 replica loads) with few receptions, into out; `cap` bounds replica
// loads when replica counts are chosen; fresh_row (or null) is a plan at most the target with
// GPUs relabelled to old_row. When the first pass misses the target under the hierarchical
// policy, a second one takes fresh_row's groups on each node. Returns whether it reached the
// target (else out is the first region variant's best effort, or old_row when old_row splits
// a group over nodes).
inline bool migrate_row(const float* w, const int64_t* old_row, const int64_t* fresh_row,
                        double target, double cap, const MigrateShape& sh, int32_t rounds,
                        int64_t* out, MigrateScratch& m) {
  MigrateRow row(w, sh, target, m);
  // Hierarchical: with the fresh plan's groups on each node, every region has a fallback.
  const bool ok = row.run(old_row, fresh_row, false, cap, rounds, out) ||
                  (sh.nodes > 1 && fresh_row != nullptr &&
                   row.run(old_row, fresh_row, true, cap, rounds, out));
  const int32_t per_gpu = sh.replicas / sh.gpus;
  for (int32_t g = 0; g < sh.gpus; ++g) {  // an expert a GPU keeps stays in its slot
    m.gpu_content.assign(out + static_cast<size_t>(g) * per_gpu,
                         out + static_cast<size_t>(g + 1) * per_gpu);
    place_in_gpu(old_row, g * per_gpu, per_gpu, m.gpu_content, m.gpu_place, out);
  }
  return ok;
}

}  // namespace eplb_migrate
}  // namespace deeppar
