"""MoELayer over 1, 2 and 4 gloo ranks against a one-process dense reference that runs every
expert on the same rows in the same order: outputs and gradients (input, router, experts,
shared expert) are bit-identical. Bad input raises the same ValueError on every rank."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _runtime_helpers import failures, run_cases

from deeppar.moe import (
    MoELayer,
    Router,
    SwiGLUExperts,
    agree_on_routing,
    combine_backward_start,
    combine_start,
    dispatch_backward_start,
    dispatch_start,
    exchange_counts,
    permute,
    unpermute,
)

H, INTER, SHARED = 8, 6, 4
CONFIGS = {
    # name: (experts, top_k, router kwargs)
    "sigmoid_grouped": (8, 3, dict(score_func="sigmoid", n_group=4, topk_group=2,
                                   routed_scaling_factor=2.5)),
    "softmax": (8, 2, dict(score_func="softmax")),
}


def _tokens_per_rank(world: int) -> list[int]:
    return [5, 0, 7, 3][:world] if world > 1 else [6]


def _dense_params(experts: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "router": torch.randn(experts, H, generator=gen) * 0.5,
        "bias": torch.randn(experts, generator=gen) * 0.1,
        "w13": torch.randn(experts, 2 * INTER, H, generator=gen) * 0.3,
        "w2": torch.randn(experts, H, INTER, generator=gen) * 0.3,
        "s13": torch.randn(1, 2 * SHARED, H, generator=gen) * 0.3,
        "s2": torch.randn(1, H, SHARED, generator=gen) * 0.3,
    }


def _inputs(world: int, seed: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, H, generator=gen) for t in _tokens_per_rank(world)]
    gs = [torch.randn(t, H, generator=gen) for t in _tokens_per_rank(world)]
    return xs, gs


def _router(experts: int, top_k: int, kwargs: dict, p: dict) -> Router:
    router = Router(H, experts, top_k, **kwargs)
    with torch.no_grad():
        router.weight.copy_(p["router"])
        router.bias.copy_(p["bias"])
    return router


def _shared(p: dict) -> SwiGLUExperts:
    shared = SwiGLUExperts(1, H, SHARED)
    with torch.no_grad():
        shared.w13.copy_(p["s13"])
        shared.w2.copy_(p["s2"])
    return shared


def dense_reference(config: str, world: int):
    """Every rank's tokens in one process; each chunk routed and permuted on its own (own copies
    of the replicated router and shared expert), each expert run once on the rows of all chunks
    in rank order, as the EP ranks receive them. Returns outputs, input grads, per-chunk
    router/shared grads and the dense expert grads."""
    experts, top_k, kwargs = CONFIGS[config]
    p = _dense_params(experts)
    xs, gs = _inputs(world)
    xs = [x.clone().requires_grad_() for x in xs]
    dense = SwiGLUExperts(experts, H, INTER)
    with torch.no_grad():
        dense.w13.copy_(p["w13"])
        dense.w2.copy_(p["w2"])
    routers = [_router(experts, top_k, kwargs, p) for _ in xs]
    shareds = [_shared(p) for _ in xs]
    chunks = []
    for x, router in zip(xs, routers):
        ids, w = router(x)
        chunks.append((permute(x, ids, experts, world, backend="reference"), w))
    segments = [c.tokens.split(c.expert_counts.tolist()) for c, _ in chunks]
    outputs_per_chunk: list[list[torch.Tensor]] = [[] for _ in xs]
    for e in range(experts):
        rows = torch.cat([seg[e] for seg in segments])
        y = dense.expert(e, rows)
        for r, part in enumerate(y.split([len(seg[e]) for seg in segments])):
            outputs_per_chunk[r].append(part)
    outs = []
    for r, (c, w) in enumerate(chunks):
        out = unpermute(torch.cat(outputs_per_chunk[r]), c.pos, w, backend="reference")
        outs.append(out + shareds[r].expert(0, xs[r]))
    torch.autograd.backward(outs, gs)
    return {
        "out": [o.detach() for o in outs],
        "x_grad": [x.grad for x in xs],
        "router_grad": [r.weight.grad for r in routers],
        "shared_grad": [(s.w13.grad, s.w2.grad) for s in shareds],
        "w13_grad": dense.w13.grad,
        "w2_grad": dense.w2.grad,
    }


def _ep_layer(config: str, world: int, rank: int, group=None) -> MoELayer:
    experts, top_k, kwargs = CONFIGS[config]
    p = _dense_params(experts)
    layer = MoELayer(H, INTER, experts, top_k, group=group, shared_intermediate=SHARED, **kwargs)
    local = experts // world
    with torch.no_grad():
        layer.router.weight.copy_(p["router"])
        layer.router.bias.copy_(p["bias"])
        layer.experts.w13.copy_(p["w13"][rank * local:(rank + 1) * local])
        layer.experts.w2.copy_(p["w2"][rank * local:(rank + 1) * local])
        layer.shared.w13.copy_(p["s13"])
        layer.shared.w2.copy_(p["s2"])
    return layer


def _check_against_dense(config: str, world: int, rank: int) -> None:
    want = dense_reference(config, world)
    layer = _ep_layer(config, world, rank)
    xs, gs = _inputs(world)
    x = xs[rank].clone().requires_grad_()
    out = layer(x)
    out.backward(gs[rank])
    local = layer.experts.num_experts
    assert torch.equal(out, want["out"][rank]), "outputs differ"
    assert torch.equal(x.grad, want["x_grad"][rank]), "input gradients differ"
    assert torch.equal(layer.router.weight.grad, want["router_grad"][rank]), "router grads differ"
    assert torch.equal(layer.shared.w13.grad, want["shared_grad"][rank][0])
    assert torch.equal(layer.shared.w2.grad, want["shared_grad"][rank][1])
    sl = slice(rank * local, (rank + 1) * local)
    assert torch.equal(layer.experts.w13.grad, want["w13_grad"][sl]), "expert w13 grads differ"
    assert torch.equal(layer.experts.w2.grad, want["w2_grad"][sl]), "expert w2 grads differ"


def case_dense_sigmoid_grouped(rank: int, world: int) -> None:
    _check_against_dense("sigmoid_grouped", world, rank)


def case_dense_softmax(rank: int, world: int) -> None:
    _check_against_dense("softmax", world, rank)


def case_pieces_match_forward(rank: int, world: int) -> None:
    """Async pieces (start / wait) give the synchronous forward's output, and the transposed
    transfers give the gradients autograd's backward of dispatch / combine gives."""
    layer = _ep_layer("sigmoid_grouped", world, rank)
    xs, gs = _inputs(world)
    x = xs[rank]
    ids, w = layer.route(x)
    permuted, layout = layer.permute(x, ids)
    pending = layer.dispatch_start(permuted.tokens, layout)
    shared = layer.shared_expert(x)  # computation while the dispatch is in flight
    received = pending.wait()
    y = layer.run_experts(received, layout)
    combined = layer.combine_start(y, layout).wait()
    out = unpermute(combined, permuted.pos, w) + shared
    assert torch.equal(out, layer(x))
    # transposed transfers equal the autograd backward of the synchronous ones
    from deeppar.moe import combine, dispatch

    tokens = permuted.tokens.detach().requires_grad_()
    recv = dispatch(tokens, layout)
    grad_recv = torch.randn_like(recv)
    recv.backward(grad_recv)
    assert torch.equal(dispatch_backward_start(grad_recv, layout).wait(), tokens.grad)
    y_leaf = y.detach().requires_grad_()
    comb = combine(y_leaf, layout)
    grad_comb = torch.randn_like(comb)
    comb.backward(grad_comb)
    assert torch.equal(combine_backward_start(grad_comb, layout).wait(), y_leaf.grad)
    assert torch.equal(combine_start(y, layout).wait(), combined)
    assert torch.equal(dispatch_start(permuted.tokens, layout).wait(), received)


def _expect_same_error(fn, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    # every rank must have raised: a barrier right after proves none hangs in a collective
    dist.barrier()
    assert "EP rank" in str(info.value) or "disagree" in str(info.value)


def case_bad_input_fails_on_every_rank(rank: int, world: int) -> None:
    ids = torch.zeros(3, 2, dtype=torch.int64)
    bad = ids.clone()
    if rank == world - 1:
        bad[1, 1] = 8  # out of range only on the last rank
    _expect_same_error(lambda: agree_on_routing(bad, 8, H, torch.float32), r"outside \[0, 8\)")
    big_k = torch.zeros(3, 9 if rank == 0 else 2, dtype=torch.int64)
    _expect_same_error(lambda: agree_on_routing(big_k, 8, H, torch.float32),
                       r"top_k=9 exceeds num_experts=8 \(on EP rank\(s\) \[0\]\)")
    _expect_same_error(lambda: agree_on_routing(ids, 6 if world == 4 else 7, H, torch.float32),
                       "does not divide num_experts")
    experts = 8 if rank == 0 else 16  # ranks disagree on the routing problem
    _expect_same_error(lambda: agree_on_routing(ids, experts, H, torch.float32),
                       "disagree on num_experts")
    _expect_same_error(lambda: agree_on_routing(ids, 8, H + rank, torch.float32),
                       "disagree on hidden size")
    dtype = torch.bfloat16 if rank == 1 else torch.float32
    _expect_same_error(lambda: agree_on_routing(ids, 8, H, dtype), "disagree on dtype")
    # the layer itself: a bad id on one rank fails forward on all
    layer = _ep_layer("softmax", world, rank)
    x = torch.randn(4, H)
    ids = torch.zeros(4, 2, dtype=torch.int64)
    if rank == 0:
        ids[0, 0] = -1
    _expect_same_error(lambda: layer.permute(x, ids), r"outside \[0, 8\)")
    # counts of the wrong shape (or negative) on one rank, given to exchange_counts directly
    counts = torch.ones(8, dtype=torch.int64)
    if rank == world - 1:
        counts = counts[:4] if world == 2 else -counts
    _expect_same_error(lambda: exchange_counts(counts, 8),
                       rf"not so on EP rank\(s\) \[{world - 1}\]")


_DIST_CASES = ["test_moe_layer:case_dense_sigmoid_grouped", "test_moe_layer:case_dense_softmax",
               "test_moe_layer:case_pieces_match_forward",
               "test_moe_layer:case_bad_input_fails_on_every_rank"]


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_moe_layer_over_gloo(world):
    results = run_cases(world, _DIST_CASES, timeout=240)
    assert not failures(results), failures(results)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_moe_layer_single_process_matches_dense(config):
    _check_against_dense(config, 1, 0)


def test_moe_layer_rejects_bad_sizes():
    with pytest.raises(ValueError, match="top_k=9 exceeds num_experts=8"):
        MoELayer(H, INTER, 8, 9)
    with pytest.raises(ValueError, match="n_group"):
        MoELayer(H, INTER, 8, 2, n_group=3)
    layer = MoELayer(H, INTER, 8, 2)
    with pytest.raises(ValueError, match="outside"):
        layer.permute(torch.randn(2, H), torch.tensor([[0, 8], [1, 2]]))
