"""Overlap of communication and computation per device, stream, kernel family and phase.

Definitions (see the profiling spec): busy time is the length of the union of intervals;
overlap is the time communication and computation kernels run at once on a device; overlap
ratio = overlap / communication busy; exposed communication = communication busy - overlap;
span runs from the first GPU activity to the end of the last; idle = span - busy.
Kernels belong to the innermost ``record_function`` range open on the thread that launched
them, found through the ``correlation`` id shared by the launch call and the kernel. Where
ranges overlap without nesting, the innermost range at a time is the one that started last
among those open then (start <= t < end).
"""

from __future__ import annotations

import heapq
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import intervals as iv
from .classify import CLASS_CODE, CLASSES, COMM, COMPUTE, MEMORY, Classifier, kernel_family
from .loader import KIND_KERNEL, KIND_MEMCPY, KIND_MEMSET, KIND_NAMES, RankTrace, load_traces

_C_COMPUTE, _C_COMM, _C_MEMORY = CLASS_CODE[COMPUTE], CLASS_CODE[COMM], CLASS_CODE[MEMORY]

DEVICE_METRICS = ("span_us", "busy_us", "idle_us", "comm_busy_us", "compute_busy_us",
                  "overlap_us", "overlap_ratio", "exposed_comm_us")


@dataclass
class StreamStats:
    """One CUDA stream of one device."""

    stream: int
    busy_us: float
    count: int  # all activities (kernels, memcpy, memset)
    kernels: int
    comm_kernels: int
    comm_busy_us: float
    compute_busy_us: float
    share_of_span: float


@dataclass
class FamilyStats:
    """Kernels (or copies) grouped by family name, with the rule that classified them."""

    family: str
    category: str
    rule: str
    kind: str
    count: int
    total_us: float


@dataclass
class DeviceStats:
    """The overlap figures of one GPU of one rank."""

    rank: int
    device: int
    start_us: float  # first activity, relative to the trace's base time
    span_us: float
    busy_us: float
    idle_us: float
    comm_busy_us: float
    compute_busy_us: float
    memory_busy_us: float
    overlap_us: float
    overlap_ratio: float  # overlap / comm busy, 0 when there is no communication
    exposed_comm_us: float
    kernels: int
    comm_kernels: int
    compute_kernels: int
    memcpys: int
    memsets: int
    streams: list[StreamStats] = field(default_factory=list)
    families: list[FamilyStats] = field(default_factory=list)


@dataclass
class PhaseStats:
    """The GPU work one annotation range launched (innermost range at launch time)."""

    name: str
    rank: int
    thread: str
    cpu_start_us: float
    cpu_dur_us: float
    leaf: bool
    kernels: int = 0
    gpu_start_us: float | None = None
    gpu_end_us: float | None = None
    busy_us: float = 0.0
    comm_busy_us: float = 0.0
    compute_busy_us: float = 0.0
    overlap_us: float = 0.0  # between this range's own comm and compute
    hidden_comm_us: float = 0.0  # this range's comm overlapped by any compute of the device
    exposed_comm_us: float = 0.0  # this range's comm not hidden by any compute


@dataclass
class PhaseSummary:
    """The ranges of one name (innermost ones) of one rank, added up: what a step's phases
    cost in total, e.g. all 'dispatch(F)' ranges of all layers."""

    name: str
    count: int  # ranges
    kernels: int
    cpu_total_us: float  # sum of the ranges' CPU durations
    busy_us: float  # sums over the ranges of their figures (see PhaseStats)
    comm_busy_us: float
    compute_busy_us: float
    hidden_comm_us: float
    exposed_comm_us: float


def summarize_phases(phases: list[PhaseStats]) -> list[PhaseSummary]:
    """Per range name, in order of first appearance: counts and summed figures."""
    out: dict[str, PhaseSummary] = {}
    for p in phases:
        s = out.get(p.name)
        if s is None:
            s = out[p.name] = PhaseSummary(p.name, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        s.count += 1
        s.kernels += p.kernels
        s.cpu_total_us += p.cpu_dur_us
        s.busy_us += p.busy_us
        s.comm_busy_us += p.comm_busy_us
        s.compute_busy_us += p.compute_busy_us
        s.hidden_comm_us += p.hidden_comm_us
        s.exposed_comm_us += p.exposed_comm_us
    return list(out.values())


@dataclass
class Attribution:
    """How many GPU activities could be tied to an annotation range, and why not."""

    activities: int = 0
    attributed: int = 0
    via_other_thread: int = 0  # only with fallback: range open on another thread of the process
    no_launch: int = 0  # no correlation id, or its launch call is not in the trace
    ambiguous: int = 0  # id launched by several processes, and the device does not tell which
    outside_ranges: int = 0  # launch found, but no range open on its thread at launch time
    annotation_ranges: int = 0

    @property
    def unattributed(self) -> int:
        return self.no_launch + self.ambiguous + self.outside_ranges


@dataclass
class RankReport:
    """Everything measured on one trace file."""

    rank: int
    path: str
    world_size: int | None
    events: int
    devices: list[DeviceStats]
    phases: list[PhaseStats]  # innermost ranges, in CPU order
    outer_phases: list[PhaseStats]  # enclosing ranges that launched work directly
    attribution: Attribution
    notes: list[str] = field(default_factory=list)  # what the loader skipped, and why
    phase_summary: list[PhaseSummary] = field(default_factory=list)  # phases by name

    @property
    def has_gpu(self) -> bool:
        return bool(self.devices)


@dataclass
class TraceReport:
    """The analysis of one or more ranks, with cross-rank statistics."""

    ranks: list[RankReport]
    summary: dict[str, dict[str, Any]]
    worst: dict[str, Any] | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the CLI's ``--json`` output)."""
        out = {"ranks": [], "summary": self.summary, "worst": self.worst, "notes": self.notes}
        for r in self.ranks:
            d = asdict(r)
            d["attribution"]["unattributed"] = r.attribution.unattributed
            d["has_gpu"] = r.has_gpu
            out["ranks"].append(d)
        out["devices"] = [
            {k: v for k, v in asdict(d).items() if k not in ("streams", "families")}
            for r in self.ranks for d in r.devices
        ]
        return out


# ---------------------------------------------------------------------------- classification

def classify_activities(trace: RankTrace, classifier: Classifier
                        ) -> tuple[np.ndarray, dict[tuple[int, int], tuple[str, str]]]:
    """Class code per GPU activity and (category, rule) per (name id, kind)."""
    n = trace.gpu_name.size
    if n == 0:
        return np.empty(0, dtype=np.int8), {}
    key = trace.gpu_name * 3 + trace.gpu_kind
    uniq, inverse = np.unique(key, return_inverse=True)
    table: dict[tuple[int, int], tuple[str, str]] = {}
    codes = np.empty(uniq.size, dtype=np.int8)
    for i, k in enumerate(uniq.tolist()):
        name_id, kind = divmod(k, 3)
        cat, rule = classifier.classify(trace.names[name_id], KIND_NAMES[kind])
        table[(name_id, kind)] = (cat, rule)
        codes[i] = CLASS_CODE[cat]
    return codes[inverse], table


# ------------------------------------------------------------------------------ per device

def _device_stats(trace: RankTrace, sel: np.ndarray, cls: np.ndarray, device: int,
                  table: dict[tuple[int, int], tuple[str, str]]) -> DeviceStats:
    s, e = trace.gpu_start[sel], trace.gpu_end[sel]
    c, kind = cls[sel], trace.gpu_kind[sel]
    streams, names = trace.gpu_stream[sel], trace.gpu_name[sel]
    span = float(e.max() - s.min())
    busy = iv.union_length(s, e)
    comm = iv.union(s[c == _C_COMM], e[c == _C_COMM])
    comp = iv.union(s[c == _C_COMPUTE], e[c == _C_COMPUTE])
    comm_busy, comp_busy = iv.length(*comm), iv.length(*comp)
    overlap = min(iv.intersection_length(comm, comp), comm_busy, comp_busy)
    mem_busy = iv.union_length(s[c == _C_MEMORY], e[c == _C_MEMORY])

    stream_stats = []
    for st in np.unique(streams).tolist():
        m = streams == st
        sb = iv.union_length(s[m], e[m])
        stream_stats.append(StreamStats(
            stream=int(st), busy_us=sb, count=int(m.sum()),
            kernels=int((m & (kind == KIND_KERNEL)).sum()),
            comm_kernels=int((m & (c == _C_COMM)).sum()),
            comm_busy_us=iv.union_length(s[m & (c == _C_COMM)], e[m & (c == _C_COMM)]),
            compute_busy_us=iv.union_length(s[m & (c == _C_COMPUTE)], e[m & (c == _C_COMPUTE)]),
            share_of_span=sb / span if span > 0 else 0.0))

    families: dict[tuple[str, str], FamilyStats] = {}
    key = names * 3 + kind
    uniq, inv = np.unique(key, return_inverse=True)
    counts = np.bincount(inv, minlength=uniq.size)
    totals = np.bincount(inv, weights=e - s, minlength=uniq.size)
    for k, cnt, tot in zip(uniq.tolist(), counts.tolist(), totals.tolist()):
        name_id, kd = divmod(k, 3)
        cat, rule = table[(name_id, kd)]
        fam = kernel_family(trace.names[name_id]) if kd == KIND_KERNEL else trace.names[name_id]
        f = families.get((fam, cat))
        if f is None:
            f = families[(fam, cat)] = FamilyStats(fam, cat, rule, KIND_NAMES[kd], 0, 0.0)
        f.count += cnt
        f.total_us += tot
    fam_list = sorted(families.values(), key=lambda f: (-f.total_us, f.family))

    return DeviceStats(
        rank=trace.rank, device=device, start_us=float(s.min()), span_us=span, busy_us=busy,
        idle_us=max(span - busy, 0.0), comm_busy_us=comm_busy, compute_busy_us=comp_busy,
        memory_busy_us=mem_busy, overlap_us=overlap,
        overlap_ratio=overlap / comm_busy if comm_busy > 0 else 0.0,
        exposed_comm_us=max(comm_busy - overlap, 0.0),
        kernels=int((kind == KIND_KERNEL).sum()), comm_kernels=int((c == _C_COMM).sum()),
        compute_kernels=int((c == _C_COMPUTE).sum()), memcpys=int((kind == KIND_MEMCPY).sum()),
        memsets=int((kind == KIND_MEMSET).sum()), streams=stream_stats, families=fam_list)


# ------------------------------------------------------------------------------ attribution

def _thread_segments(starts: np.ndarray, ends: np.ndarray, idx: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The ranges ``idx`` of one thread as points where the innermost open range changes:
    (points, range index or -1 from that point on).

    The innermost range at time t is the one with the latest start among those with
    start <= t < end; ties go to the earlier end, then to the later range in the file. For
    properly nested ranges this is the usual innermost one; for ranges that overlap without
    nesting it is the one that started last, and an enclosing range takes over again at the
    end of the later one only if it is still open. Sweep over the sorted boundaries with a
    heap of the open ranges (lazy deletion of closed ones): O(n log n).
    """
    idx = idx[ends[idx] > starts[idx]]  # a range of zero length is never open
    if idx.size == 0:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    s_all, e_all = starts[idx], ends[idx]
    by_start = idx[np.argsort(s_all, kind="stable")].tolist()
    times = np.unique(np.concatenate([s_all, e_all])).tolist()
    heap: list[tuple[float, float, int]] = []  # (-start, end, -index): innermost first
    pts: list[float] = []
    ids: list[int] = []
    k = 0
    n = len(by_start)
    for t in times:
        while k < n and starts[by_start[k]] <= t:
            a = by_start[k]
            heapq.heappush(heap, (-float(starts[a]), float(ends[a]), -a))
            k += 1
        while heap and heap[0][1] <= t:
            heapq.heappop(heap)
        top = -heap[0][2] if heap else -1
        if not ids or ids[-1] != top:
            pts.append(t)
            ids.append(top)
    return np.asarray(pts, dtype=np.float64), np.asarray(ids, dtype=np.int64)


def _mark_containers(starts: np.ndarray, ends: np.ndarray, idx: np.ndarray,
                     leaf: np.ndarray) -> None:
    """Set ``leaf`` to False for the ranges ``idx`` (one thread) that contain another.

    Range c lies in range r when r.start <= c.start < r.end and c.end <= r.end (of two equal
    ranges, the later in the file is the inner one); ranges that only overlap partly do not
    contain each other. In the order (start, longest first, file order) every range that r
    contains comes after r, and a later range whose start is >= r.end ends after r.end, so r
    contains one iff the minimum end over the ranges after it is <= r.end, taking the end of
    a zero-length range as just past its start (it lies in r only if it starts before r.end).
    Vectorised with a reversed running minimum.
    """
    if idx.size < 2:
        return
    order = idx[np.lexsort((idx, -ends[idx], starts[idx]))]
    st, en = starts[order], ends[order]
    eff = np.where(en > st, en, np.nextafter(st, np.inf))
    after = np.empty(order.size)
    after[:-1] = np.minimum.accumulate(eff[::-1])[::-1][1:]
    after[-1] = np.inf
    leaf[order[after <= en]] = False


def _lookup(seg: tuple[np.ndarray, np.ndarray], t: np.ndarray) -> np.ndarray:
    """Range index open at each time of ``t`` (-1 if none) from :func:`_thread_segments`."""
    pts, ids = seg
    if pts.size == 0:
        return np.full(t.size, -1, dtype=np.int64)
    i = np.searchsorted(pts, t, side="right") - 1
    return np.where(i >= 0, ids[np.maximum(i, 0)], -1)


def attribute(trace: RankTrace, fallback: bool = False
              ) -> tuple[np.ndarray, np.ndarray, Attribution]:
    """Annotation range index per GPU activity (-1 if none), leaf flag per range, counts.

    With ``fallback``, activities launched from a thread with no open range (autograd's
    backward threads, for example) go to the innermost range open at launch time on another
    annotated thread of the same process.
    """
    n = trace.gpu_start.size
    owner = np.full(n, -1, dtype=np.int64)
    n_ann = trace.ann_start.size
    leaf = np.ones(n_ann, dtype=bool)
    info = Attribution(activities=n, annotation_ranges=n_ann)

    li, found, ambiguous = _match_launches(trace)
    l_ts = trace.launch_ts[li]
    l_thread = trace.launch_thread[li]
    info.ambiguous = int(ambiguous.sum())
    info.no_launch = int(n - found.sum()) - info.ambiguous

    segs = {}
    for th in np.unique(trace.ann_thread).tolist():
        mine = np.flatnonzero(trace.ann_thread == th)
        segs[th] = _thread_segments(trace.ann_start, trace.ann_end, mine)
        _mark_containers(trace.ann_start, trace.ann_end, mine, leaf)
    got = np.full(li.size, -1, dtype=np.int64)
    for th, seg in segs.items():
        m = l_thread == th
        if m.any():
            got[m] = _lookup(seg, l_ts[m])
    if fallback and segs:
        by_size = sorted(segs, key=lambda th: -int((trace.ann_thread == th).sum()))
        for th in by_size:
            pid = trace.threads[th][0]
            m = (got < 0) & np.array([trace.threads[t][0] == pid for t in l_thread.tolist()],
                                      dtype=bool)
            if m.any():
                alt = _lookup(segs[th], l_ts[m])
                info.via_other_thread += int((alt >= 0).sum())
                got[m] = alt
    owner[np.flatnonzero(found)] = got
    info.attributed = int((owner >= 0).sum())
    info.outside_ranges = int(found.sum()) - info.attributed
    return owner, leaf, info


def _thread_process(trace: RankTrace) -> np.ndarray:
    """Dense process number of each thread id of ``trace.threads``."""
    procs: dict[Any, int] = {}
    return np.asarray([procs.setdefault(pid, len(procs)) for pid, _tid in trace.threads],
                      dtype=np.int64)


def _match_launches(trace: RankTrace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The launch call of each GPU activity through its correlation id.

    Correlation ids are unique only within a process, and a GPU activity's ``pid`` is its
    device, not the process that launched it. An id launched by one process only is taken
    as it is (its first launch call). An id launched by several processes is resolved
    through the device: when every activity of that device whose id is unique was launched
    by the same process, the launch of that process is taken; otherwise the activity is
    ambiguous (counted as unattributed rather than given to either process).
    Returns (launch index per found activity, found mask, ambiguous mask).
    """
    n = trace.gpu_corr.size
    corr = trace.gpu_corr
    none = (np.empty(0, dtype=np.int64), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool))
    if trace.launch_corr.size == 0 or n == 0:
        return none
    l_proc = _thread_process(trace)[trace.launch_thread]
    order = np.lexsort((l_proc, trace.launch_corr))
    lc = trace.launch_corr[order]
    lo = np.searchsorted(lc, corr, side="left")
    hi = np.searchsorted(lc, corr, side="right")
    has = (corr >= 0) & (hi > lo)
    s_proc = l_proc[order]
    # launches of one process only (several launch calls of one process with the same id,
    # such as a runtime call and the driver call under it, count as one: the first)
    unique = has & (s_proc[np.minimum(lo, lc.size - 1)] == s_proc[np.maximum(hi - 1, 0)])
    multi = has & ~unique
    pick = np.where(unique, lo, -1)
    if multi.any():
        # processes that launched each device's uniquely matched activities
        u_dev = trace.gpu_device[unique]
        u_proc = s_proc[lo[unique]]
        pairs = np.unique(np.stack([u_dev, u_proc]), axis=1) if u_dev.size else \
            np.empty((2, 0), dtype=np.int64)
        devs, first, cnt = np.unique(pairs[0], return_index=True, return_counts=True)
        one = cnt == 1
        dev_proc = dict(zip(devs[one].tolist(), pairs[1][first[one]].tolist()))
        m_idx = np.flatnonzero(multi)
        proc = np.array([dev_proc.get(d, -1) for d in trace.gpu_device[m_idx].tolist()],
                        dtype=np.int64)
        m_idx, proc = m_idx[proc >= 0], proc[proc >= 0]
        n_proc = int(l_proc.max()) + 1
        if m_idx.size and int(lc.max()) < (1 << 62) // n_proc:
            # (correlation, process) as one sortable integer
            key = lc * n_proc + s_proc
            want = corr[m_idx] * n_proc + proc
            k_lo = np.searchsorted(key, want, side="left")
            ok = k_lo < key.size
            ok[ok] = key[k_lo[ok]] == want[ok]
            pick[m_idx[ok]] = k_lo[ok]
    found = pick >= 0
    return order[pick[found]], found, multi & ~found


def _phase_stats(trace: RankTrace, owner: np.ndarray, leaf: np.ndarray, cls: np.ndarray,
                 device_compute: dict[int, tuple[np.ndarray, np.ndarray]]
                 ) -> tuple[list[PhaseStats], list[PhaseStats]]:
    """Per annotation range: the figures of the GPU work it launched."""
    phases: list[PhaseStats] = []
    outer: list[PhaseStats] = []
    if trace.ann_start.size == 0:
        return phases, outer
    has = owner >= 0
    order = np.argsort(owner[has], kind="stable")
    act = np.flatnonzero(has)[order]
    own = owner[act]
    bounds = np.searchsorted(own, np.arange(trace.ann_start.size + 1))
    for a in np.lexsort((trace.ann_thread, trace.ann_start)).tolist():
        sel = act[bounds[a]:bounds[a + 1]]
        if not leaf[a] and sel.size == 0:
            continue
        pid, tid = trace.threads[int(trace.ann_thread[a])]
        ph = PhaseStats(name=trace.names[int(trace.ann_name[a])], rank=trace.rank,
                        thread=f"{pid}/{tid}", cpu_start_us=float(trace.ann_start[a]),
                        cpu_dur_us=float(trace.ann_end[a] - trace.ann_start[a]),
                        leaf=bool(leaf[a]), kernels=int(sel.size))
        if sel.size:
            s, e, c = trace.gpu_start[sel], trace.gpu_end[sel], cls[sel]
            ph.gpu_start_us, ph.gpu_end_us = float(s.min()), float(e.max())
            ph.busy_us = iv.union_length(s, e)
            dev = trace.gpu_device[sel]
            for d in np.unique(dev).tolist():
                md = dev == d
                comm = iv.union(s[md & (c == _C_COMM)], e[md & (c == _C_COMM)])
                comp = iv.union(s[md & (c == _C_COMPUTE)], e[md & (c == _C_COMPUTE)])
                cb = iv.length(*comm)
                ph.comm_busy_us += cb
                ph.compute_busy_us += iv.length(*comp)
                ph.overlap_us += iv.intersection_length(comm, comp)
                hidden = min(iv.intersection_length(comm, device_compute[d]), cb)
                ph.hidden_comm_us += hidden
                ph.exposed_comm_us += cb - hidden
        (phases if leaf[a] else outer).append(ph)
    return phases, outer


# ------------------------------------------------------------------------------ public API

def analyze_rank(trace: RankTrace, classifier: Classifier | None = None,
                 phase_fallback: bool = False) -> RankReport:
    """Measure one loaded trace."""
    classifier = classifier or Classifier()
    cls, table = classify_activities(trace, classifier)
    devices: list[DeviceStats] = []
    device_compute: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for d in trace.devices:
        sel = trace.gpu_device == d
        devices.append(_device_stats(trace, sel, cls, d, table))
        m = sel & (cls == _C_COMPUTE)
        device_compute[d] = iv.union(trace.gpu_start[m], trace.gpu_end[m])
    owner, leaf, info = attribute(trace, phase_fallback)
    phases, outer = _phase_stats(trace, owner, leaf, cls, device_compute)
    return RankReport(rank=trace.rank, path=trace.path, world_size=trace.world_size,
                      events=trace.n_events, devices=devices, phases=phases,
                      outer_phases=outer, attribution=info, notes=list(trace.notes),
                      phase_summary=summarize_phases(phases))


def _summary(ranks: list[RankReport]) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    devs = [d for r in ranks for d in r.devices]
    if not devs:
        return {}, None
    summary: dict[str, dict[str, Any]] = {}
    for m in DEVICE_METRICS:
        vals = np.array([getattr(d, m) for d in devs], dtype=np.float64)
        lo, hi = int(np.argmin(vals)), int(np.argmax(vals))
        summary[m] = {"min": float(vals[lo]), "median": float(np.median(vals)),
                      "max": float(vals[hi]), "min_rank": devs[lo].rank,
                      "max_rank": devs[hi].rank}
    w = max(devs, key=lambda d: (d.exposed_comm_us, -d.overlap_ratio))
    worst = {"rank": w.rank, "device": w.device, "exposed_comm_us": w.exposed_comm_us,
             "overlap_ratio": w.overlap_ratio, "criterion": "most exposed communication"}
    return summary, worst


def analyze(traces: list[RankTrace], classifier: Classifier | None = None,
            phase_fallback: bool = False) -> TraceReport:
    """Measure loaded traces (one per rank) and summarise across ranks."""
    classifier = classifier or Classifier()
    ranks = [analyze_rank(t, classifier, phase_fallback) for t in traces]
    summary, worst = _summary(ranks)
    notes: list[str] = []
    for r in ranks:
        name = os.path.basename(r.path)
        notes.extend(f"rank {r.rank} ({name}): {n}" for n in r.notes)
        if not r.has_gpu:
            notes.append(f"rank {r.rank} ({name}): no GPU activity (kernels, memcpy, memset) in "
                         "the trace, e.g. a CPU-only profile; GPU figures are not available")
        a = r.attribution
        if r.has_gpu and a.annotation_ranges and a.outside_ranges and not phase_fallback:
            notes.append(f"rank {r.rank} ({name}): {a.outside_ranges} GPU activities were "
                         "launched outside any annotation range on their thread (e.g. from "
                         "autograd's backward thread); --phase-fallback attributes them to the "
                         "range open on another thread of the process")
        if a.ambiguous:
            notes.append(f"rank {r.rank} ({name}): {a.ambiguous} GPU activities carry a "
                         "correlation id that several processes of the file launched, and "
                         "their device does not tell which; they are counted as unattributed")
    return TraceReport(ranks=ranks, summary=summary, worst=worst, notes=notes)


def analyze_files(paths: list[str] | tuple[str, ...] | str, comm_patterns: tuple[str, ...] = (),
                  compute_patterns: tuple[str, ...] = (), phase_fallback: bool = False,
                  max_bytes: int | None = None) -> TraceReport:
    """Load trace files (or directories of them) and analyze them (``max_bytes``: see
    :func:`~deeppar.profiling.load_trace`)."""
    classifier = Classifier.with_patterns(comm_patterns, compute_patterns)
    skipped: list[str] = []
    report = analyze(load_traces(paths, skipped, max_bytes=max_bytes), classifier,
                     phase_fallback)
    report.notes.extend(skipped)
    return report


__all__ = ["Attribution", "DeviceStats", "FamilyStats", "PhaseStats", "PhaseSummary",
           "RankReport", "StreamStats", "TraceReport", "analyze", "analyze_files",
           "analyze_rank", "attribute", "classify_activities", "summarize_phases", "CLASSES"]
