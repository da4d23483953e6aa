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
