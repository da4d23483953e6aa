"""Token permute / unpermute: every backend against the plain-torch reference (argsort + index
ops) on many shapes, bit-identical on CPU; gradients; opcheck; bad input."""

from __future__ import annotations

import pytest
import torch
from _triton_helpers import compile_for_sm90
from conftest import HAS_CUDA

from deeppar import _native
from deeppar.moe import _ops, permute, permute_reference, unpermute, unpermute_reference
from deeppar.ops import BackendUnavailable

# (tokens, hidden, experts, top_k, ranks)
SHAPES = [
    (0, 4, 4, 2, 1),
    (1, 1, 1, 1, 1),
    (7, 5, 6, 1, 3),
    (33, 17, 10, 4, 2),
    (3, 8, 64, 2, 4),  # most experts empty
    (64, 130, 7, 3, 1),
    (129, 64, 256, 8, 8),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def _problem(tokens, hidden, experts, top_k, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    # distinct experts per token, as a router picks them; skewed so that some experts are empty
    scores = torch.rand(tokens, experts, generator=gen) ** 3
    ids = scores.topk(top_k, dim=-1).indices if tokens else torch.empty(0, top_k).long()
    weights = torch.rand(tokens, top_k, generator=gen)
    return x.to(device), ids.to(device), weights.to(device)


def _native_devices() -> list[str]:
    return [d for d in (["cpu", "cuda"] if HAS_CUDA else ["cpu"]) if _native.has_kernel(
        "moe_permute", d)]


def _backend_params():
    params = [pytest.param("reference", "cpu", id="reference-cpu")]
    params += [pytest.param("native", d, id=f"native-{d}") for d in _native_devices()]
    params.append(pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton",
                               marks=pytest.mark.triton))
    return params


def _skip_unusable(backend: str, device: str) -> None:
    if backend == "triton" and not _native.triton_usable(device):
        pytest.skip("Triton cannot run here (set DEEPPAR_TRITON_INTERPRET=1 on CPU)")


def test_reference_order_is_stable_by_expert_then_pair():
    x, ids, _ = _problem(50, 3, 9, 3, seed=3)
    tokens, pos, rank_counts, expert_counts = permute_reference(x, ids, 9, 3)
    flat = ids.reshape(-1)
    pair_of_row = torch.empty_like(flat)
    pair_of_row[pos.reshape(-1)] = torch.arange(flat.numel())
    experts_in_order = flat[pair_of_row]
    assert bool((experts_in_order[1:] >= experts_in_order[:-1]).all())
    same = experts_in_order[1:] == experts_in_order[:-1]
    assert bool((pair_of_row[1:][same] > pair_of_row[:-1][same]).all())
    assert torch.equal(tokens, x[pair_of_row // 3])
    assert torch.equal(expert_counts, torch.bincount(flat, minlength=9))
    assert rank_counts.tolist() == [int(expert_counts[3 * r:3 * r + 3].sum()) for r in range(3)]


@pytest.mark.parametrize(("backend", "device"), _backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 1])
def test_backend_matches_reference(backend, device, shape, dtype, seed):
    _skip_unusable(backend, device)
    tokens, hidden, experts, top_k, ranks = shape
    x, ids, w = _problem(tokens, hidden, experts, top_k, seed, dtype, device)
    got = permute(x, ids, experts, ranks, backend=backend)
    want = permute_reference(x.cpu(), ids.cpu(), experts, ranks)
    for g, e in zip(got, want):
        assert g.device.type == device
        assert torch.equal(g.cpu(), e)
    y = torch.randn(tokens * top_k, hidden, dtype=torch.float32).to(dtype).to(device)
    out = unpermute(y, got.pos, w, backend=backend)
    ref = unpermute_reference(y.cpu(), want[1], w.cpu())
    if device == "cpu":
        assert torch.equal(out, ref)  # same products, summed in the same (top-k) order
    else:  # GPU kernels may fuse multiply-add (one rounding fewer)
        torch.testing.assert_close(out.cpu(), ref)


@pytest.mark.parametrize(("backend", "device"), _backend_params())
@pytest.mark.parametrize("num_sms", [1, 3, 64])
def test_num_sms_does_not_change_results(backend, device, num_sms):
    _skip_unusable(backend, device)
    x, ids, w = _problem(77, 9, 12, 3, seed=5, device=device)
    default = permute(x, ids, 12, 4, backend=backend)
    fixed = permute(x, ids, 12, 4, backend=backend, num_sms=num_sms)
    for a, b in zip(default, fixed):
        assert torch.equal(a, b)
    assert torch.equal(unpermute(default.tokens, default.pos, w, backend=backend),
                       unpermute(default.tokens, default.pos, w, backend=backend, num_sms=num_sms))


@pytest.mark.parametrize(("backend", "device"), _backend_params())
@pytest.mark.parametrize("shape", [(0, 3, 4, 2, 2), (9, 6, 8, 3, 2), (40, 5, 16, 4, 4)])
def test_gradients_match_reference_backend(backend, device, shape):
    _skip_unusable(backend, device)
    tokens, hidden, experts, top_k, ranks = shape

    def run(backend_name):
        x, ids, w = _problem(tokens, hidden, experts, top_k, seed=2, device=device)
        x.requires_grad_()
        w.requires_grad_()
        p = permute(x, ids, experts, ranks, backend=backend_name)
        scale = torch.linspace(-1, 2, p.tokens.numel(), device=device).view_as(p.tokens)
        out = unpermute(p.tokens * scale + 0.5, p.pos, w, backend=backend_name)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(device)
        out.backward(grad)
        return x.grad, w.grad

    got, want = run(backend), run("reference")
    for g, e in zip(got, want):
        if device == "cpu":
            assert torch.equal(g, e)
        else:
            torch.testing.assert_close(g, e)


def test_reference_gradients_are_the_true_gradients():
    x, ids, w = _problem(6, 4, 5, 2, seed=1, dtype=torch.float64)
    x.requires_grad_()
    w = w.double().requires_grad_()

    def f(x, w):
        p = permute(x, ids, 5, 1, backend="reference")
        return unpermute(p.tokens.sin(), p.pos, w, backend="reference")

    assert torch.autograd.gradcheck(f, (x, w))


def _op_pairs():
    pairs = [pytest.param(_ops.REFERENCE_OPS, "cpu", id="reference")]
    pairs += [pytest.param(None, d, id=f"native-{d}") for d in _native_devices()]
    pairs.append(pytest.param("triton", "cuda" if HAS_CUDA else "cpu", id="triton",
                              marks=pytest.mark.triton))
    return pairs


@pytest.mark.parametrize(("pair", "device"), _op_pairs())
def test_opcheck(pair, device):
    if pair == "triton":
        _skip_unusable("triton", device)
        pair = _ops.triton_ops()
    elif pair is None:
        pair = _ops.NATIVE_OPS
    permute_op, unpermute_op = pair
    x, ids, w = _problem(11, 6, 8, 3, seed=0, device=device)
    torch.library.opcheck(permute_op, (x.requires_grad_(), ids, 8, 2, 0))
    p = permute(x.detach(), ids, 8, 2, backend="reference")
    torch.library.opcheck(unpermute_op, (p.tokens.requires_grad_(), p.pos, w.requires_grad_(), 0))


def test_compiles():
    x, ids, w = _problem(10, 4, 6, 2, seed=0)

    def f(x, ids, w):
        p = permute(x, ids, 6, 2)
        return unpermute(p.tokens * 2, p.pos, w)

    compiled = torch.compile(f, fullgraph=False)
    assert torch.equal(compiled(x, ids, w), f(x, ids, w))


def test_bad_input():
    x, ids, w = _problem(4, 3, 6, 2, seed=0)
    with pytest.raises(ValueError, match="outside"):
        permute(x, ids + 5, 6)
    with pytest.raises(ValueError, match="top_k=2 exceeds num_experts=1"):
        permute(x, ids.clamp(max=0), 1)
    with pytest.raises(ValueError, match="num_ranks"):
        permute(x, ids, 6, 4)
    with pytest.raises(TypeError, match="int64"):
        permute(x, ids.int(), 6)
    with pytest.raises(ValueError, match="one row per token"):
        permute(x[:3], ids, 6)
    with pytest.raises(ValueError, match="num_sms"):
        permute(x, ids, 6, num_sms=-1)
    with pytest.raises(ValueError, match="backend must be"):
        permute(x, ids, 6, backend="fast")
    with pytest.raises(BackendUnavailable, match="CUDA tensors"):
        permute(x, ids, 6, backend="cuda")
    p = permute(x, ids, 6)
    with pytest.raises(ValueError, match="rows"):
        unpermute(p.tokens[:-1], p.pos, w)
    with pytest.raises(ValueError, match="topk_weights"):
        unpermute(p.tokens, p.pos, w[:, :1])


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
def test_triton_kernels_compile_for_gpu(dtype):
    """The Triton kernels compile to sm_90 cubins (no GPU needed): catches what the interpreter
    accepts but the compiler does not (loop-carried types, block shapes)."""
    from conftest import TRITON_INTERPRET

    if TRITON_INTERPRET:
        pytest.skip("the interpreter replaces the compiler")
    if not _native.triton_status()[0]:
        pytest.skip("triton cannot be imported")
    from deeppar.kernels import moe_permute as k

    count = compile_for_sm90(k._count_kernel, {"ids_ptr": "*i64", "hist_ptr": "*i64"},
                              {"BLOCK": 32, "EXPERTS_P2": 256})
    scatter = compile_for_sm90(
        k._scatter_kernel,
        {"x_ptr": f"*{dtype}", "ids_ptr": "*i64", "hist_ptr": "*i64", "out_ptr": f"*{dtype}",
         "pos_ptr": "*i64", "rank_counts_ptr": "*i64", "expert_counts_ptr": "*i64"},
        {"BLOCK": 32, "EXPERTS_P2": 256, "RANKS_P2": 8, "BLOCK_H": 256},
    )
    unpermute_kernel = compile_for_sm90(
        k._unpermute_kernel,
        {"y_ptr": f"*{dtype}", "pos_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": f"*{dtype}"},
        {"ACC_F64": dtype == "fp64", "ROUND_BF16": dtype == "bf16", "BLOCK_H": 1024},
    )
    for compiled in (count, scatter, unpermute_kernel):
        assert compiled.asm["cubin"]
