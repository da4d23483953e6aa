"""Overlap figures on small synthetic traces, computed by hand in the comments."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _profiling_helpers import TraceBuilder, write_raw_fractional
from hypothesis import given, settings
from hypothesis import strategies as st

from deeppar.profiling import Classifier, analyze_files, load_trace
from deeppar.profiling import intervals as iv
from deeppar.profiling.analysis import analyze as analyze_traces

NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
GEMM = "void cutlass::device_kernel<Gemm>(Gemm::Params)"


def _basic(tmp_path, shuffle=False, gz=False):
    b = TraceBuilder()
    b.kernel(GEMM, 1000, 10, stream=7)  # [0, 10)   compute
    b.kernel(GEMM, 1020, 10, stream=7)  # [20, 30)  compute
    b.kernel("rotary_kernel", 1002, 2, stream=8)  # [2, 4) compute, nested inside the first
    b.kernel(NCCL, 1005, 20, stream=9)  # [5, 25)   communication
    b.kernel("fill_kernel", 1040, 0, stream=7)  # zero length at 40: counts for span only
    b.kernel("Memset (Device)", 1035, 1, stream=7, cat="gpu_memset")  # [35, 36)
    b.cpu_op("aten::mm", 990, 5)
    name = "t.json.gz" if gz else "t.json"
    return b.write(tmp_path / name, gz=gz, shuffle=shuffle)


@pytest.mark.parametrize("shuffle,gz", [(False, False), (True, False), (True, True)])
def test_device_figures_by_hand(tmp_path, shuffle, gz):
    rep = analyze_files(str(_basic(tmp_path, shuffle, gz)))
    (d,) = rep.ranks[0].devices
    assert d.span_us == 40  # 0 .. 40 (the zero-length kernel)
    assert d.busy_us == 31  # [0, 30) + [35, 36)
    assert d.idle_us == 9
    assert d.comm_busy_us == 20
    assert d.compute_busy_us == 20  # [0, 10) + [20, 30); the nested kernel counts once
    assert d.overlap_us == 10  # [5, 10) + [20, 25)
    assert d.overlap_ratio == 0.5
    assert d.exposed_comm_us == 10  # [10, 20)
    assert d.memory_busy_us == 1
    assert (d.kernels, d.comm_kernels, d.compute_kernels, d.memsets) == (5, 1, 4, 1)
    streams = {s.stream: s for s in d.streams}
    assert streams[7].busy_us == 21 and streams[7].count == 4 and streams[7].kernels == 3
    assert streams[8].busy_us == 2 and streams[9].busy_us == 20 and streams[9].comm_kernels == 1
    assert streams[7].share_of_span == pytest.approx(21 / 40)
    fam = {f.family: f for f in d.families}
    assert fam["cutlass::device_kernel<Gemm>"].count == 2
    assert fam["cutlass::device_kernel<Gemm>"].total_us == 20
    assert fam["ncclDevKernel_AllReduce_Sum_f32_RING_LL"].rule == "nccl"


def test_fractional_timestamps_keep_precision(tmp_path):
    # epoch-sized microsecond clock: float64 parsing would round .125 to a multiple of 0.25
    p = write_raw_fractional(tmp_path / "f.json", [
        ("a", "1700000000000000.125", "1.0"),      # [0, 1) relative to the first
        ("b", "1700000000000002.375", "0.25")])    # [2.25, 2.5)
    (d,) = analyze_files(str(p)).ranks[0].devices
    assert d.span_us == 2.5
    assert d.busy_us == 1.25


def _rank(b: TraceBuilder, x: float) -> None:
    b.kernel(NCCL, 100, 10, stream=9)  # comm [0, 10)
    b.kernel(GEMM, 100 + x, 10, stream=7)  # compute [x, x + 10): overlap 10 - x


def test_ranks_summary_and_worst(tmp_path):
    for r, x in enumerate((5, 0, 10)):
        b = TraceBuilder(rank=r, world_size=3)
        _rank(b, x)
        b.write(tmp_path / f"rank{r}.json")
    rep = analyze_files(str(tmp_path))  # a directory of traces
    assert [r.rank for r in rep.ranks] == [0, 1, 2]
    exposed = rep.summary["exposed_comm_us"]
    assert (exposed["min"], exposed["median"], exposed["max"]) == (0, 5, 10)
    assert exposed["max_rank"] == 2 and exposed["min_rank"] == 1
    ratio = rep.summary["overlap_ratio"]
    assert (ratio["min"], ratio["median"], ratio["max"]) == (0, 0.5, 1)
    assert rep.worst["rank"] == 2
    assert rep.summary["span_us"]["max"] == 20  # rank 2: [0, 20)


def test_ranks_without_distributed_info_are_numbered(tmp_path):
    paths = []
    for i in range(2):
        b = TraceBuilder()
        _rank(b, 0)
        paths.append(str(b.write(tmp_path / f"r{i}.json")))
    rep = analyze_files(paths)
    assert [r.rank for r in rep.ranks] == [0, 1]


def _phased(tmp_path):
    b = TraceBuilder()
    b.annotation("step", 0, 100)
    b.annotation("phaseA", 10, 20)  # [10, 30)
    b.annotation("phaseB", 40, 20)  # [40, 60), contains "inner": not innermost
    b.annotation("inner", 45, 5)  # [45, 50)
    b.launch(1, 15)  # in phaseA
    b.kernel(GEMM, 200, 10, corr=1)  # runs long after phaseA closed
    b.launch(2, 47)  # in inner
    b.kernel(NCCL, 205, 10, stream=9, corr=2)
    b.launch(3, 35)  # only "step" is open
    b.kernel(GEMM, 220, 5, corr=3)
    b.launch(4, 20, tid=2)  # another thread without ranges
    b.kernel(GEMM, 230, 10, corr=4)
    b.kernel(GEMM, 300, 1, corr=5)  # launch missing from the trace
    b.kernel(GEMM, 310, 1)  # no correlation id at all
    return b.write(tmp_path / "p.json", shuffle=True)


def test_phase_attribution_by_correlation(tmp_path):
    r = analyze_files(str(_phased(tmp_path))).ranks[0]
    assert [p.name for p in r.phases] == ["phaseA", "inner"]
    a, inner = r.phases
    assert a.kernels == 1 and a.compute_busy_us == 10 and a.gpu_start_us == 200
    assert inner.kernels == 1 and inner.comm_busy_us == 10
    # its comm [205, 215) is hidden by the device's compute [200, 210): 5 us hidden
    assert inner.hidden_comm_us == 5 and inner.exposed_comm_us == 5
    assert [(p.name, p.kernels) for p in r.outer_phases] == [("step", 1)]
    at = r.attribution
    assert (at.activities, at.attributed, at.no_launch, at.outside_ranges) == (6, 3, 2, 1)
    assert at.unattributed == 3


def test_phase_fallback_to_other_thread(tmp_path):
    r = analyze_files(str(_phased(tmp_path)), phase_fallback=True).ranks[0]
    a = r.phases[0]
    assert a.name == "phaseA" and a.kernels == 2  # the kernel launched from tid 2 at t=20
    assert r.attribution.via_other_thread == 1 and r.attribution.outside_ranges == 0


def test_partly_overlapping_ranges(tmp_path):
    # outer [0, 100) and inner [0, 100) are equal: the later one in the file is innermost.
    # a [10, 30) and b [20, 40) overlap without nesting: the one that started last is
    # innermost while it is open, and inner takes over at 40 (a already closed at 30).
    b = TraceBuilder()
    b.annotation("outer", 0, 100)
    b.annotation("inner", 0, 100)
    b.annotation("a", 10, 20)
    b.annotation("b", 20, 20)
    b.launch(1, 15)  # only a (and the enclosing two) open: a
    b.launch(2, 25)  # a and b open, b started last: b
    b.launch(3, 35)  # a closed at 30: b
    b.launch(4, 50)  # a and b closed: inner (not a, long closed)
    b.launch(5, 30)  # a ends at 30 (end excluded): b
    for corr in range(1, 6):
        b.kernel(GEMM, 200 + 10 * corr, 2, corr=corr)
    r = analyze_files(str(b.write(tmp_path / "o.json"))).ranks[0]
    got = {p.name: p.kernels for p in r.phases}
    assert got == {"a": 1, "b": 3}  # both leaves: neither contains the other
    assert [(p.name, p.kernels) for p in r.outer_phases] == [("inner", 1)]
    assert r.attribution.attributed == 5


def _two_processes(tmp_path, learn: bool):
    # two processes (pid 100 on GPU 0, pid 200 on GPU 1) merged into one file, both using
    # correlation id 1; with ``learn``, ids 2 and 3 are unique and show which process
    # drives which device
    b = TraceBuilder()
    b.annotation("p100", 0, 10, pid=100)
    b.annotation("p200", 0, 100, pid=200)
    b.launch(1, 1, pid=100)
    b.launch(1, 30, pid=200)
    b.kernel(GEMM, 50, 5, device=0, corr=1)
    b.kernel(GEMM, 60, 4, device=1, corr=1)
    if learn:
        b.launch(2, 2, pid=100)
        b.kernel(GEMM, 70, 3, device=0, corr=2)
        b.launch(3, 40, pid=200)
        b.kernel(GEMM, 80, 2, device=1, corr=3)
    return b.write(tmp_path / "two.json")


def test_correlation_ids_per_process_resolved_by_device(tmp_path):
    r = analyze_files(str(_two_processes(tmp_path, learn=True))).ranks[0]
    got = {p.name: (p.kernels, p.busy_us) for p in r.phases}
    assert got == {"p100": (2, 8), "p200": (2, 6)}  # 5 + 3 on GPU 0, 4 + 2 on GPU 1
    assert r.attribution.ambiguous == 0 and r.attribution.attributed == 4


def test_correlation_ids_shared_by_processes_are_ambiguous(tmp_path):
    rep = analyze_files(str(_two_processes(tmp_path, learn=False)))
    r = rep.ranks[0]
    assert [p.kernels for p in r.phases] == [0, 0]  # neither process is picked silently
    a = r.attribution
    assert (a.ambiguous, a.attributed, a.no_launch, a.unattributed) == (2, 0, 0, 2)
    assert any("2 GPU activities carry a correlation id that several processes" in n
               for n in rep.notes)


def test_unreadable_dur_is_a_note_not_an_error(tmp_path):
    b = TraceBuilder()
    b.kernel(GEMM, 1000, 10)  # [0, 10)
    b.kernel(GEMM, 1005, "x")  # skipped
    b.kernel(GEMM, "abc", 3)  # skipped
    b.kernel(GEMM, 1020, 5)  # [20, 25)
    rep = analyze_traces([load_trace(b.write(tmp_path / "d.json"))])
    (d,) = rep.ranks[0].devices
    assert (d.kernels, d.span_us, d.busy_us) == (2, 25, 15)
    assert rep.ranks[0].notes == ["2 events with unreadable ts/dur skipped"]
    assert "rank 0 (d.json): 2 events with unreadable ts/dur skipped" in rep.notes


def test_begin_end_annotations(tmp_path):
    b = TraceBuilder()
    b.begin_end("step", 0, 100)  # [0, 100) as B/E
    b.begin_end("fwd", 10, 40)  # [10, 40) as B/E, nested in step
    b.annotation("bwd", 50, 30)  # [50, 80) as an X event
    b.begin_end("k", 5, 6, cat="kernel")  # a GPU activity as B/E: skipped, counted
    b.events.append({"ph": "E", "cat": "user_annotation", "pid": 100, "tid": 1, "ts": 200})
    b.events.append({"ph": "B", "cat": "user_annotation", "name": "open", "pid": 100,
                     "tid": 2, "ts": 1})  # never closed
    b.launch(1, 20)  # in fwd
    b.launch(2, 60)  # in bwd
    b.launch(3, 90)  # only step is open
    b.kernel(GEMM, 300, 10, corr=1)
    b.kernel(NCCL, 305, 10, stream=9, corr=2)
    b.kernel(GEMM, 320, 4, corr=3)
    rep = analyze_traces([load_trace(b.write(tmp_path / "be.json", shuffle=True))])
    r = rep.ranks[0]
    assert [(p.name, p.kernels, p.cpu_start_us, p.cpu_dur_us) for p in r.phases] == [
        ("fwd", 1, 10, 30), ("bwd", 1, 50, 30)]
    assert [(p.name, p.kernels) for p in r.outer_phases] == [("step", 1)]
    assert r.attribution.annotation_ranges == 3 and r.attribution.attributed == 3
    assert r.notes == [
        "1 GPU activities or launch calls given as B/E pairs skipped (only complete 'X' "
        "events carry their device, stream and correlation)",
        "2 B/E events without a partner skipped (1 B never closed, 1 E with no open B)"]


def test_begin_end_without_category_on_the_end(tmp_path):
    b = TraceBuilder()
    b.begin_end("outer", 0, 100, end_cat=False)
    b.events.append({"ph": "B", "cat": "cpu_op", "name": "aten::mm", "pid": 100, "tid": 1,
                     "ts": 5})  # not kept: its named "E" must not close "inner"
    b.begin_end("inner", 10, 30, end_cat=False)  # [10, 30)
    b.events.append({"ph": "E", "name": "aten::mm", "pid": 100, "tid": 1, "ts": 40})
    b.launch(1, 20)
    b.launch(2, 50)
    b.kernel(GEMM, 200, 1, corr=1)
    b.kernel(GEMM, 210, 1, corr=2)
    r = analyze_files(str(b.write(tmp_path / "be.json"))).ranks[0]
    assert [(p.name, p.cpu_dur_us, p.kernels) for p in r.phases] == [("inner", 20, 1)]
    assert [(p.name, p.cpu_dur_us, p.kernels) for p in r.outer_phases] == [("outer", 100, 1)]


def test_empty_gpu_trace_reports_no_gpu(tmp_path):
    b = TraceBuilder()
    b.cpu_op("aten::add", 0, 3)
    rep = analyze_files(str(b.write(tmp_path / "cpu.json")))
    assert not rep.ranks[0].has_gpu and rep.summary == {} and rep.worst is None
    assert any("no GPU activity" in n for n in rep.notes)


def test_loader_columns(tmp_path):
    t = load_trace(_basic(tmp_path))
    assert t.gpu_start.size == 6 and t.devices == [0]
    assert sorted(t.gpu_stream.tolist()) == [7, 7, 7, 7, 8, 9]


def test_user_comm_pattern(tmp_path):
    p = str(_basic(tmp_path))
    rep = analyze(p, Classifier.with_patterns(comm=["rotary"]))
    (d,) = rep.ranks[0].devices
    assert d.comm_busy_us == 20 + 2 - 0  # [2, 4) lies outside [5, 25): union 22
    assert d.comm_kernels == 2


def analyze(path, classifier):
    from deeppar.profiling import analyze as _analyze
    from deeppar.profiling import load_traces

    return _analyze(load_traces(path), classifier)


# ------------------------------------------------------------------------- intervals


def _grid_len(ivals, lo=0, hi=60):
    covered = np.zeros(hi - lo, dtype=bool)
    for s, e in ivals:
        covered[s:e] = True
    return covered


intervals_st = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10)), max_size=12).map(
    lambda xs: [(s, s + d) for s, d in xs])


@settings(max_examples=60, deadline=None)
@given(intervals_st, intervals_st)
def test_interval_ops_match_brute_force(a, b):
    ua = iv.union(np.array([s for s, _ in a], float), np.array([e for _, e in a], float))
    ub = iv.union(np.array([s for s, _ in b], float), np.array([e for _, e in b], float))
    ga, gb = _grid_len(a), _grid_len(b)
    assert iv.length(*ua) == ga.sum()
    assert iv.intersection_length(ua, ub) == (ga & gb).sum()
    assert iv.length(*iv.subtract(ua, ub)) == (ga & ~gb).sum()
    assert np.all(ua[0][1:] > ua[1][:-1])  # disjoint, sorted, not touching


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 8)), min_size=1, max_size=12),
       st.lists(st.integers(-1, 30), min_size=1, max_size=20))
def test_innermost_range_matches_brute_force(ranges, times):
    from deeppar.profiling.analysis import _lookup, _mark_containers, _thread_segments

    starts = np.array([float(s) for s, _ in ranges])
    ends = np.array([float(s + d) for s, d in ranges])
    idx = np.arange(len(ranges))
    t = np.array(times, dtype=np.float64)
    got = _lookup(_thread_segments(starts, ends, idx), t)
    for ti, g in zip(times, got.tolist()):
        open_ = [i for i in idx.tolist() if starts[i] <= ti < ends[i]]
        want = max(open_, key=lambda i: (starts[i], -ends[i], i)) if open_ else -1
        assert g == want
    leaf = np.ones(len(ranges), dtype=bool)
    _mark_containers(starts, ends, idx, leaf)
    for r in idx.tolist():
        inside = [c for c in idx.tolist() if c != r and starts[r] <= starts[c] < ends[r]
                  and ends[c] <= ends[r]
                  and (starts[c], -ends[c], c) > (starts[r], -ends[r], r)]
        assert leaf[r] == (not inside)


def test_phase_summary_adds_up_ranges_by_name(tmp_path):
    from deeppar.profiling import PhaseSummary, summarize_phases

    b = TraceBuilder()
    b.annotation("a", 0, 10)
    b.annotation("b", 20, 10)
    b.annotation("a", 40, 5)
    for corr, (t, kernel, start, dur, stream) in enumerate(
            [(1, GEMM, 100, 10, 7), (21, NCCL, 105, 20, 9), (41, GEMM, 130, 4, 7),
             (42, NCCL, 132, 6, 9)], start=1):
        b.launch(corr, t)
        b.kernel(kernel, start, dur, stream=stream, corr=corr)
    r = analyze_files(str(b.write(tmp_path / "s.json"))).ranks[0]
    # a: GEMM [0, 10) and, in the second range, GEMM [30, 34) + NCCL [32, 38) (own overlap
    # 2, hidden by the device's compute [30, 34): 2, exposed 4); b: NCCL [5, 25), hidden by
    # GEMM [5, 10): 5, exposed 15
    assert r.phase_summary == [
        PhaseSummary("a", count=2, kernels=3, cpu_total_us=15, busy_us=10 + 8,
                     comm_busy_us=6, compute_busy_us=14, hidden_comm_us=2, exposed_comm_us=4),
        PhaseSummary("b", count=1, kernels=1, cpu_total_us=10, busy_us=20, comm_busy_us=20,
                     compute_busy_us=0, hidden_comm_us=5, exposed_comm_us=15)]
    assert summarize_phases(r.phases) == r.phase_summary
    assert summarize_phases([]) == []


def test_html_window_and_hover_through_the_library(tmp_path):
    from deeppar.profiling import write_html
    from deeppar.profiling.loader import load_traces

    traces = load_traces(str(_basic(tmp_path)))
    rep = analyze_traces(traces)
    page_path = tmp_path / "t.html"
    write_html(str(page_path), traces, rep, window=(4, 22))
    page = page_path.read_text()
    # kernels drawn: [0,10) -> [4,10), [20,30) -> [20,22), [2,4) touches 4, NCCL [5,25) -> [5,22)
    titles = re.findall(r"<title>([^<]*)</title>", page)
    assert any(t.startswith("ncclDevKernel_AllReduce") and "5.000 - 22.000 us (17.000 us)" in t
               for t in titles)
    assert not any("35.000" in t for t in titles)  # the memset at [35, 36) lies outside
    with pytest.raises(ValueError, match="must lie after the start"):
        write_html(str(page_path), traces, rep, window=(50, None))
