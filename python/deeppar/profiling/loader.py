"""Load torch.profiler / Kineto Chrome traces into compact NumPy columns.

Only what the overlap analysis needs is kept: GPU activities (kernels, memcpy, memset), CPU
runtime/driver launch calls that carry a ``correlation`` id, and CPU ``user_annotation``
ranges (``record_function``). Columns are filled through ``array.array`` so that no Python
object per event outlives the parsing of that event.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain
from typing import Any

import numpy as np

from ._fastscan import BEGIN_END, NO_CAT
from ._jsonstream import META_KEYS, NotATrace, iter_trace_events

KIND_KERNEL, KIND_MEMCPY, KIND_MEMSET = 0, 1, 2
KIND_NAMES = ("kernel", "memcpy", "memset")

_GPU_CATS = {"kernel": KIND_KERNEL, "Kernel": KIND_KERNEL,
             "gpu_memcpy": KIND_MEMCPY, "Memcpy": KIND_MEMCPY,
             "gpu_memset": KIND_MEMSET, "Memset": KIND_MEMSET}
_LAUNCH_CATS = {"cuda_runtime", "cuda_driver", "Runtime", "Driver"}
_ANNOTATION_CATS = {"user_annotation"}

# what an event is kept as: its GPU kind (0..2), a launch call or an annotation range; _BE is
# a "B"/"E" (begin/end) event, paired into ranges once the whole file is read
_LAUNCH, _ANN = 3, 4
_BE, _NO_CAT = BEGIN_END, NO_CAT  # the target of "E" events without a category is _NO_CAT
_TARGETS = {**_GPU_CATS, **{c: _LAUNCH for c in _LAUNCH_CATS},
            **{c: _ANN for c in _ANNOTATION_CATS}}
_NAMED = frozenset((KIND_KERNEL, KIND_MEMCPY, KIND_MEMSET, _ANN))  # targets whose name is kept

TRACE_SUFFIXES = (".json", ".json.gz")


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
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return default
    return default


def _duration(value: Any) -> float | None:
    """A ``dur`` that is not an int as a float (0 when absent), None if not a finite number."""
    if value is None:
        return 0.0
    if type(value) is bool:
        return None
    try:
        d = float(value)
    except (TypeError, ValueError):
        return None
    return d if d == d and abs(d) != float("inf") else None


def _record(ev: dict[str, Any]) -> tuple | None:
    """The fields of a decoded event that the loader uses, or None if it is not kept.

    Same layout as the fast scanner's records: (target, ts, dur, name, pid, tid, device,
    stream, correlation), values as ``json`` gives them with floats kept as text. A "B" or
    "E" event of a kept category, or an "E" without a category, is (_BE, ts, "B" or "E",
    name, pid, tid, its target or _NO_CAT, None, None).
    """
    cat = ev.get("cat")
    target = _TARGETS.get(cat) if type(cat) is str else None
    ph = ev.get("ph")
    if ph != "X":
        if ph == "B" or ph == "E":
            if target is None and (ph == "B" or "cat" in ev):
                return None
            return (_BE, ev.get("ts"), ph, str(ev.get("name", "")), ev.get("pid"),
                    ev.get("tid"), _NO_CAT if target is None else target, None, None)
        return None
    if target is None:
        return None
    ts = ev.get("ts")
    args = ev.get("args")
    if type(args) is not dict:
        args = {}
    return (target, ts, ev.get("dur", 0), str(ev.get("name", "")), ev.get("pid"),
            ev.get("tid"), args.get("device"), args.get("stream"), args.get("correlation"))


def _slow_records(path: str, meta: dict[str, Any], counts: list[int]) -> Iterator[list[tuple]]:
    """Records through the text parser (every element decoded by ``json``), in lists."""
    n = 0
    batch: list[tuple] = []
    try:
        for ev in iter_trace_events(path, meta):
            n += 1
            rec = _record(ev)
            if rec is not None:
                batch.append(rec)
                if len(batch) >= 4096:
                    yield batch
                    batch = []
        yield batch
    finally:
        counts[0] += n


def load_trace(path: str | os.PathLike[str], rank: int | None = None, *,
               fast: bool = True) -> RankTrace:
    """Read one Chrome-trace file (plain or gzipped) into a :class:`RankTrace`.

    ``rank`` defaults to ``distributedInfo.rank`` in the file, else 0. ``fast`` uses the
    bytes-level scanner, which hands over to the text parser (reading the file again) for
    input it does not expect; ``fast=False`` uses the text parser alone. Both give the
    same result.
    """
    path = os.fspath(path)
    if fast:
        from ._fastscan import Unsupported, iter_records

        meta: dict[str, Any] = {}
        counts = [0]
        try:
            records = iter_records(path, meta, _TARGETS, _NAMED, _record, counts,
                                   META_KEYS)
            return _collect(path, rank, records, meta, counts)
        except (Unsupported, OSError):
            pass
    meta = {}
    counts = [0]
    return _collect(path, rank, _slow_records(path, meta, counts), meta, counts)


def _collect(path: str, rank: int | None, batches: Iterator[list[tuple]], meta: dict[str, Any],
             counts: list[int]) -> RankTrace:
    """Fill the columns from the records of one file."""
    names = _Interner()
    threads = _Interner()
    g_ts, g_dur = array("d"), array("d")
    g_dev, g_stream, g_name, g_corr = array("q"), array("q"), array("l"), array("q")
    g_kind = array("b")
    l_corr, l_ts, l_thread = array("q"), array("d"), array("l")
    a_ts, a_dur, a_thread, a_name = array("d"), array("d"), array("l"), array("l")
    base: int | None = None
    base_dec = Decimal(0)
    unreadable = 0  # kept events whose ts or dur is missing or not a finite number
    # "B"/"E" events, paired at the end: time, thread, code (see _pair_begin_end), name
    b_ts, b_thread, b_code = array("d"), array("l"), array("b")
    b_name: list[str] = []
    seen_begin = False

    for target, ts, dur, name, pid, tid, v_dev, v_stream, v_corr in chain.from_iterable(batches):
        if type(ts) is int:
            if base is None:
                base = ts
                base_dec = Decimal(ts)
            rel = float(ts - base)
        else:
            try:
                t = Decimal(ts) if type(ts) is not bool else Decimal("NaN")
            except (ArithmeticError, TypeError, ValueError):
                unreadable += 1
                continue
            if not t.is_finite():
                unreadable += 1
                continue
            if base is None:
                base = int(t)
                base_dec = Decimal(base)
            rel = float(t - base_dec)
        if target == _LAUNCH:
            corr = v_corr if type(v_corr) is int else _int_or(v_corr, -1)
            if corr < 0:
                continue
            l_corr.append(corr)
            l_ts.append(rel)
            l_thread.append(threads[(pid, tid)])
            continue
        if target == _BE:
            if dur == "B":
                code = _B_ANN if v_dev == _ANN else _B_OTHER
                seen_begin = True
            elif v_dev != _NO_CAT:
                code = _E_KEPT
            elif seen_begin:
                code = _E_NO_CAT  # only after a "B" of a kept category, in file order
            else:
                continue
            b_ts.append(rel)
            b_thread.append(threads[(pid, tid)])
            b_code.append(code)
            b_name.append(name)
            continue
        if type(dur) is not int:
            dur = _duration(dur)
            if dur is None:
                unreadable += 1
                continue
        if dur < 0:
            dur = 0
        if target == _ANN:
            a_ts.append(rel)
            a_dur.append(dur)
            a_thread.append(threads[(pid, tid)])
            a_name.append(names[name])
            continue
        g_ts.append(rel)
        g_dur.append(dur)
        g_dev.append(v_dev if type(v_dev) is int else _int_or(v_dev, _int_or(pid, 0)))
        g_stream.append(v_stream if type(v_stream) is int else _int_or(v_stream, _int_or(tid, 0)))
        g_kind.append(target)
        g_name.append(names[name])
        g_corr.append(v_corr if type(v_corr) is int else _int_or(v_corr, -1))

    notes = []
    if unreadable:
        notes.append(f"{unreadable} events with unreadable ts/dur skipped")
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
        gpu_name=np.asarray(g_name, dtype=np.int64),
        gpu_corr=np.frombuffer(g_corr, dtype=np.int64).copy(),
        launch_corr=np.frombuffer(l_corr, dtype=np.int64).copy(),
        launch_ts=l_start,
        launch_thread=np.asarray(l_thread, dtype=np.int64),
        ann_start=a_start,
        ann_end=a_start + np.frombuffer(a_dur, dtype=np.float64),
        ann_thread=np.asarray(a_thread, dtype=np.int64),
        ann_name=np.asarray(a_name, dtype=np.int64),
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
                skipped: list[str] | None = None) -> list[RankTrace]:
    """Load several files (or directories of them), one rank each.

    Ranks come from each file's ``distributedInfo``; when those are missing or repeated,
    files are numbered in the order given. A file found by walking a directory that is
    valid JSON but not a trace (a config file, say) is left out, with a line saying so
    appended to ``skipped``; a file named directly, or a truncated or invalid one, is an
    error.
    """
    traces = []
    files = _expand(paths)
    left_out: list[str] = []
    for path, walked in files:
        try:
            traces.append(load_trace(path))
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
