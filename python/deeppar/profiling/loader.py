"""Load torch.profiler / Kineto Chrome traces into compact NumPy columns.

Only what the overlap analysis needs is kept: GPU activities (kernels, memcpy, memset), CPU
runtime/driver launch calls that carry a ``correlation`` id, and CPU ``user_annotation``
ranges (``record_function``). Columns are filled through ``array.array`` so that no Python
object per event outlives the parsing of that event.
"""

from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np

from ._jsonstream import iter_trace_events

KIND_KERNEL, KIND_MEMCPY, KIND_MEMSET = 0, 1, 2
KIND_NAMES = ("kernel", "memcpy", "memset")

_GPU_CATS = {"kernel": KIND_KERNEL, "Kernel": KIND_KERNEL,
             "gpu_memcpy": KIND_MEMCPY, "Memcpy": KIND_MEMCPY,
             "gpu_memset": KIND_MEMSET, "Memset": KIND_MEMSET}
_LAUNCH_CATS = {"cuda_runtime", "cuda_driver", "Runtime", "Driver"}
_ANNOTATION_CATS = {"user_annotation"}

_GPU, _LAUNCH, _ANN = 1, 2, 3
_TARGETS = {**{c: _GPU for c in _GPU_CATS}, **{c: _LAUNCH for c in _LAUNCH_CATS},
            **{c: _ANN for c in _ANNOTATION_CATS}}

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


def load_trace(path: str | os.PathLike[str], rank: int | None = None) -> RankTrace:
    """Read one Chrome-trace file (plain or gzipped) into a :class:`RankTrace`.

    ``rank`` defaults to ``distributedInfo.rank`` in the file, else 0.
    """
    path = os.fspath(path)
    meta: dict[str, Any] = {}
    names = _Interner()
    threads = _Interner()
    g_ts, g_dur = array("d"), array("d")
    g_dev, g_stream, g_name, g_corr = array("q"), array("q"), array("l"), array("q")
    g_kind = array("b")
    l_corr, l_ts, l_thread = array("q"), array("d"), array("l")
    a_ts, a_dur, a_thread, a_name = array("d"), array("d"), array("l"), array("l")
    base: int | None = None
    base_dec: Decimal | None = None
    n_events = 0

    targets = _TARGETS.get
    for ev in iter_trace_events(path, meta):
        n_events += 1
        target = targets(ev.get("cat"))  # most events (cpu_op, flows) stop here
        if target is None or ev.get("ph") != "X":
            continue
        ts = ev.get("ts")
        if ts is None:
            continue
        if base is None:
            base = int(Decimal(ts)) if isinstance(ts, str) else int(ts)
            base_dec = Decimal(base)
        if type(ts) is int:
            rel = float(ts - base)
        else:
            try:
                rel = float(Decimal(ts) - base_dec)
            except ArithmeticError:
                continue
        dur = ev.get("dur", 0)
        dur = float(dur) if dur is not None else 0.0
        if dur < 0:
            dur = 0.0
        args = ev.get("args")
        if type(args) is not dict:
            args = {}
        if target == _GPU:
            g_ts.append(rel)
            g_dur.append(dur)
            v = args.get("device")
            g_dev.append(v if type(v) is int else _int_or(v, _int_or(ev.get("pid"), 0)))
            v = args.get("stream")
            g_stream.append(v if type(v) is int else _int_or(v, _int_or(ev.get("tid"), 0)))
            g_kind.append(_GPU_CATS[ev["cat"]])
            g_name.append(names[str(ev.get("name", ""))])
            v = args.get("correlation")
            g_corr.append(v if type(v) is int else _int_or(v, -1))
        elif target == _LAUNCH:
            v = args.get("correlation")
            corr = v if type(v) is int else _int_or(v, -1)
            if corr < 0:
                continue
            l_corr.append(corr)
            l_ts.append(rel)
            l_thread.append(threads[(ev.get("pid"), ev.get("tid"))])
        else:
            a_ts.append(rel)
            a_dur.append(dur)
            a_thread.append(threads[(ev.get("pid"), ev.get("tid"))])
            a_name.append(names[str(ev.get("name", ""))])

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
        n_events=n_events,
    )


def expand_paths(paths: list[str] | tuple[str, ...] | str) -> list[str]:
    """Files named directly plus the ``*.json`` / ``*.json.gz`` files of named directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise ValueError("no trace files given: pass a trace file or a directory of them")
    out: list[str] = []
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
            out.extend(found)
        elif not os.path.exists(p):
            raise FileNotFoundError(f"trace file not found: {p!r}")
        else:
            out.append(p)
    return out


def load_traces(paths: list[str] | tuple[str, ...] | str) -> list[RankTrace]:
    """Load several files (or directories of them), one rank each.

    Ranks come from each file's ``distributedInfo``; when those are missing or repeated,
    files are numbered in the order given.
    """
    files = expand_paths(paths)
    traces = [load_trace(p) for p in files]
    ranks = [t.rank for t in traces]
    if len(set(ranks)) != len(ranks):
        for i, t in enumerate(traces):
            t.rank = i
    return traces
