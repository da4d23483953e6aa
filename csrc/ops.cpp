// Every deeppar op schema lives here, in one TORCH_LIBRARY block; kernels register per device
// in csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// Importing deeppar._C only needs to run the static registrations below; the module itself is
// empty (ops are reached through torch.ops.deeppar).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace deeppar {
std::string eplb_cpu_features();  // csrc/cpu/eplb.cpp
}  // namespace deeppar

TORCH_LIBRARY(deeppar, m) {
  // Which sort the CPU planner uses for nodes of <= 64 experts: "avx512" (the CPU has AVX-512
  // and torch's CPU capability, lowered by ATEN_CPU_CAPABILITY, allows it) or "portable".
  m.def("eplb_cpu_features() -> str", &deeppar::eplb_cpu_features);
  // Load carried by each physical expert slot: weight[l, phy2log[l, s]] / logcnt[l, phy2log[l, s]].
  m.def("slot_loads(Tensor weight, Tensor phy2log, Tensor logcnt) -> Tensor");
  // EPLB planner (specs/eplb.md), hierarchical policy for every row: weight [L, E] float32 ->
  // (phy2log [L, R], replica rank of each slot [L, R], logcnt [L, E]), all int64.
  m.def("eplb_rebalance(Tensor weight, int num_replicas, int num_groups, int num_nodes, "
        "int num_gpus) -> (Tensor, Tensor, Tensor)");
  // EPLB planner and log2phy in one call (CPU): weight [L, E] float32 -> (phy2log [L, R],
  // log2phy [L, E, X], logcnt [L, E]), int64; X = max_replicas, or the largest replica count
  // when max_replicas is -1; ValueError if an expert needs more than max_replicas.
  m.def("eplb_rebalance_maps(Tensor weight, int num_replicas, int num_groups, int num_nodes, "
        "int num_gpus, int max_replicas) -> (Tensor, Tensor, Tensor)");
  // EPLB plans with method="balanced" (csrc/cpu/eplb_balanced.cpp): same signature and outputs
  // as eplb_rebalance; max GPU load per layer never above eplb_rebalance's.
  m.def("eplb_rebalance_balanced(Tensor weight, int num_replicas, int num_groups, "
        "int num_nodes, int num_gpus) -> (Tensor, Tensor, Tensor)");
  // Migration-aware EPLB (csrc/cpu/eplb_migrate.cpp). eplb_migrate: from the placement in use
  // current [L, R], a placement whose max GPU load per layer is at most target [L] (float64)
  // with few replicas moved between GPUs, using fresh [L, R] (a plan that reaches target, GPUs
  // relabelled to current) where the warm start does not; cap [L] bounds replica loads when
  // replica counts change -> (phy2log [L, R], reached [L] bool). eplb_relabel: plan's GPUs
  // (nodes first) renumbered to overlap current most. eplb_source_slots: old slot each slot of
  // plan copies.
  m.def("eplb_migrate(Tensor weight, Tensor current, Tensor fresh, Tensor target, Tensor cap, "
        "int num_groups, int num_nodes, int num_gpus, int max_steps) -> (Tensor, Tensor)");
  m.def("eplb_relabel(Tensor current, Tensor plan, int num_gpus, int num_nodes) -> Tensor");
  m.def("eplb_source_slots(Tensor current, Tensor plan, int num_gpus, int num_nodes) -> Tensor");
  // EPLB balanced packing of each row: weight [X, n] -> (pack index [X, n], rank in pack [X, n]).
  m.def("eplb_pack(Tensor weight, int num_packs) -> (Tensor, Tensor)");
  // EPLB replication of each row: weight [X, n] -> (phy2log [X, k], rank [X, k], logcnt [X, n]).
  m.def("eplb_replicate(Tensor weight, int num_phy) -> (Tensor, Tensor, Tensor)");
  // EPLB log2phy [L, E, width] from phy2log and replica ranks [L, R]; -1 padded; a replica of
  // rank >= width is an error (ValueError).
  m.def("eplb_log2phy(Tensor phy2log, Tensor phy_rank, int num_experts, int width) -> Tensor");
  // MoE token permute: x [T, H], topk_ids [T, k] -> (rows [T*k, H] ordered by expert, stably by
  // (token, slot); pos [T, k] row of each pair; rows per rank [R]; rows per expert [E]), experts
  // split contiguously over R ranks. GPU kernels run on num_sms persistent blocks (0: default).
  m.def("moe_permute(Tensor x, Tensor topk_ids, int num_experts, int num_ranks, int num_sms) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // MoE token unpermute: out[t] = sum_j weights[t, j] * y[pos[t, j]], summed in j order in float32
  // (float64 for float64 y), rounded once to y's dtype.
  m.def("moe_unpermute(Tensor y, Tensor pos, Tensor weights, int num_sms) -> Tensor");
  // Replica routing (deeppar.eplb.routing): topk_ids [T, k] integer, one layer's log2phy [E, X]
  // and logcnt [E] int64 -> [T, k] int64 slots. Token t takes candidate (t + token_offset) mod n
  // of its expert's n candidates (log2phy order): its replicas on local_gpu (slot //
  // slots_per_gpu), else on local_gpu's node (gpus_per_node > 0), else all; local_gpu < 0: all.
  m.def("route_replicas(Tensor topk_ids, Tensor log2phy, Tensor logcnt, int token_offset, "
        "int local_gpu, int slots_per_gpu, int gpus_per_node) -> Tensor");
  // The load recorder's count: counts [R, E] int64 += the expert counts of each of the R rows of
  // topk_ids (any integer tensor, numel a multiple of R, read as [R, numel / R]); ids outside
  // [0, E) raise ValueError with counts untouched.
  m.def("expert_counts_add_(Tensor(a!) counts, Tensor topk_ids) -> ()");
}
