"""The simulator: exact formulas where they hold, the DualPipe formula where it does not,
memory, latency, measured costs."""

from __future__ import annotations

import json

import pytest

from deeppar.pipeline import build
from deeppar.pipeline.ir import Overlap
from deeppar.pipeline.simulate import (
    Costs,
    MeasuredCosts,
    compare_published,
    schedule_bubble,
    simulate,
)


@pytest.mark.parametrize("P", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("N", [1, 3, 8, 20])
@pytest.mark.parametrize("F,B", [(1, 2), (1.5, 2.25), (2, 1)])
def test_1f1b_bubble_formula(P, N, F, B):
    res = simulate(build("1f1b", P, N), Costs(F=F, B=B, W=min(B, 1)))
    assert res.makespan == pytest.approx((N + P - 1) * (F + B))
    for r in range(P):
        assert res.bubble[r] == pytest.approx((P - 1) * (F + B))
        assert res.busy[r] == pytest.approx(N * (F + B))
        assert res.peak_activations[r] == min(P - r, N)


@pytest.mark.parametrize("P,N", [(2, 4), (4, 8), (4, 12), (8, 20)])
@pytest.mark.parametrize("F,B,W", [(1, 2, 1), (2, 4, 2), (1, 1.5, 0.5), (1, 3, 1)])
def test_zb1p_bubble_formula(P, N, F, B, W):
    c = Costs(F=F, B=B, W=W)
    res = simulate(build("zb1p", P, N), c)
    assert schedule_bubble(res) == pytest.approx((P - 1) * (F + B - 2 * W))
    assert max(res.peak_activations) <= P  # the memory of 1F1B's first rank


def test_published_holds_dualpipe():
    # B - W = F and W <= F: exact, with and without an overlap gain
    for costs in (Costs(1, 2, 1), Costs(1, 2, 1, FB=2.5), Costs(2, 4, 2, FB=5),
                  Costs(1, 1.5, 0.5)):
        for method, P, N in (("dualpipe", 8, 20), ("dualpipe", 4, 12), ("dualpipev", 4, 16)):
            d = compare_published(method, P, N, costs)
            assert d["holds"], d
            assert d["difference"] == pytest.approx(0)


def test_published_does_not_hold_dualpipe():
    # I = B - W = 2 != F = 1: the table says (PP/2-1)(F&B+B-3W) = 3*(4+3-3) = 12,
    # the schedule really idles 11 on every rank
    d = compare_published("dualpipe", 8, 20, Costs(F=1, B=3, W=1))
    assert not d["holds"]
    assert d["published"] == pytest.approx(12)
    assert d["simulated"] == pytest.approx(11)
    assert d["difference"] == pytest.approx(-1)
    # W > F: the formula is too optimistic
    d = compare_published("dualpipe", 8, 20, Costs(F=1, B=3, W=2))
    assert not d["holds"] and d["simulated"] > d["published"]
    with pytest.raises(ValueError, match="no published"):
        compare_published("zbv", 2, 4)


def test_dualpipe_memory_pp_plus_one():
    # the table's activations per device: PP + 1 (DualPipeV: PP stages on PP/2 ranks)
    assert max(simulate(build("dualpipe", 8, 20)).peak_activations) == 9
    assert max(simulate(build("dualpipev", 4, 20)).peak_activations) == 9
    assert simulate(build("1f1b", 8, 20)).peak_activations[0] == 8


def test_latency_only_between_ranks():
    c = Costs(F=1, B=2, W=1, comm=0.5)
    res = simulate(build("1f1b", 2, 1), c)
    assert res.makespan == pytest.approx(2 * 1 + 2 * 2 + 2 * 0.5)
    # DualPipeV on one rank: the turn is local, latency never applies
    s = build("dualpipev", 1, 3)
    assert simulate(s, c).makespan == simulate(s, Costs(1, 2, 1)).makespan


def test_overlap_outputs_ready_at_pair_end():
    s = build("dualpipev", 2, 4)
    res = simulate(s, Costs(F=1, B=2, W=1))
    ends = {}
    for t in res.timeline:
        for tr in s.sends_after(t.rank, t.step):
            ends[tr.key] = t.end
    for t in res.timeline:
        for tr in s.recvs_before(t.rank, t.step):
            assert t.start >= ends[tr.key] - 1e-12
    pair = next(t for t in res.timeline if isinstance(t.step, Overlap))
    assert pair.end - pair.start == pytest.approx(3)  # FB defaults to F + B


def test_fb_cost_and_i_cost():
    c = Costs(F=1, B=3, W=1, FB=3.5)
    s = build("dualpipev", 2, 4)
    res = simulate(s, c)
    for t in res.timeline:
        d = t.end - t.start
        if isinstance(t.step, Overlap):
            assert d == pytest.approx(3.5)
        else:
            assert d == pytest.approx({"F": 1, "B": 3, "I": 2, "W": 1}[t.step.kind.value])


def test_per_stage_costs():
    s = build("1f1b", 3, 6)
    slow = Costs(F=[1, 3, 1], B=[2, 6, 2], W=[1, 3, 1])
    res = simulate(s, slow)
    assert res.makespan > simulate(s, Costs()).makespan
    assert res.busy[1] == pytest.approx(6 * 9)


def test_measured_costs():
    s = build("dualpipev", 2, 4)
    base = Costs(F=1, B=2.5, W=1, FB=3)
    ref = simulate(s, base)
    by_str = {str(st): base.duration(s, r, i, st)
              for r, p in enumerate(s.steps) for i, st in enumerate(p)}
    assert simulate(s, MeasuredCosts(by_str)).makespan == ref.makespan
    assert simulate(s, by_str).makespan == ref.makespan  # a plain mapping works too
    by_index = {(r, i): base.duration(s, r, i, st)
                for r, p in enumerate(s.steps) for i, st in enumerate(p)}
    m = MeasuredCosts(by_index, comm=0.25)
    again = MeasuredCosts.from_json(m.to_json())
    assert simulate(s, again).makespan == simulate(s, m).makespan > ref.makespan
    # (rank, index) wins over the step string; missing steps use the fallback or fail
    m2 = MeasuredCosts({(0, 0): 10.0, str(s.steps[0][0]): 1.0})
    assert m2.duration(s, 0, 0, s.steps[0][0]) == 10.0
    with pytest.raises(KeyError, match="no measured duration"):
        simulate(s, MeasuredCosts({}))
    assert simulate(s, MeasuredCosts({}, fallback=base)).makespan == ref.makespan


def test_bad_costs():
    with pytest.raises(ValueError, match="cannot exceed B"):
        Costs(F=1, B=1, W=2)
    with pytest.raises(ValueError, match=">= 0"):
        Costs(F=-1)


@pytest.mark.parametrize("kwargs,msg", [
    ({"F": float("nan")}, "cost F must be a finite number >= 0"),
    ({"B": float("inf")}, "cost B must be a finite number >= 0"),
    ({"F": "a"}, "cost F must be"),
    ({"W": True}, "cost W must be"),
    ({"FB": -1.0}, "cost FB must be"),
    ({"F": []}, "cost F must be"),
    ({"F": [1, float("nan")]}, "cost F must be"),
    ({"comm": float("nan")}, "cost comm must be a finite number >= 0, got nan"),
    ({"comm": [1, 2]}, "cost comm must be a finite number >= 0, got"),
    ({"F": [1, 2], "B": [2, 2, 2]}, "same length"),
])
def test_costs_reject_bad_values(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        Costs(**kwargs)


def test_per_stage_costs_must_cover_every_stage():
    s = build("1f1b", 4, 8)
    with pytest.raises(ValueError, match=r"cost F must .* one per stage \(4 .*got 2 values"):
        simulate(s, Costs(F=[1, 2]))
    d = build("dualpipe", 4, 8)  # stage ids 0..7: both directions' copies
    with pytest.raises(ValueError, match=r"one per stage \(8"):
        simulate(d, Costs(B=[2.0] * 4))
    assert simulate(d, Costs(B=[2.0] * 8)).makespan == simulate(d, Costs()).makespan


def test_measured_costs_must_fit_the_schedule():
    s = build("dualpipev", 2, 4)
    base = Costs()
    with pytest.raises(ValueError, match="not in this dualpipev schedule.*F99@s0"):
        simulate(s, MeasuredCosts({"F99@s0": 1.0}, fallback=base))
    with pytest.raises(ValueError, match=r"\(5, 0\)"):
        simulate(s, MeasuredCosts({(5, 0): 1.0}, fallback=base))
    with pytest.raises(ValueError, match=r"\(0, 999\)"):
        simulate(s, MeasuredCosts({(0, 999): 1.0}, fallback=base))
    n0 = len(s.steps[0])
    short = MeasuredCosts.from_dict({"by_index": {"0": [1.0] * (n0 - 1)}}, fallback=base)
    with pytest.raises(ValueError, match=f"rank 0 has {n0 - 1} durations; its program has {n0}"):
        simulate(s, short)
    with pytest.raises(ValueError, match="rank 7"):
        simulate(s, MeasuredCosts.from_dict({"by_index": {"7": []}}, fallback=base))
    full = MeasuredCosts.from_dict({"by_index": {str(r): [1.0] * len(p)
                                                 for r, p in enumerate(s.steps)}})
    assert simulate(s, full).makespan > 0
    with pytest.raises(ValueError, match="finite number"):
        MeasuredCosts.from_dict({"durations": {"F0@s0": "slow"}})
    with pytest.raises(ValueError, match="finite number"):
        MeasuredCosts({"F0@s0": float("nan")})
    with pytest.raises(ValueError, match="unknown field"):
        MeasuredCosts.from_dict({"duration": {}})
    with pytest.raises(ValueError, match="JSON object"):
        MeasuredCosts.from_dict([1, 2])  # type: ignore[arg-type]


def test_measured_costs_read_the_runtime_timeline_file() -> None:
    """The Chrome trace the runtime's timeline export writes is a measured-costs file: the
    replay reproduces the timeline's step durations and makespan."""
    from deeppar.pipeline.export import to_chrome_trace
    from deeppar.pipeline.simulate import MeasuredCosts, TimedStep

    sched = build("dualpipev", 2, 5)
    first = simulate(sched, Costs(F=1.5, B=3.0, W=1.0))
    steps = [TimedStep(t.rank, t.index, t.step, t.start, t.end) for t in first.timeline]
    trace = json.loads(json.dumps(to_chrome_trace(sched, steps, time_unit_us=1.0)))
    costs = MeasuredCosts.from_dict(trace)
    assert costs.durations == {(t.rank, t.index): t.duration for t in steps}
    assert simulate(sched, costs).makespan == pytest.approx(first.makespan)
    with pytest.raises(ValueError, match="no step events"):
        MeasuredCosts.from_dict({"traceEvents": []})
    trace["traceEvents"].append({"ph": "X", "tid": 0, "dur": -1.0, "args": {"index": 0}})
    with pytest.raises(ValueError, match="duration"):
        MeasuredCosts.from_dict(trace)
