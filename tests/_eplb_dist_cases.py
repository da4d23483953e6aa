"""Cases of the expert weight rearrangement tests, run on every rank of a spawned gloo group by
``_runtime_helpers.run_cases`` as ``"_eplb_dist_cases:<name>"``: ``case(rank, world)``."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

import deeppar.eplb as eplb
from deeppar._coordination import default_store
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
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, m.phy2log, m.source_slot, transfer_timeout=0 if rank == 0 else 9),
        "rank 0", "transfer_timeout must be a positive number")
    last = world - 1
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, m.phy2log, m.source_slot,
        heartbeat_timeout="5" if rank == last else 5.0),
        f"rank {last}", "heartbeat_timeout must be a positive number of seconds, got '5'")
    expect_same_error(ValueError, lambda: rearrange.rearrange_expert_weights(
        weights, current, m.phy2log, m.source_slot,
        heartbeat_timeout=0.2 if rank == 0 else 5.0),
        "rank 0", "heartbeat_timeout must be at least 1 s (two heartbeat periods), got 0.2")
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


def case_index_failure_changes_nothing(rank: int, world: int) -> None:
    """Building the commit's slot indices fails on the last rank (they are built before the
    decision): every rank raises the same error, nothing changed, and the next call works."""
    current, _ = problem(world)
    new, src = shifted(current, world)
    weights = rank_weights(current, rank, world)
    original = rearrange._slot_index
    if rank == world - 1:
        def fail(slots, device):
            raise RuntimeError("injected index failure")

        rearrange._slot_index = fail
    try:
        expect_same_error(RuntimeError, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), f"aborted, nothing changed (rank {world - 1})",
            "injected index failure")
    finally:
        rearrange._slot_index = original
    assert_holds(weights, current, rank, world)
    rearrange.rearrange_expert_weights(weights, current, new, src)
    assert_holds(weights, new, rank, world)


def case_store_keys_bounded(rank: int, world: int) -> None:
    """After a successful call only its heartbeat, done and decision keys remain; the next
    call deletes them, so keys do not accumulate over calls."""
    current, _ = problem(world)
    new, src = shifted(current, world)
    weights = rank_weights(current, rank, world)
    store = default_store()
    root = rearrange.key_prefix("eplb-rearrange", None, "")
    for plan in ((current, new, src), (new, current, torch.argsort(src, dim=1))):
        number = rearrange._calls.get(root, 0)
        rearrange.rearrange_expert_weights(weights, *plan)
        prefix = f"{root}{number}"
        dist.barrier()  # every rank has left the call
        for r in range(world):
            assert store.check([f"{prefix}/beat/{r}", f"{prefix}/done/{r}"])
            assert not store.check([f"{prefix}/valid/{r}"]) and \
                not store.check([f"{prefix}/allocated/{r}"])
        assert store.check([f"{prefix}/decision"])
        if number:
            earlier = f"{root}{number - 1}"
            assert not any(store.check([f"{earlier}/{k}/{r}"]) for k in ("beat", "done")
                           for r in range(world))
            assert not store.check([f"{earlier}/decision"])
    assert_holds(weights, current, rank, world)
    deadline = time.monotonic() + 10.0  # a heartbeat may be inside a store round trip
    while any(t.name.startswith("deeppar-eplb") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a deeppar-eplb thread outlived its call"
        time.sleep(0.05)


class _BusyWaiter:
    """A transfer waiter with transfers still in flight."""

    def idle(self) -> bool:
        return False

    def close(self) -> None:
        pass


def case_default_group_never_aborted(rank: int, world: int) -> None:
    """Giving up with device transfers in flight aborts an explicit group only: aborting the
    default group would abort every group of the process. With none in flight, nothing is
    aborted and nothing warns."""
    aborted = []
    original = getattr(dist.distributed_c10d, "_abort_process_group", None)
    dist.distributed_c10d._abort_process_group = aborted.append
    sub = dist.new_group(list(range(world)))
    try:
        for group in (None, dist.GroupMember.WORLD, sub):
            for in_flight in (False, True):
                call = rearrange._Call(group, rank, world, 1.0, 1.0, on_device=True)
                call.transferring = True
                call.waiter = _BusyWaiter() if in_flight else None
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    error = call._give_up("rank 0: RuntimeError: x")
                call.close()
                assert "nothing changed: rank 0: RuntimeError: x" in str(error)
                assert (group is sub or not in_flight) == (not caught), caught
    finally:
        dist.distributed_c10d._abort_process_group = original
    assert aborted == [sub], aborted
    dist.destroy_process_group(sub)


# ----------------------------------------------------------------------------- transfer failures

#: slack over what a failure needs by construction: a loaded 2-core machine running 3 ranks
SLACK_S = 5.0
#: a posted failure reaches every rank within a look or two (measured: tenths of a second)
FAIL_BOUND_S = 2 * rearrange.HEARTBEAT_S + SLACK_S
#: timeouts of the hang and death cases
TRANSFER_TIMEOUT_S = 1.0
HEARTBEAT_TIMEOUT_S = 2.0
#: process group (store) timeout of those cases: far above the bounds, so that a wait that ends
#: only at it is told apart from a failure seen fast
GROUP_TIMEOUT_S = 120.0


def deadline_bound(timeout: float) -> float:
    """Longest time to give up after ``timeout``: deadlines are checked every HEARTBEAT_S."""
    return timeout + 2 * rearrange.HEARTBEAT_S + SLACK_S


@contextlib.contextmanager
def group_timeout(seconds: float) -> Iterator[None]:
    store = default_store()
    before = store.timeout
    store.set_timeout(timedelta(seconds=seconds))
    try:
        yield
    finally:
        store.set_timeout(before)


@contextlib.contextmanager
def on_send(n: int, action) -> Iterator[None]:
    """The ``n``-th send prepared by this rank (1-based, in the order of the transfers: layer
    by layer, slots in order; 0: none) runs ``action`` first."""
    original = rearrange._send_tensor
    calls = 0

    def send(t: torch.Tensor, local_slot: int) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == n:
            action()
        return original(t, local_slot)

    rearrange._send_tensor = send
    try:
        yield
    finally:
        rearrange._send_tensor = original


def raise_injected() -> None:
    raise RuntimeError("injected send failure")


def timed(fn, times: list[float]):
    def run():
        t0 = time.monotonic()
        try:
            fn()
        finally:
            times.append(time.monotonic() - t0)
    return run


def shifted_problem(rank: int, world: int):
    """(weights, current, new, src, sends per layer): every slot moves to the next rank."""
    current, _ = problem(world, seed=2)
    new, src = shifted(current, world)
    per_rank = current.shape[1] // world
    return rank_weights(current, rank, world), current, new, src, per_rank * 3  # 3 tensors


def raise_during_transfer(rank: int, world: int, failing: int, last: bool) -> None:
    """``failing`` raises while preparing its first send of the second layer (the first layer
    has moved) or its very last send: every rank raises the same error naming it, fast, keeps
    its old weights, and the group still works."""
    weights, current, new, src, per_layer = shifted_problem(rank, world)
    n = LAYERS * per_layer if last else per_layer + 1
    times: list[float] = []
    with on_send(n if rank == failing else 0, raise_injected):
        expect_same_error(RuntimeError, timed(lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), times),
            f"nothing changed: rank {failing}: RuntimeError: injected send failure")
    assert times[0] < FAIL_BOUND_S, f"failed after {times[0]:.2f} s"
    assert_holds(weights, current, rank, world)
    rearrange.rearrange_expert_weights(weights, current, new, src)  # nothing left pending
    assert_holds(weights, new, rank, world)


def case_raise_mid_transfer(rank: int, world: int) -> None:
    raise_during_transfer(rank, world, world // 2, last=False)


def case_raise_at_last_send(rank: int, world: int) -> None:
    raise_during_transfer(rank, world, 0, last=True)


def case_two_ranks_raise(rank: int, world: int) -> None:
    """The first and the last rank raise, at different sends: every rank raises the same error
    (the first notice posted) and keeps its old weights."""
    weights, current, new, src, per_layer = shifted_problem(rank, world)
    at = {0: per_layer + 1, world - 1: 2}.get(rank, 0)
    with on_send(at, raise_injected):
        expect_same_error(RuntimeError, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), "RuntimeError: injected send failure")
    assert_holds(weights, current, rank, world)


def case_hung_rank_times_out(rank: int, world: int) -> None:
    """Rank 1 stalls before its last layer until both others have given up (so they do at
    ``transfer_timeout`` without it), naming it; it raises the same error once it resumes."""
    weights, current, new, src, per_layer = shifted_problem(rank, world)
    store = default_store()
    gave_up = [f"test/hung/gave-up/{r}" for r in range(world) if r != 1]

    def stall() -> None:
        store.wait(gave_up)  # the others' give-up comes first (store timeout: GROUP_TIMEOUT_S)

    def call() -> None:
        try:
            rearrange.rearrange_expert_weights(weights, current, new, src,
                                               transfer_timeout=TRANSFER_TIMEOUT_S)
        finally:
            if rank != 1:
                store.set(gave_up[0 if rank == 0 else 1], "1")

    times: list[float] = []
    with group_timeout(GROUP_TIMEOUT_S), on_send(per_layer + 1 if rank == 1 else 0, stall):
        expect_same_error(RuntimeError, timed(call, times), "nothing changed: rank 1: ",
                          f"transfer_timeout={TRANSFER_TIMEOUT_S:g} s")
    if rank != 1:
        assert times[0] < deadline_bound(TRANSFER_TIMEOUT_S), f"failed after {times[0]:.2f} s"
    assert_holds(weights, current, rank, world)


def case_posting_failure_abandons(rank: int, world: int) -> None:
    """Rank 1 fails to post its second layer's transfers (they cannot be finished): the others
    stop waiting at once. Leaves unmatched transfers behind: the last case of its group."""
    weights, current, new, src, _ = shifted_problem(rank, world)
    original = dist.batch_isend_irecv
    calls = 0

    def post(ops):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("injected posting failure")
        return original(ops)

    if rank == 1:
        dist.batch_isend_irecv = post
    times: list[float] = []
    try:
        expect_same_error(RuntimeError, timed(lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), times),
            "nothing changed: rank 1: RuntimeError: injected posting failure")
    finally:
        dist.batch_isend_irecv = original
    assert times[0] < FAIL_BOUND_S, f"failed after {times[0]:.2f} s"
    assert_holds(weights, current, rank, world)


def expect_survivors_fail(rank: int, world: int, victim: int, fn, *words: str,
                          bound: float = FAIL_BOUND_S) -> None:
    """``fn`` raises a RuntimeError within ``bound`` seconds on this survivor of
    ``victim``'s death, naming it and ``words``, the same on every survivor (compared through
    the store: a collective would need the victim)."""
    times: list[float] = []
    try:
        timed(fn, times)()
    except RuntimeError as exc:
        message = str(exc)
    else:
        raise AssertionError("no RuntimeError on a survivor")
    assert message.startswith(
        f"expert weight rearrangement failed, nothing changed: rank {victim}: "), message
    for w in words:
        assert w in message, f"{message!r} does not mention {w!r}"
    assert times[0] < bound, f"failed after {times[0]:.2f} s"
    store = default_store()
    store.set(f"test/survivor/{rank}", message)
    for other in range(world):
        if other != victim:
            store.wait([f"test/survivor/{other}"])
            assert store.get(f"test/survivor/{other}").decode() == message


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def case_killed_rank(rank: int, world: int) -> None:
    """Rank 1 is killed (SIGKILL) while preparing its second layer's sends: gloo tells each
    peer with a transfer pending with it, which names it; every survivor raises the same
    error within seconds and keeps its old weights."""
    weights, current, new, src, per_layer = shifted_problem(rank, world)
    with on_send(per_layer + 1 if rank == 1 else 0, kill_self):
        expect_survivors_fail(rank, world, 1, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src), "its transfer with rank", "process died")
    assert_holds(weights, current, rank, world)


def case_killed_while_allocating(rank: int, world: int) -> None:
    """Rank 1 is killed before any transfer (allocating its buffers), when no transfer of a
    peer can notice: its silent heartbeat does, long before the group's timeout."""
    weights, current, new, src, _ = shifted_problem(rank, world)
    if rank == 1:
        def allocate(like, count):
            kill_self()

        rearrange._allocate_buffers = allocate
    with group_timeout(GROUP_TIMEOUT_S):
        expect_survivors_fail(rank, world, 1, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src, heartbeat_timeout=HEARTBEAT_TIMEOUT_S),
            f"no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s", bound=deadline_bound(
                HEARTBEAT_TIMEOUT_S))
    assert_holds(weights, current, rank, world)


def case_killed_before_entering(rank: int, world: int) -> None:
    """Rank 1 dies before entering the call, so it never beats: the others take it for dead
    after ``heartbeat_timeout``, long before the group's timeout."""
    weights, current, new, src, _ = shifted_problem(rank, world)
    if rank == 1:
        kill_self()
    with group_timeout(GROUP_TIMEOUT_S):
        expect_survivors_fail(rank, world, 1, lambda: rearrange.rearrange_expert_weights(
            weights, current, new, src, heartbeat_timeout=HEARTBEAT_TIMEOUT_S),
            f"no heartbeat for {HEARTBEAT_TIMEOUT_S:g} s", "never entered the call",
            bound=deadline_bound(HEARTBEAT_TIMEOUT_S))
    assert_holds(weights, current, rank, world)



def case_late_rank_sees_the_failure(rank: int, world: int) -> None:
    """Rank 1 enters only after its peers gave up on it (no heartbeat within
    ``heartbeat_timeout``): it raises their error at its first verdict, before allocating
    anything, and every rank keeps its old weights."""
    weights, current, new, src, _ = shifted_problem(rank, world)
    store = default_store()
    allocations: list[int] = []
    allocate = rearrange._allocate_buffers

    def counted(like: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        allocations.append(count)
        return allocate(like, count)

    rearrange._allocate_buffers = counted
    try:
        if rank == 1:
            store.wait(["test/late/gave_up"], timedelta(seconds=60))
        try:
            rearrange.rearrange_expert_weights(weights, current, new, src, heartbeat_timeout=1.0)
        except RuntimeError as exc:
            message = str(exc)
        else:
            raise AssertionError("no RuntimeError")
        if rank == 0:
            store.set("test/late/gave_up", "1")
    finally:
        rearrange._allocate_buffers = allocate
    assert "rank 1" in message and "never entered the call" in message, message
    store.set(f"test/late/{rank}", message)
    for other in range(world):
        store.wait([f"test/late/{other}"])
        assert store.get(f"test/late/{other}").decode() == message
    if rank == 1:
        assert allocations == [], allocations
    assert_holds(weights, current, rank, world)
