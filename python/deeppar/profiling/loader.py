"""Load torch.profiler / Kineto Chrome traces into compact NumPy columns.

Only what the overlap analysis needs is kept: GPU activities (kernels, memcpy, memset), CPU
runtime/driver launch calls that carry a ``correlation`` id, and CPU ``user_annotation``
ranges (``record_function``). The events come from the streaming parser (``_parse``) in
batches; columns are filled through ``array.array`` so that no Python object per event
outlives its batch.
"""

from __future__ import annotations

import gc
import os
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from ._parse import (
    KIND_ANNOTATION,
    KIND_KERNEL,
    KIND_LAUNCH,
    KIND_MEMCPY,
    KIND_MEMSET,
    NotATrace,
    Progress,
    TraceEvent,
    iter_events,
)

KIND_NAMES = ("kernel", "memcpy", "memset")  # names of the GPU kinds, by KIND_* value
TRACE_SUFFIXES = (".json", ".json.gz")
_LIMIT = 2**63  # |ts|, |dur| in microseconds and ids must stay below this


@dataclass
class RankTrace:
    """The parts of one trace file (one rank) that the analysis uses.

    Times are float64 microseconds relative to ``base_us``, the earliest kept timestamp.
    """

    path: str
    rank: int
    world_size: int | None
    base_us: float
    names: list[str]
    # GPU activity
    gpu_start: np.ndarray
    gpu_end: np.ndarray
    gpu_device: np.ndarray
    gpu_stream: np.ndarray
    gpu_kind: np.ndarray
    gpu_name: np.ndarray
    gpu_corr: np.ndarray
    # CPU launch calls
    launch_corr: np.ndarray
    launch_ts: np.ndarray
    launch_thread: np.ndarray
    # CPU annotation ranges
    ann_start: np.ndarray
    ann_end: np.ndarray
    ann_thread: np.ndarray
    ann_name: np.ndarray
    threads: list[tuple[Any, Any]] = field(default_factory=list)  # (pid, tid) per thread id
    meta: dict[str, Any] = field(default_factory=dict)
    n_events: int = 0
    notes: list[str] = field(default_factory=list)  # what was skipped while reading, and why

    @property
    def devices(self) -> list[int]:
        return sorted({int(d) for d in np.unique(self.gpu_device)})


class _Interner(dict):
    """Map values to dense ids, remembering the order of first appearance."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[Any] = []

    def __missing__(self, key: Any) -> int:
        idx = len(self.order)
        self.order.append(key)
        self[key] = idx
        return idx


def _int_or(value: Any, default: int) -> int:
    """``value`` as an int if it is one (or an integer's text), else ``default``."""
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


class _Fields:
    """Turns the fields of :class:`TraceEvent` into numbers, with one-line errors for
    numbers out of range and counts of what was unreadable or repaired."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.unreadable = 0  # events whose ts or dur is not a number: skipped
        self.negative_dur = 0  # complete events with dur < 0: taken as 0
        self.missing_dur = 0  # complete events without dur: taken as 0

    def error(self, ev: TraceEvent, what: str) -> ValueError:
        return ValueError(f"{self.path}: event at byte {ev.offset} ({ev.name[:60]!r}): {what}")

    def time(self, ev: TraceEvent) -> int | Decimal | None:
        """``ts`` exactly (int, or Decimal for fractions), None if not a number."""
        ts = ev.ts
        if type(ts) is int:
            if -_LIMIT < ts < _LIMIT:
                return ts
            raise self.error(ev, f"'ts' {ts} is out of range (|ts| < 2^63 us)")
        if type(ts) is not str:
            return None
        try:
            t = Decimal(ts)
        except InvalidOperation:
            return None
        if not t.is_finite() or not -_LIMIT < t < _LIMIT:
            raise self.error(ev, f"'ts' {ts[:40]} is out of range (a finite number, "
                                 "|ts| < 2^63 us)")
        return t

    def duration(self, ev: TraceEvent) -> float | None:
        """``dur`` of a complete event (0 when absent or negative, counted), None if it is
        not a number."""
        d = ev.dur
        if type(d) is not int:
            if d is None:
                self.missing_dur += 1
                return 0.0
            if type(d) is not str:
                return None
            try:
                d = float(d)
            except ValueError:
                return None
            if not -_LIMIT < d < _LIMIT:  # also false for nan
                raise self.error(ev, f"'dur' {ev.dur[:40]} is out of range (a finite number, "
                                     "|dur| < 2^63 us)")
        elif not -_LIMIT < d < _LIMIT:
            raise self.error(ev, f"'dur' {d} is out of range (|dur| < 2^63 us)")
        if d < 0:
            self.negative_dur += 1
            return 0.0
        return d

    def index(self, ev: TraceEvent, value: Any, what: str, default: int) -> int:
        """An integer id field (device, stream, correlation), ``default`` when absent."""
        if value is None:
            return default
        if type(value) is str:
            text = value.strip()
            if text.lstrip("-").isdigit():
                value = int(text)
        if type(value) is int and -_LIMIT < value < _LIMIT:
            return value
        raise self.error(ev, f"args.{what} must be an integer below 2^63 in magnitude, got "
                             f"{str(value)[:40]}")

    def notes(self) -> list[str]:
        out = []
        if self.unreadable:
            out.append(f"{self.unreadable} events with unreadable ts/dur skipped")
        if self.negative_dur:
            out.append(f"{self.negative_dur} events with a negative dur taken as 0 long")
        if self.missing_dur:
            out.append(f"{self.missing_dur} complete events without dur taken as 0 long")
        return out


def load_trace(path: str | os.PathLike[str], rank: int | None = None, *,
               max_bytes: int | None = None, progress: Progress | None = None) -> RankTrace:
    """Read one Chrome-trace file (plain or gzipped) into a :class:`RankTrace`.

    ``rank`` defaults to ``distributedInfo.rank`` in the file, else 0. ``max_bytes`` bounds
    the JSON text read (by default only gzip files, FIFOs and devices are bounded, at 32 GiB);
    ``progress(done, total)`` is called as the file is read. Raises ValueError (NotATrace for
    valid JSON that is not a trace) naming the file and the byte offset of the problem.
    """
    path = os.fspath(path)
    meta: dict[str, Any] = {}
    counts = [0]
    with _gc_paused():
        batches = iter_events(path, meta, counts, max_bytes=max_bytes, progress=progress)
        return _collect(path, rank, batches, meta, counts)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: decoding creates many short-lived containers
    without cycles, and collections triggered by them would scan them again and again
    (about a third of the loading time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect(path: str, rank: int | None, batches: Iterator[list[TraceEvent]],
             meta: dict[str, Any], counts: list[int]) -> RankTrace:
    """Fill the columns from the events of one file."""
    names = _Interner()
    threads = _Interner()
    fields = _Fields(path)
    g_ts, g_dur = array("d"), array("d")
    g_dev, g_stream, g_name, g_corr = array("q"), array("q"), array("q"), array("q")
    g_kind = array("b")
    l_corr, l_ts, l_thread = array("q"), array("d"), array("q")
    a_ts, a_dur, a_thread, a_name = array("d"), array("d"), array("q"), array("q")
    base: int | None = None
    base_dec = Decimal(0)
    # "B"/"E" events, paired at the end: time, thread, code (see _pair_begin_end), name
    b_ts, b_thread, b_code = array("d"), array("q"), array("b")
    b_name: list[str] = []
    seen_begin = False

    lim = _LIMIT
    for batch in batches:
        for ev in batch:
            kind, phase, t = ev.kind, ev.phase, ev.ts
            if kind is None and not seen_begin:
                continue  # an "E" without category before any kept "B": closes nothing
            if type(t) is not int or not -lim < t < lim:
                t = fields.time(ev)
                if t is None:
                    fields.unreadable += 1
                    continue
            if base is None:
                base = int(t)
                base_dec = Decimal(base)
            rel = float(t - base) if type(t) is int else float(t - base_dec)
            if phase != "X":
                if phase == "B":
                    code = _B_ANN if kind == KIND_ANNOTATION else _B_OTHER
                    seen_begin = True
                elif kind is not None:
                    code = _E_KEPT
                else:
                    code = _E_NO_CAT  # only after a "B" of a kept category, in file order
                b_ts.append(rel)
                b_thread.append(threads[(ev.pid, ev.tid)])
                b_code.append(code)
                b_name.append(ev.name)
                continue
            corr = ev.correlation
            if type(corr) is not int or not -lim < corr < lim:
                corr = fields.index(ev, corr, "correlation", -1)
            if kind == KIND_LAUNCH:
                if corr >= 0:
                    l_corr.append(corr)
                    l_ts.append(rel)
                    l_thread.append(threads[(ev.pid, ev.tid)])
                continue
            dur = ev.dur
            if type(dur) is not int or not 0 <= dur < lim:
                dur = fields.duration(ev)
                if dur is None:
                    fields.unreadable += 1
                    continue
            if kind == KIND_ANNOTATION:
                a_ts.append(rel)
                a_dur.append(dur)
                a_thread.append(threads[(ev.pid, ev.tid)])
                a_name.append(names[ev.name])
                continue
            dev, stream = ev.device, ev.stream
            if type(dev) is not int or not -lim < dev < lim:
                dev = fields.index(ev, dev, "device", _int_or(ev.pid, 0))
            if type(stream) is not int or not -lim < stream < lim:
                stream = fields.index(ev, stream, "stream", _int_or(ev.tid, 0))
            g_ts.append(rel)
            g_dur.append(dur)
            g_dev.append(dev)
            g_stream.append(stream)
            g_kind.append(kind)
            g_name.append(names[ev.name])
            g_corr.append(corr)

    notes = fields.notes()
    if b_code:
        notes.extend(_pair_begin_end(b_ts, b_thread, b_code, b_name, names,
                                     a_ts, a_dur, a_thread, a_name))
    dist = meta.get("distributedInfo") if isinstance(meta.get("distributedInfo"), dict) else {}
    file_rank = _int_or(dist.get("rank"), -1)
    world = _int_or(dist.get("world_size"), -1)
    g_start = np.frombuffer(g_ts, dtype=np.float64).copy()
    a_start = np.frombuffer(a_ts, dtype=np.float64).copy()
    l_start = np.frombuffer(l_ts, dtype=np.float64).copy()
    # make times relative to the earliest kept event, whatever the order of the file
    firsts = [float(x.min()) for x in (g_start, a_start, l_start) if x.size]
    shift = min(firsts) if firsts else 0.0
    for x in (g_start, a_start, l_start):
        x -= shift
    return RankTrace(
        path=path,
        rank=rank if rank is not None else max(file_rank, 0),
        world_size=world if world > 0 else None,
        base_us=float(base or 0) + shift,
        names=names.order,
        gpu_start=g_start,
        gpu_end=g_start + np.frombuffer(g_dur, dtype=np.float64),
        gpu_device=np.frombuffer(g_dev, dtype=np.int64).copy(),
        gpu_stream=np.frombuffer(g_stream, dtype=np.int64).copy(),
        gpu_kind=np.frombuffer(g_kind, dtype=np.int8).copy(),
        gpu_name=np.frombuffer(g_name, dtype=np.int64).copy(),
        gpu_corr=np.frombuffer(g_corr, dtype=np.int64).copy(),
        launch_corr=np.frombuffer(l_corr, dtype=np.int64).copy(),
        launch_ts=l_start,
        launch_thread=np.frombuffer(l_thread, dtype=np.int64).copy(),
        ann_start=a_start,
        ann_end=a_start + np.frombuffer(a_dur, dtype=np.float64),
        ann_thread=np.frombuffer(a_thread, dtype=np.int64).copy(),
        ann_name=np.frombuffer(a_name, dtype=np.int64).copy(),
        threads=threads.order,
        meta=meta,
        n_events=counts[0],
        notes=notes,
    )


def _expand(paths: list[str] | tuple[str, ...] | str) -> list[tuple[str, bool]]:
    """(file, found by walking a directory) for each file named or under a named directory."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no trace files given: pass a trace file or a directory of them")
    out: list[tuple[str, bool]] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            found = sorted(
                os.path.join(root, f)
                for root, _dirs, files in os.walk(p)
                for f in files
                if f.endswith(TRACE_SUFFIXES)
            )
            if not found:
                raise FileNotFoundError(f"no trace files (*.json, *.json.gz) in directory {p!r}")
            out.extend((f, True) for f in found)
        elif not os.path.exists(p):
            raise FileNotFoundError(f"trace file not found: {p!r}")
        else:
            out.append((p, False))
    return out


_B_ANN, _B_OTHER, _E_KEPT, _E_NO_CAT = 0, 1, 2, 3


def _pair_begin_end(ts: array, thread: array, code: array, name: list[str], names: _Interner,
                    a_ts: array, a_dur: array, a_thread: array, a_name: array) -> list[str]:
    """Pair "B"/"E" events into ranges and append the annotation ranges to the ``a_*``
    columns; returns notes on what was left out.

    Per thread, in time order (file order for equal times), an "E" closes the latest open
    "B" (Chrome-trace rules); an "E" without a category only when its name is empty or that
    of the "B" it would close, since it may belong to a "B" the loader did not keep.
    GPU activity and launch calls given as "B"/"E" pairs are counted, not used: the
    analysis needs their device, stream and correlation, which complete ("X") events carry.
    """
    t = np.frombuffer(ts, dtype=np.float64)
    th = np.asarray(thread, dtype=np.int64)
    order = np.lexsort((np.arange(t.size), t, th)).tolist()
    other = unmatched_end = 0
    stack: list[int] = []
    cur = -1
    unclosed = 0

    def flush() -> None:
        nonlocal unclosed
        unclosed += len(stack)
        stack.clear()

    for i in order:
        if thread[i] != cur:
            flush()
            cur = thread[i]
        c = code[i]
        if c in (_B_ANN, _B_OTHER):
            stack.append(i)
            continue
        if not stack or (c == _E_NO_CAT and name[i] and name[i] != name[stack[-1]]):
            unmatched_end += c == _E_KEPT
            continue
        b = stack.pop()
        if code[b] == _B_OTHER:
            other += 1
            continue
        a_ts.append(ts[b])
        a_dur.append(ts[i] - ts[b])
        a_thread.append(thread[b])
        a_name.append(names[name[b]])
    flush()
    notes = []
    if other:
        notes.append(f"{other} GPU activities or launch calls given as B/E pairs skipped "
                     "(only complete 'X' events carry their device, stream and correlation)")
    if unclosed or unmatched_end:
        notes.append(f"{unclosed + unmatched_end} B/E events without a partner skipped "
                     f"({unclosed} B never closed, {unmatched_end} E with no open B)")
    return notes


def expand_paths(paths: list[str] | tuple[str, ...] | str) -> list[str]:
    """Files named directly plus the ``*.json`` / ``*.json.gz`` files of named directories."""
    return [f for f, _walked in _expand(paths)]


def load_traces(paths: list[str] | tuple[str, ...] | str,
                skipped: list[str] | None = None, *, max_bytes: int | None = None,
                progress: Callable[[str], Progress | None] | None = None) -> list[RankTrace]:
    """Load several files (or directories of them), one rank each.

    Ranks come from each file's ``distributedInfo``; when those are missing or repeated,
    files are numbered in the order given. A file found by walking a directory that is
    valid JSON but not a trace (a config file, say) is left out, with a line saying so
    appended to ``skipped``; a file named directly, or a truncated or invalid one, is an
    error. ``max_bytes`` is passed to :func:`load_trace`; ``progress(path)`` may return a
    progress callback for that file.
    """
    traces = []
    files = _expand(paths)
    left_out: list[str] = []
    for path, walked in files:
        try:
            traces.append(load_trace(path, max_bytes=max_bytes,
                                     progress=progress(path) if progress else None))
        except NotATrace as exc:
            if not walked:
                raise
            left_out.append(f"skipped {path}: {str(exc).removeprefix(path + ': ')}")
    if not traces:
        raise NotATrace(f"none of the {len(files)} JSON files found is a Chrome trace; "
                        + left_out[0])
    if skipped is not None:
        skipped.extend(left_out)
    ranks = [t.rank for t in traces]
    if len(set(ranks)) != len(ranks):
        for i, t in enumerate(traces):
            t.rank = i
    return traces


__all__ = ["KIND_KERNEL", "KIND_MEMCPY", "KIND_MEMSET", "KIND_NAMES", "NotATrace", "RankTrace",
           "TRACE_SUFFIXES", "expand_paths", "load_trace", "load_traces"]
