// Every deeppar op schema lives here, in one TORCH_LIBRARY block; kernels register per device
// in csrc/cpu/*.cpp and csrc/cuda/*.cu with TORCH_LIBRARY_IMPL.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing deeppar._C only needs to run the static registrations below; the module itself is
// empty (ops are reached through torch.ops.deeppar).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(deeppar, m) {
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
}
