"""The classification table: defaults, order, user rules, validation."""

from __future__ import annotations

import pytest

from deeppar.profiling import COMM, COMPUTE, MEMORY, Classifier, Rule, kernel_family

COMM_NAMES = [
    "ncclKernel_AllReduce_RING_LL_Sum_float(ncclWorkElem)",  # old
    "ncclAllReduceRingLLKernel_sum_f32(ncclColl)",  # older
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)",  # new
    "ncclDevKernel_Broadcast_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
    "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
    "void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*)",
    "void deep_ep::intranode::cached_notify_combine<8>(void**, int*)",
    "void deep_ep::internode::notify_dispatch<false, 8>(int const*)",
    "void deep_ep::internode_ll::combine<false, 7168>(void*)",
    "void dpsk::ep::internode::cached_notify<false>(int, int)",
]
COMPUTE_NAMES = [
    "void dpsk::ep::cuda::get_dispatch_layout<256, 32, 8>(long const*, int*)",
    "void deep_ep::layout::get_dispatch_layout<256, 32, 8>(long const*)",
    "void cuda::per_token_cast_to_fp8_with_channels<__nv_bfloat16, 128>(x)",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_nn_n_tilesize128x128x64",
]


@pytest.mark.parametrize("name", COMM_NAMES)
def test_communication_kernels(name):
    assert Classifier().classify(name)[0] == COMM


@pytest.mark.parametrize("name", COMPUTE_NAMES)
def test_computation_kernels(name):
    assert Classifier().classify(name)[0] == COMPUTE


def test_rule_names_and_memory():
    c = Classifier()
    assert c.classify(COMPUTE_NAMES[0]) == (COMPUTE, "deepep-layout")
    assert c.classify(COMPUTE_NAMES[2]) == (COMPUTE, "cast")
    assert c.classify(COMPUTE_NAMES[3]) == (COMPUTE, "default")
    assert c.classify("Memcpy PtoP (Device -> Device)", "memcpy") == (COMM, "memcpy-p2p")
    assert c.classify("Memcpy HtoD (Pageable -> Device)", "memcpy")[0] == MEMORY
    assert c.classify("Memset (Device)", "memset")[0] == MEMORY


def test_user_rules_come_first():
    c = Classifier.with_patterns(comm=["my_alltoall_v2"], compute=["ncclDevKernel_Generic"])
    assert c.classify("void my_alltoall_v2_kernel()") == (COMM, "user-comm:my_alltoall_v2")
    assert c.classify("ncclDevKernel_Generic(x)")[0] == COMPUTE
    custom = Classifier([Rule("mine", r"^foo", COMM)])
    assert custom.classify("foo_kernel") == (COMM, "mine")
    assert custom.classify("ncclDevKernel_SendRecv") == (COMPUTE, "default")


def test_rule_validation():
    with pytest.raises(ValueError, match="category"):
        Rule("x", "a", "network")
    with pytest.raises(ValueError, match="invalid regex"):
        Rule("x", "(", COMM)
    with pytest.raises(ValueError, match="kind"):
        Rule("x", "a", COMM, kind="copy")


def test_kernel_family():
    assert kernel_family("void ns::k<128, 4>(int*, float)") == "ns::k"
    assert kernel_family("void (anonymous namespace)::f<int>(int)") == "(anon)::f"
    assert kernel_family("rotary_kernel") == "rotary_kernel"
    assert kernel_family("void cutlass::device_kernel<a::GemmKernel>(a::GemmKernel::Params)") \
        == "cutlass::device_kernel<a::GemmKernel>"


# (name, kind, category, rule): kernel names as profilers print them
REAL_WORLD = [
    # NCCL, old and new naming
    ("ncclKernel_AllReduce_RING_LL_Sum_float(ncclWorkElem)", "kernel", COMM, "nccl"),
    ("ncclAllReduceRingLLKernel_sum_f32(ncclColl)", "kernel", COMM, "nccl"),
    ("ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
     "kernel", COMM, "nccl"),
    ("ncclDevKernel_Generic(ncclDevKernelArgsStorage<4096ul>)", "kernel", COMM, "nccl"),
    ("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", "kernel", COMM, "nccl"),
    # DeepEP and DeepSeek's EP library; the layout kernel is local
    ("void deep_ep::internode_ll::dispatch<false, 7168>(void*, float*, int*)", "kernel", COMM,
     "deepep"),
    ("void dpsk::ep::internode::combine<__nv_bfloat16, 8, 32>(int4*, float*)", "kernel", COMM,
     "deepep"),
    ("void deep_ep::layout::get_dispatch_layout<256, 32, 8>(long const*, int*)", "kernel",
     COMPUTE, "deepep-layout"),
    # gloo, NVSHMEM, torch symmetric memory
    ("gloo::CudaAllreduceRing", "kernel", COMM, "gloo"),
    ("void nvshmemi_transfer_rma_nbi<(threadgroup_t)3>(void*, void const*)", "kernel", COMM,
     "nvshmem"),
    ("void c10d::symmetric_memory::one_shot_all_reduce_kernel<float, 16, 8>(float**)",
     "kernel", COMM, "symmetric-memory"),
    # vLLM custom all-reduce, TransformerEngine userbuffers
    ("void vllm::cross_device_reduce_1stage<__nv_bfloat16, 8>(vllm::RankData*, "
     "vllm::RankSignals, vllm::Signal*, __nv_bfloat16*, int, int)", "kernel", COMM,
     "vllm-custom-allreduce"),
    ("void vllm::cross_device_reduce_2stage<float, 4>(vllm::RankData*, vllm::RankSignals)",
     "kernel", COMM, "vllm-custom-allreduce"),
    ("userbuffers_fp16_sum_inplace_gpu_rr_rs(int, int, int, int, int, void**, int)", "kernel",
     COMM, "userbuffers"),
    ("kuserbuffers_pushsend(int*, int*, int4*, int4*, int)", "kernel", COMM, "userbuffers"),
    # generic collective names outside the generated kernels
    ("void all_to_all_kernel<float>(float const*, float*)", "kernel", COMM, "collective-name"),
    # copies: peer-to-peer moves data between devices, the rest is local
    ("Memcpy PtoP (Device -> Device)", "memcpy", COMM, "memcpy-p2p"),
    ("Memcpy DtoD (Device -> Device)", "memcpy", MEMORY, "memcpy"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy", MEMORY, "memcpy"),
    ("Memset (Device)", "memset", MEMORY, "memset"),
    # casts and layout changes are local, "broadcast" is not a cast
    ("void cuda::per_token_cast_to_fp8_with_channels<__nv_bfloat16, 128>(x)", "kernel",
     COMPUTE, "cast"),
    ("void at::native::elementwise_kernel<128, 2, BroadcastFn>(int, BroadcastFn)", "kernel",
     COMPUTE, "default"),
    ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3>"
     "(float*)", "kernel", COMPUTE, "default"),
    ("void at::native::transpose_kernel<float>(float const*, float*)", "kernel", COMPUTE,
     "default"),
    # Inductor / nvFuser kernels named after the collective they feed are local work
    ("triton_poi_fused__to_copy_all_gather_0", "kernel", COMPUTE, "generated-kernel"),
    ("triton_red_fused_reduce_scatter_tensor_sum_1", "kernel", COMPUTE, "generated-kernel"),
    ("triton_per_fused_all_reduce_add_2", "kernel", COMPUTE, "generated-kernel"),
    ("nvfuser_pointwise_f0_c1_r0_g3_all_gather", "kernel", COMPUTE, "generated-kernel"),
]


@pytest.mark.parametrize("name,kind,category,rule", REAL_WORLD)
def test_real_world_kernel_names(name, kind, category, rule):
    assert Classifier().classify(name, kind) == (category, rule)
