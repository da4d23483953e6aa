"""Sanity checks on DeepSeek's published training trace (4 MoE layers, one F&B pair)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from deeppar.data import sample_trace
from deeppar.profiling import Classifier, analyze_files, load_trace
from deeppar.profiling.classify import COMM, COMPUTE

TRACE = sample_trace()
LAYER_ORDER = ["combine(B)", "attn(F)", "mlp(B)", "dispatch(F)", "dispatch(B)", "mlp(W)",
               "mlp(F)", "attn(B)", "attn(W)", "combine(F)"]


@pytest.fixture(scope="module")
def report():
    return analyze_files(str(TRACE))


@pytest.fixture(scope="module")
def events():
    with gzip.open(TRACE, "rt") as f:
        return json.load(f)["traceEvents"]


def _naive_union(ivals):
    total, end = 0, None
    for s, e in sorted(ivals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def test_figures_within_bounds_and_match_naive(report, events):
    r = report.ranks[0]
    assert r.rank == 0 and r.world_size == 64
    (d,) = r.devices
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    assert d.kernels == sum(e["cat"] == "kernel" for e in gpu)
    assert d.busy_us == _naive_union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    assert d.span_us == (max(e["ts"] + e["dur"] for e in gpu) - min(e["ts"] for e in gpu))
    assert 0 <= d.idle_us <= d.span_us and d.busy_us <= d.span_us
    assert 0 <= d.overlap_us <= min(d.comm_busy_us, d.compute_busy_us)
    assert 0 <= d.overlap_ratio <= 1
    assert d.exposed_comm_us == pytest.approx(d.comm_busy_us - d.overlap_us)
    assert d.comm_kernels > 0 and len(d.streams) == 3


def test_deepep_kernels_are_classified(events):
    c = Classifier()
    names = {e["name"] for e in events if e.get("cat") == "kernel"}
    transfer = [n for n in names if re.search(r"::ep::internode::\w*(dispatch|combine|notify)", n)]
    layout = [n for n in names if "get_dispatch_layout" in n]
    assert len(transfer) >= 4 and layout
    for n in transfer:
        assert c.classify(n)[0] == COMM, n
    for n in layout:
        assert c.classify(n) == (COMPUTE, "deepep-layout")
    casts = [n for n in names if "cast" in n]
    assert casts and all(c.classify(n)[0] == COMPUTE for n in casts)


def test_forty_innermost_phases_in_spec_order(report):
    r = report.ranks[0]
    assert [p.name for p in r.phases] == LAYER_ORDER * 4
    assert not r.outer_phases  # ProfilerStep#1 and 1F1B launch nothing directly
    assert all(p.leaf for p in r.phases)
    by_name = {}
    for p in r.phases:
        by_name.setdefault(p.name, []).append(p)
    for name in ("dispatch(F)", "combine(F)", "dispatch(B)", "combine(B)"):
        assert all(p.comm_busy_us > 0 for p in by_name[name]), name
    for name in ("attn(F)", "mlp(F)", "mlp(B)"):
        assert all(p.comm_busy_us == 0 and p.compute_busy_us > 0 for p in by_name[name])
    a = r.attribution
    assert a.attributed + a.unattributed == a.activities
    assert a.unattributed > 0  # backward kernels come from autograd's thread


def test_fallback_attributes_backward_thread(report):
    r = analyze_files(str(TRACE), phase_fallback=True).ranks[0]
    assert r.attribution.unattributed < report.ranks[0].attribution.unattributed
    assert all(p.kernels > 0 for p in r.phases if p.name == "attn(B)")


def test_loader_keeps_launches_and_annotations():
    t = load_trace(TRACE)
    assert t.ann_start.size == 42 and t.launch_corr.size > t.gpu_start.size
