// The layer loop shared by the CPU planner ops (deeppar::eplb_rebalance and
// eplb_rebalance_balanced): checks the op's arguments, allocates its three outputs and plans
// every layer of a [L, E] float32 weight with one row function, layers split over threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>

#include "cpu/eplb_rules.h"
#include "op_checks.h"

namespace deeppar {
namespace eplb_cpu {

// plan_row(weight row [E], shape, phy2log row [R], replica rank row [R], logcnt row [E],
// scratch) plans one layer; RowScratch is its per-thread scratch space. Layers are grouped into
// parallel tasks of about slots_per_task slots, so small batches stay on the calling thread.
template <typename RowScratch, typename PlanRow>
std::tuple<at::Tensor, at::Tensor, at::Tensor> plan_layers(
    const at::Tensor& weight,  // [L, E] float32, non-negative, finite
    int64_t num_replicas, int64_t num_groups, int64_t num_nodes, int64_t num_gpus,
    int64_t slots_per_task, const char* op, PlanRow plan_row) {
  check_eplb_rebalance_args(weight, num_replicas, num_groups, num_nodes, num_gpus);
  const int64_t layers = weight.size(0), experts = weight.size(1);
  const at::Tensor w = weight.contiguous();
  auto [phy2log, phy_rank, logcnt] = empty_plan_maps(w, num_replicas);
  const Shape sh{static_cast<int32_t>(experts), static_cast<int32_t>(num_replicas),
                 static_cast<int32_t>(num_groups), static_cast<int32_t>(num_nodes),
                 static_cast<int32_t>(num_gpus)};
  const float* wp = w.const_data_ptr<float>();
  int64_t* pp = phy2log.mutable_data_ptr<int64_t>();
  int64_t* rp = phy_rank.mutable_data_ptr<int64_t>();
  int64_t* cp = logcnt.mutable_data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, slots_per_task / num_replicas);
  at::parallel_for(0, layers, grain, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    for (int64_t l = begin; l < end; ++l) {
      check_row(wp + l * experts, experts, op);
      plan_row(wp + l * experts, sh, pp + l * num_replicas, rp + l * num_replicas,
               cp + l * experts, scratch);
    }
  });
  return {phy2log, phy_rank, logcnt};
}

// Runs body(begin, end) over [0, n) in chunks of `grain` items, on the calling thread and,
// when there are several chunks, on helpers of the inter-op pool (at::launch): as many as that
// pool has threads, and no more than at::get_num_threads() - 1, so that torch.set_num_threads
// still caps the threads one call uses. Chunks are claimed one at a time from a shared counter,
// so a helper that starts late (the pool's threads must be woken, and on a busy machine may
// wait for a core) costs nothing: the caller takes the remaining chunks itself and waits only
// for chunks a helper has claimed, never for a helper to start (unlike a fork-join region,
// whose join waits for every thread). That wait is at most one chunk's work per helper (callers
// size chunks to ~0.1 ms or less): a bounded number of yields, then a condition variable.
// The first exception thrown by body is rethrown here, once every claimed chunk has ended.
constexpr int kYieldsBeforeSleep = 64;

template <typename Body>
void run_chunks(int64_t n, int64_t grain, const Body& body) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t pool = std::min<int64_t>(at::get_num_interop_threads(), at::get_num_threads() - 1);
  const int64_t helpers = at::in_parallel_region() ? 0 : std::min<int64_t>(pool, chunks - 1);
  if (helpers <= 0) {
    if (n > 0) body(0, n);
    return;
  }
  // Shared with the helpers, which may outlive this call (they then claim nothing).
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;  // guards error, and orders the last `done` with the caller's wait
    std::condition_variable all_done;
    std::exception_ptr error;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t, int64_t)> run_one = [&body](int64_t begin, int64_t end) {
    body(begin, end);
  };
  // Claims and runs chunks until none is left; *fn (on this call's stack) is only touched for
  // a claimed chunk, i.e. while this call still waits for it.
  auto work = [state, chunks, n, grain](const std::function<void(int64_t, int64_t)>* fn) {
    for (int64_t c; (c = state->next.fetch_add(1)) < chunks;) {
      try {
        (*fn)(c * grain, std::min(n, (c + 1) * grain));
      } catch (...) {
        std::lock_guard<std::mutex> lock(state->mutex);
        if (!state->error) state->error = std::current_exception();
      }
      if (state->done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mutex);  // the caller is waiting or not yet
        state->all_done.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) at::launch([work, fn = &run_one]() { work(fn); });
  work(&run_one);
  const auto all_done = [&] { return state->done.load(std::memory_order_acquire) >= chunks; };
  // A chunk a helper holds usually ends within microseconds: a few yields first, then sleep.
  for (int spins = 0; spins < kYieldsBeforeSleep && !all_done(); ++spins) {
    std::this_thread::yield();
  }
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, all_done);
  if (state->error) std::rethrow_exception(state->error);
}

}  // namespace eplb_cpu
}  // namespace deeppar
