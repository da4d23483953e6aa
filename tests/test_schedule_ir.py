"""The schedule IR: printing, parsing, JSON, placement, communication helpers, losses."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from deeppar.pipeline import Action, Kind, Overlap, Schedule, build
from deeppar.pipeline.ir import Transfer

METHODS = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")
SHAPES = {"1f1b": (4, 8), "zb1p": (4, 8), "zbv": (3, 7), "dualpipe": (4, 8),
          "dualpipev": (3, 7)}


def test_action_str_order_and_frozen():
    a = Action(Kind.F, 1, 3)
    assert str(a) == "F3@s1"
    assert repr(a) == "Action(F3@s1)"
    assert Action("I", 6, 1) == Action(Kind.I, 6, 1)
    assert Action(Kind.F, 0, 0) < Action(Kind.W, 0, 0)
    assert sorted([Action(Kind.F, 2, 0), Action(Kind.F, 1, 5)])[0].stage == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.stage = 2  # type: ignore[misc]
    assert Action(Kind.I, 0, 0).defers_w and not Action(Kind.B, 0, 0).defers_w
    o = Overlap(Action(Kind.F, 0, 3), Action(Kind.B, 3, 1))
    assert str(o) == "(F3@s0;B1@s3)" and o.kind == "FB" and len(o.actions) == 2
    with pytest.raises(ValueError, match="pairs an F"):
        Overlap(Action(Kind.B, 0, 3), Action(Kind.F, 3, 1))


@pytest.mark.parametrize("method", METHODS)
def test_json_and_text_round_trip(method):
    s = build(method, *SHAPES[method])
    t = Schedule.from_json(s.to_json())
    assert t == s
    assert t.steps == s.steps and t.stages == s.stages
    json.loads(s.to_json(indent=1))  # valid JSON
    for prog in s.steps:
        for step in prog:
            assert s.parse_step(str(step)) == step
    assert len(s.format().splitlines()) == s.num_ranks
    with pytest.raises(ValueError, match="not an action"):
        s.parse_step("X1@s0")
    with pytest.raises(ValueError, match="micro-batch 99 is out of range"):
        s.parse_step("F99@s0")
    with pytest.raises(ValueError, match="stage s99 is out of range"):
        s.parse_step("F0@s99")
    with pytest.raises(ValueError, match="out of range"):
        s.parse_step(f"(F0@s0;B{s.num_chunks}@s0)")


def test_from_json_rejects_bad_schedules():
    good = build("dualpipev", 2, 4).to_dict()
    with pytest.raises(ValueError, match="field 'num_ranks' is missing"):
        Schedule.from_json(json.dumps({"method": "x"}))
    with pytest.raises(ValueError, match="JSON object"):
        Schedule.from_json("[1, 2]")
    with pytest.raises(ValueError):
        Schedule.from_json("{not json")

    def broken(**changes):
        d = json.loads(json.dumps(good))
        d.update(changes)
        return json.dumps(d)

    with pytest.raises(ValueError, match="field 'num_chunks' is malformed"):
        Schedule.from_json(broken(num_chunks="eight"))
    with pytest.raises(ValueError, match="field 'stages' is malformed"):
        Schedule.from_json(broken(stages=[{"stage": 0}]))
    with pytest.raises(ValueError, match="field 'steps' is malformed"):
        Schedule.from_json(broken(steps=[[{"kind": "F"}]]))
    with pytest.raises(ValueError, match="'steps' has 1 programs"):
        Schedule.from_json(broken(steps=good["steps"][:1]))
    with pytest.raises(ValueError, match="'entry' has 3 entries"):
        Schedule.from_json(broken(entry=[0, 0, 0]))
    bad_steps = json.loads(json.dumps(good["steps"]))
    bad_steps[0][0]["microbatch"] = 99
    with pytest.raises(ValueError, match=r"'steps'\[0\] has F99@s0, out of range"):
        Schedule.from_json(broken(steps=bad_steps))


def test_dualpipe_placement():
    P = 6
    s = build("dualpipe", P, 12)
    for r in range(P):
        a, b = s.stages_of(r)
        # modules=(S_r, S_(P-1-r)) as in the spec
        assert (s.stage(a).model_stage, s.stage(b).model_stage) == (r, P - 1 - r)
        assert (s.stage(a).slot, s.stage(b).slot) == (0, 1)
        assert (s.stage(a).direction, s.stage(b).direction) == (0, 1)
        # phase 0 is the direction in which the rank holds the earlier stage
        earlier = a if s.stage(a).model_stage < s.stage(b).model_stage else b
        assert s.stage(earlier).phase == 0
    # micro-batches 0..N/2-1 enter at rank 0, the others at rank P-1
    assert [s.input_rank(m) for m in range(12)] == [0] * 6 + [P - 1] * 6
    assert [s.loss_rank(m) for m in range(12)] == [P - 1] * 6 + [0] * 6
    assert s.losses(P - 1) == tuple(range(6))
    assert s.losses(0) == tuple(range(6, 12))
    assert all(not s.losses(r) for r in range(1, P - 1))
    assert s.path(0) == tuple(range(P)) and s.path(6) == tuple(range(P, 2 * P))


def test_v_placement_matches_torch_numbering():
    P = 4
    for m in ("zbv", "dualpipev"):
        s = build(m, P, 8)
        assert s.placement == tuple((r, 2 * P - 1 - r) for r in range(P))
        assert s.path(3) == tuple(range(2 * P))
        assert s.losses(0) == tuple(range(8))
        assert [s.stage(st).direction for st in range(2 * P)] == [0] * P + [1] * P


def test_transfers_dualpipev():
    P = 3
    s = build("dualpipev", P, 6)
    last = P - 1
    # the first forward on rank 0 reads local data: nothing to receive; sends to rank 1
    f0 = s.steps[0][0]
    assert str(f0) == "F0@s0"
    assert s.recvs_before(0, f0) == ()
    assert s.sends_after(0, f0) == (Transfer("send", "activation", 1, 0, 1, 0, False),)
    # the turn on the last rank is local
    turn = next(st for st in s.steps[last] if isinstance(st, Action)
                and st.kind is Kind.F and st.stage == P)
    (rcv,) = s.recvs_before(last, turn)
    assert rcv.local and rcv.peer == last and rcv.tensor == "activation"
    assert rcv.peer_stage == P - 1 and rcv.key == ("activation", P - 1, P, turn.microbatch)
    # the loss stage's backward needs no gradient from anyone
    b = next(st for st in s.steps[0] for a in st.actions
             if a.stage == 2 * P - 1 and a.is_backward)
    back = [a for a in b.actions if a.is_backward][0]
    assert all(t.stage != back.stage for t in s.recvs_before(0, b))
    # an overlapped pair sends the outputs of both parts
    o = next(st for st in s.steps[1] if isinstance(st, Overlap))
    kinds = sorted(t.tensor for t in s.sends_after(1, o))
    assert kinds == ["activation", "gradient"]
    # W never communicates
    w = next(st for st in s.steps[0] if isinstance(st, Action) and st.kind is Kind.W)
    assert s.recvs_before(0, w) == () and s.sends_after(0, w) == ()


def test_transfer_keys_match_between_sides():
    s = build("dualpipe", 4, 8)
    sends = {t.key: (r, t) for r, p in enumerate(s.steps) for st in p
             for t in s.sends_after(r, st)}
    recvs = {t.key: (r, t) for r, p in enumerate(s.steps) for st in p
             for t in s.recvs_before(r, st)}
    assert sends.keys() == recvs.keys()
    for k, (r, t) in sends.items():
        r2, t2 = recvs[k]
        assert t.peer == r2 and t2.peer == r and not t.local
        assert str(t).startswith("send") and str(t2).startswith("recv")


def test_import_is_light():
    code = ("import sys, deeppar.pipeline as p; p.build('dualpipe', 4, 8); "
            "p.simulate(p.build('zbv', 2, 4)); "
            "assert 'matplotlib' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
