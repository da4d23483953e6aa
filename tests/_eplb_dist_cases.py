"""Cases of the expert weight rearrangement tests, run on every rank of a spawned gloo group by
``_runtime_helpers.run_cases(..., module="_eplb_dist_cases")``: ``case(rank, world)``."""

from __future__ import annotations

import torch
import torch.distributed as dist

import deeppar.eplb as eplb
from deeppar.eplb import rearrange
from deeppar.eplb.migration import migrate

LAYERS = 2


def expert_weights(layer: int, expert: int) -> list[torch.Tensor]:
    """Distinct, recognisable weights of one expert: float32, bfloat16 and int64 tensors."""
    base = layer * 1000 + expert * 10
    return [
        torch.arange(6, dtype=torch.float32).view(2, 3) + base + 0.25,
        (torch.arange(4, dtype=torch.float32) / 3 + base).to(torch.bfloat16),
        torch.full((3,), base, dtype=torch.int64),
    ]


def rank_weights(phy2log: torch.Tensor, rank: int, world: int) -> list[list[torch.Tensor]]:
    """This rank's slots of ``phy2log``: per layer, tensors [slots per rank, ...]."""
    per_rank = phy2log.shape[1] // world
    out = []
    for layer in range(phy2log.shape[0]):
        slots = phy2log[layer, rank * per_rank:(rank + 1) * per_rank].tolist()
        per_expert = [expert_weights(layer, e) for e in slots]
        out.append([torch.stack(ts) for ts in zip(*per_expert)])
    return out


def assert_holds(weights, phy2log: torch.Tensor, rank: int, world: int) -> None:
    want = rank_weights(phy2log, rank, world)
    for layer, (got_l, want_l) in enumerate(zip(weights, want)):
        tensors = [got_l[k] for k in sorted(got_l)] if isinstance(got_l, dict) else got_l
        for got, exp in zip(tensors, want_l):
            assert got.dtype == exp.dtype and torch.equal(got, exp), f"layer {layer} differs"


def problem(world: int, seed: int = 0):
    """(current, migration) for a small drifted problem on ``world`` GPUs."""
    experts, replicas = 3 * world, 4 * world
    g = torch.Generator().manual_seed(seed)
    w0 = torch.rand(LAYERS, experts, generator=g) ** 3 * 100 + 1
    current, _, _ = eplb.rebalance_experts(w0, replicas, 1, 1, world)
    w1 = w0 * torch.exp(torch.randn(LAYERS, experts, generator=g))
    return current, migrate(w1, current, replicas, 1, 1, world)


def shifted(current: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's slots move to the next rank (all remote), and slot order reversed inside
    each rank (local copies would be none: the source is always remote)."""
    replicas = current.shape[1]
    per_rank = replicas // world
    src = (torch.arange(replicas) - per_rank) % replicas
    src = src.expand(current.shape[0], replicas).contiguous()
    return current.gather(1, src), src


def expect_same_error(kind: type[Exception], fn, *words: str) -> None:
    """``fn`` raises ``kind`` mentioning ``words``, with the same message on every rank."""
    try:
        fn()
    except kind as exc:
        message = str(exc)
    else:
        raise AssertionError(f"no {kind.__name__} raised")
    for w in words:
        assert w in message, f"{message!r} does not mention {w!r}"
    messages = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages


def case_migration_plan(rank: int, world: int) -> None:
    current, m = problem(world)
    weights = rank_weights(current, rank, world)
    stats = rearrange.rearrange_expert_weights(weights, current, m.phy2log, m.source_slot)
    assert_holds(weights, m.phy2log, rank, world)
    totals = torch.tensor([stats.sent, stats.received])
    dist.all_reduce(totals)
    assert totals[0] == totals[1] == int(m.moved.sum())
    slot_bytes = sum(t[0].numel() * t.element_size() for t in weights[0])
    assert stats.extra_bytes == slot_bytes * (stats.received + stats.local_copies)


def case_every_slot_remote_and_dict_weights(rank: int, world: int) -> None:
    current, _ = problem(world, seed=1)
    new, src = shifted(current, world)
    lists = rank_weights(current, rank, world)
    weights = [dict(zip(("a", "b", "c"), layer)) for layer in lists]
    stats = rearrange.rearrange_expert_weights(weights, current, new, src)
    assert_holds(weights, new, rank, world)
    per_rank = current.shape[1] // world
    assert stats.received == stats.sent == LAYERS * per_rank and stats.local_copies == 0
    # And back: local copies too (slots of one rank swapped among themselves).
    back_src = torch.empty_like(src).scatter_(1, src, torch.arange(src.shape[1]).expand_as(src))
    rearrange.rearrange_expert_weights(weights, new, current, back_src)
    assert_holds(weights, current, rank, world)
    local_src = torch.arange(current.shape[1]).view(world, per_rank).flip(1).reshape(-1)
    local_src = local_src.expand_as(src).contiguous()
    reversed_plan = current.gather(1, local_src)
    stats = rearrange.rearrange_expert_weights(weights, current, reversed_plan, local_src)
    assert stats.sent == stats.received == 0 and stats.local_copies > 0
    assert_holds(weights, reversed_plan, rank, world)


def case_bad_plan_on_one_rank(rank: int, world: int) -> None:
    current, m = problem(world)
    weights = rank_weights(current, rank, world)
    src = m.source_slot.clone()
    if rank == world - 1:
        src[0, 0] = current.shape[1]  # out of range on one rank only
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, m.phy2log, src), f"rank {world - 1}", "source_slot")
    assert_holds(weights, current, rank, world)


def case_ranks_disagree(rank: int, world: int) -> None:
    current, m = problem(world)
    weights = rank_weights(current, rank, world)
    new, src = (m.phy2log, m.source_slot) if rank else shifted(current, world)
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, new, src), "ranks disagree on the expert transfer plan")
    assert_holds(weights, current, rank, world)


def case_plan_missing_an_expert_and_wrong_shapes(rank: int, world: int) -> None:
    current, m = problem(world)
    weights = rank_weights(current, rank, world)
    new = m.phy2log.clone()
    new[1] = current[1, 0]  # layer 1 holds a single expert everywhere
    src = torch.zeros_like(new)
    src[0] = m.source_slot[0]
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, new, src), "new placement does not cover every expert")
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current[:, :-1], m.phy2log, m.source_slot), "placement has shape")
    short = [[t[:-1] for t in layer] for layer in weights] if rank == 0 else weights
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        short, current, m.phy2log, m.source_slot), "rank 0", "local slots")
    other = [[t.double() if t.is_floating_point() else t for t in layer] for layer in weights]
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        other if rank == 1 else weights, current, m.phy2log, m.source_slot), "layout")
    assert_holds(weights, current, rank, world)


def case_allocation_failure_changes_nothing(rank: int, world: int) -> None:
    current, _ = problem(world)
    new, src = shifted(current, world)
    weights = rank_weights(current, rank, world)
    original = rearrange._allocate_buffers
    if rank == 1:
        def fail(like, count):
            raise MemoryError("no room for receive buffers")

        rearrange._allocate_buffers = fail
    try:
        expect_same_error(RuntimeError, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), "aborted, nothing changed (rank 1)", "MemoryError")
    finally:
        rearrange._allocate_buffers = original
    assert_holds(weights, current, rank, world)
