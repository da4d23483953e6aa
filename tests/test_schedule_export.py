"""Exports (PyTorch action strings, Chrome trace) and pictures."""

from __future__ import annotations

import json

import pytest

from deeppar.pipeline import build
from deeppar.pipeline.export import format_torch, to_chrome_trace, to_torch_actions
from deeppar.pipeline.simulate import Costs, simulate


def _torch_ops(name, P, N):
    sv = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    return [[str(a) for a in rank if a is not None]
            for rank in sv.get_schedule_ops(name, P, N, num_stages_per_rank=2)]


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 1, 2, 3, 8])
def test_dualpipev_export_matches_torch(P, extra):
    N = 2 * P + extra
    assert to_torch_actions(build("dualpipev", P, N)) == _torch_ops("DualPipeV", P, N)


def test_torch_text_format():
    text = format_torch(build("dualpipev", 2, 4))
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,")
    assert format_torch(build("1f1b", 2, 2)).splitlines() == ["0F0,0F1,0B0,0B1",
                                                              "1F0,1B0,1F1,1B1"]


def test_chrome_trace():
    s = build("dualpipe", 4, 8)
    res = simulate(s, Costs(F=1, B=2, W=1, comm=0.1))
    tr = to_chrome_trace(s, res)
    text = json.dumps(tr)
    assert json.loads(text)["metadata"]["makespan"] == res.makespan
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == sum(len(p) for p in s.steps)
    assert {e["tid"] for e in xs} == set(range(4))
    assert all(e["dur"] > 0 for e in xs)
    flows = [e for e in tr["traceEvents"] if e["ph"] in ("s", "f")]
    assert flows and len(flows) % 2 == 0
    names = [e["args"]["name"] for e in tr["traceEvents"] if e["name"] == "thread_name"]
    assert names == [f"rank {r}" for r in range(4)]


def test_png(tmp_path):
    pytest.importorskip("matplotlib")
    from deeppar.pipeline.draw import draw, draw_compare

    out = tmp_path / "dp.png"
    draw(build("dualpipe", 4, 8), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out2 = tmp_path / "cmp.png"
    items = [(s, simulate(s, Costs(F=1, B=2.5, W=1, FB=3)))
             for s in (build("1f1b", 2, 4), build("dualpipev", 2, 4))]
    draw_compare(items, out2)
    assert out2.stat().st_size > 1000
