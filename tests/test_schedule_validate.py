"""The validator catches broken schedules."""

from __future__ import annotations

import dataclasses

import pytest

from deeppar.pipeline import Kind, build
from deeppar.pipeline.validate import (
    ScheduleError,
    channel_order_mismatches,
    check,
    deadlock,
    validate,
)


def _with_steps(s, steps):
    return dataclasses.replace(s, steps=tuple(tuple(p) for p in steps))


def test_valid_passes():
    s = build("dualpipe", 4, 8)
    assert validate(s) is s


def test_missing_action():
    s = build("1f1b", 3, 4)
    steps = [list(p) for p in s.steps]
    steps[1].pop()  # drop the last backward on rank 1
    problems = check(_with_steps(s, steps))
    assert any("0 B, 0 I, 0 W" in p for p in problems)
    assert any("1 sends, 0 receives" in p for p in problems)


def test_duplicate_and_wrong_rank():
    s = build("1f1b", 2, 2)
    steps = [list(p) for p in s.steps]
    steps[0].append(steps[1][0])  # F0@s1 on rank 0
    problems = check(_with_steps(s, steps))
    assert any("stage 1 is on rank 1" in p for p in problems)
    assert any("2 forwards on stage 1" in p for p in problems)


def test_local_order():
    s = build("1f1b", 1, 2)  # F0 B0 F1 B1
    steps = [[s.steps[0][1], s.steps[0][0], *s.steps[0][2:]]]
    assert any("before its forward" in p for p in check(_with_steps(s, steps)))
    z = build("zb1p", 1, 1)  # F0 I0 W0
    steps = [[z.steps[0][0], z.steps[0][2], z.steps[0][1]]]
    assert any("before its I" in p for p in check(_with_steps(z, steps)))


def test_deadlock_detected():
    s = build("1f1b", 2, 2)
    # rank 0: F0 B0 F1 B1 waits for B0's gradient, which rank 1 (F0 F1 B0 B1) sends only
    # after its F1, which needs rank 0's F1: a cycle.
    f0, b0 = ([a for a in s.steps[r] if a.kind is Kind.F] for r in (0, 1))
    g0, g1 = ([a for a in s.steps[r] if a.kind is Kind.B] for r in (0, 1))
    bad = _with_steps(s, [[f0[0], g0[0], f0[1], g0[1]], [b0[0], b0[1], g1[0], g1[1]]])
    stuck = deadlock(bad)
    assert stuck and stuck[0][0] == 0
    problems = check(bad)
    assert any("deadlock" in p for p in problems)
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(bad)


def test_overlap_of_dependent_work_deadlocks():
    from deeppar.pipeline import Overlap

    s = build("1f1b", 1, 1)
    f, b = s.steps[0]
    bad = _with_steps(s, [[Overlap(f, b)]])
    assert any("before its forward" in p or "same work" in p for p in check(bad))


@pytest.mark.parametrize("method,P,N", [("dualpipe", 4, 8), ("dualpipev", 3, 6),
                                        ("zbv", 4, 8), ("1f1b", 4, 8), ("zb1p", 4, 8)])
def test_channel_order_per_tensor(method, P, N):
    """Per (src, dst, tensor) the send order equals the receive order for every generator."""
    assert channel_order_mismatches(build(method, P, N), by_tensor=True) == []


def test_rendezvous_model():
    # 1F1B is safe even with blocking sends; the DualPipe compute order with naive placement
    # of blocking sends is not (the published code posts some receives early for that reason)
    assert deadlock(build("1f1b", 4, 8), mode="rendezvous") == []
    assert deadlock(build("dualpipe", 4, 8), mode="rendezvous") != []
    assert deadlock(build("dualpipe", 4, 8), mode="eager") == []
