"""The one streaming parser of Chrome-trace JSON files (plain or gzipped).

The file is read once, as bytes, in chunks: gzip undone on the fly, UTF-8 checked, the amount
bounded for inputs of unknown size. Inside ``traceEvents``, NumPy finds the elements
(brackets outside strings, depth counting) and checks the separators between them; the
elements that may be events the analysis keeps (their text names a kept category or a
"B"/"E" phase, or holds an escape) are decoded by ``json`` in one call per chunk, and each
decoded event the analysis uses becomes a :class:`TraceEvent`. The other elements (CPU ops,
flow events) are checked for their structure (strings, brackets, commas) but not decoded.
Errors carry the byte offset in the JSON text and are found in the same single pass.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import stat
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from deeppar._jsonsafe import MAX_DEPTH, describe_start, looks_like_json, structure

KIND_KERNEL, KIND_MEMCPY, KIND_MEMSET, KIND_LAUNCH, KIND_ANNOTATION = range(5)
CATEGORY_KIND = {"kernel": KIND_KERNEL, "Kernel": KIND_KERNEL,
                 "gpu_memcpy": KIND_MEMCPY, "Memcpy": KIND_MEMCPY,
                 "gpu_memset": KIND_MEMSET, "Memset": KIND_MEMSET,
                 "cuda_runtime": KIND_LAUNCH, "cuda_driver": KIND_LAUNCH,
                 "Runtime": KIND_LAUNCH, "Driver": KIND_LAUNCH,
                 "user_annotation": KIND_ANNOTATION}
# top-level keys whose (small) values are kept as metadata
META_KEYS = ("schemaVersion", "distributedInfo", "deviceProperties", "traceName",
             "displayTimeUnit", "baseTimeNanoseconds")
# JSON text read from inputs of unknown length (gzip, FIFOs, devices) unless told otherwise
DEFAULT_MAX_BYTES = 32 << 30

_CHUNK = 1 << 22  # bytes read per refill (more when one value is longer)
MAX_EVENT_BYTES = 1 << 26  # an event (or other value) longer than this is an error
Progress = Callable[[int, "int | None"], None]  # (bytes of the file read, file size or None)


class TraceEvent(NamedTuple):
    """One event the analysis uses, its fields as the JSON gives them (floats as text)."""

    kind: int | None  # KIND_* of its category; None only for an "E" event without category
    phase: str  # "X" (complete), "B" (begin) or "E" (end)
    ts: Any  # start in microseconds: int, or the text of a float or of a string; None absent
    dur: Any  # length in microseconds, like ts; None when absent (always for "B"/"E")
    name: str
    pid: int | str | None
    tid: int | str | None
    device: Any  # args.device, None when absent
    stream: Any  # args.stream, None when absent
    correlation: Any  # args.correlation, None when absent
    offset: int  # byte offset of the event in the JSON text, for error messages


class NotATrace(ValueError):
    """The file is valid JSON but not a Chrome trace (no ``traceEvents``, not an array)."""


_new = tuple.__new__  # builds a TraceEvent without the Python-level __new__ of NamedTuple


def _ident(value: Any) -> int | str | None:
    """A pid/tid as a hashable value (JSON arrays and objects as their text)."""
    return json.dumps(value)


def event_record(ev: Any, offset: int = 0) -> TraceEvent | None:
    """The :class:`TraceEvent` of a decoded event, or None if the analysis does not use it.

    Used: complete ("X") events of a kept category; "B"/"E" events of a kept category; "E"
    events without a ``cat`` key (they may close a kept "B").
    """
    if type(ev) is not dict:
        return None
    cat = ev.get("cat")
    kind = CATEGORY_KIND.get(cat) if type(cat) is str else None
    ph = ev.get("ph")
    if ph == "X":
        if kind is None:
            return None
        args = ev.get("args")
        if type(args) is dict:
            device, stream, corr = args.get("device"), args.get("stream"), args.get("correlation")
        else:
            device = stream = corr = None
        dur = ev.get("dur")
    elif ph == "B" or ph == "E":
        if kind is None and (ph == "B" or "cat" in ev):
            return None
        device = stream = corr = dur = None
    else:
        return None
    name = ev.get("name", "")
    if type(name) is not str:
        name = str(name)
    pid, tid = ev.get("pid"), ev.get("tid")
    if type(pid) is not int and type(pid) is not str and pid is not None:
        pid = _ident(pid)
    if type(tid) is not int and type(tid) is not str and tid is not None:
        tid = _ident(tid)
    return _new(TraceEvent, (kind, ph, ev.get("ts"), dur, name, pid, tid, device, stream, corr,
                             offset))


# an element holding one of these may be an event the analysis uses: a kept category, or
# (once a "B" was seen) an "E" phase, which may lack a category; or any escape, which may
# hide either
_W = rb"[ \t\r\n]*+"
_KEPT_CATEGORY = re.compile(b'"cat"' + _W + b":" + _W + b'"(?:'
                            + b"|".join(re.escape(c.encode()) for c in CATEGORY_KIND) + b')"')
_END_PHASE = re.compile(b'"ph"' + _W + b":" + _W + b'"E"')
_WS = re.compile(rb"[ \t\r\n]*+")
_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)
_SCALAR = re.compile(rb"[^ \t\r\n,:\[\]{}\"]++")  # a number or literal (json checks it)
_GAP = re.compile(rb"[ \t\r\n]*+,[ \t\r\n]*+")
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[[32, 9, 10, 13]] = True


class _Source:
    """The JSON text of a trace file as bytes: gzip undone, UTF-8 checked, size bounded."""

    def __init__(self, path: str, max_bytes: int | None, progress: Progress | None) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"trace file not found: {path!r}") from None
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"trace path {path!r} is a directory, expected a file")
        self.path = path
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else None
        self.raw = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.gz = self.raw.peek(2)[:2] == b"\x1f\x8b"
        self.fh: Any = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gz else self.raw
        if max_bytes is None and (self.gz or self.size is None):
            max_bytes = DEFAULT_MAX_BYTES
        self.limit = max_bytes
        self.done = 0
        self.progress = progress
        self.utf8 = codecs.getincrementaldecoder("utf-8")()

    def close(self) -> None:
        if self.gz:
            self.fh.close()
        self.raw.close()

    def read(self, n: int) -> bytes:
        """Up to ``n`` more bytes of JSON text (b"" at the end)."""
        try:
            data = self.fh.read(n)
        except EOFError as exc:
            raise ValueError(f"{self.path}: truncated gzip file ({exc})") from None
        except (gzip.BadGzipFile, zlib.error) as exc:
            raise ValueError(f"{self.path}: corrupt gzip file ({exc})") from None
        try:
            self.utf8.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: not UTF-8 text at byte {self.done + exc.start}, "
                             "so not a JSON trace") from None
        self.done += len(data)
        if self.limit is not None and self.done > self.limit:
            kind = ("a regular file" if self.size is not None and not self.gz else
                    "gzip-compressed" if self.gz else "not a regular file")
            raise ValueError(f"{self.path}: more than {self.limit} bytes of JSON text ({kind}); "
                             "stopped reading (raise the limit with max_bytes / --max-mb)")
        if self.progress is not None:
            self.progress(self.raw.tell() if self.size is not None else self.done, self.size)
        return data


class _Parser:
    """Cursor over the JSON text of one file; :meth:`events` yields batches of events."""

    def __init__(self, src: _Source) -> None:
        self.src = src
        self.path = src.path
        self.buf = b""
        self.pos = 0
        self.base = 0  # offset of buf[0] in the JSON text
        self.eof = False
        self.n_events = 0  # object elements of traceEvents
        self.begin_seen = False  # whether a '"B"' was in the text: "E" events matter then
        self.decoder = json.JSONDecoder(parse_float=str, parse_constant=str)

    # ---------------------------------------------------------------------------- reading

    def fill(self) -> bool:
        """Append more text (at least as much as is left, so a long value is read in a
        number of steps logarithmic in its length); False at the end."""
        if self.eof:
            return False
        more = self.src.read(max(_CHUNK, len(self.buf) - self.pos))
        if not more:
            self.eof = True
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos:] + more
        self.pos = 0
        return True

    def peek(self) -> int:
        """The next byte after whitespace, not consumed (-1 at the end of the text)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return -1

    def error(self, what: str, at: int | None = None) -> ValueError:
        """``what`` at a position of the buffer (the cursor by default)."""
        at = self.pos if at is None else at
        return ValueError(f"{self.path}: {what} at byte {self.base + at}")

    def truncated(self, where: str) -> ValueError:
        return ValueError(f"{self.path}: truncated JSON (the file ends inside {where})")

    def value(self) -> bytes:
        """The text of the JSON value at the cursor, which moves past it (not decoded;
        containers checked for nesting depth and bracket pairs)."""
        while True:
            c = self.peek()
            buf, pos = self.buf, self.pos
            if c == -1:
                raise self.truncated("a value")
            if c == 0x7B or c == 0x5B:  # '{' '['
                off, steps = structure(buf, pos)
                depth = np.cumsum(steps, dtype=np.int64)
                self._check_depth(depth, off, pos, 1)
                closed = np.flatnonzero(depth == 0)
                if closed.size:
                    k = int(closed[0]) + 1
                    bad = _mismatched(np.frombuffer(buf, dtype=np.uint8), pos + off[:k],
                                      steps[:k], depth[:k])
                    if bad >= 0:
                        i = pos + int(off[bad])
                        raise self.error(f"invalid JSON: {chr(buf[i])!r} does not close the "
                                         "bracket it should", i)
                    end = pos + int(off[k - 1]) + 1
                    self.pos = end
                    return buf[pos:end]
            elif c == 0x22:  # '"'
                m = _STRING.match(buf, pos)
                if m:
                    self.pos = m.end()
                    return m.group()
            else:
                m = _SCALAR.match(buf, pos)
                if not m:
                    raise self.error(f"invalid JSON: unexpected {chr(c)!r}")
                if m.end() < len(buf) or self.eof:
                    self.pos = m.end()
                    return m.group()
            if len(buf) - pos > MAX_EVENT_BYTES:
                raise self.error(f"a JSON value longer than {MAX_EVENT_BYTES} bytes (unbalanced "
                                 "brackets or quotes?) starts")
            if not self.fill():
                raise self.truncated("a value")

    def decode(self, text: bytes, at: int) -> Any:
        """Decode one value whose text starts at buffer position ``at``."""
        s = text.decode("utf-8")
        try:
            return self.decoder.decode(s)
        except json.JSONDecodeError as exc:
            byte = at + len(s[:exc.pos].encode("utf-8"))
            raise self.error(f"invalid JSON ({exc.msg})", byte) from None
        except ValueError as exc:  # e.g. an integer literal too long to convert
            raise self.error(f"invalid JSON value ({exc})", at) from None

    def _check_depth(self, depth: np.ndarray, off: np.ndarray, pos: int, outer: int) -> None:
        over = np.flatnonzero(depth > MAX_DEPTH - outer)
        if over.size:
            raise self.error(f"JSON nested deeper than {MAX_DEPTH} levels",
                             pos + int(off[over[0]]))

    # ---------------------------------------------------------------------------- document

    def events(self, meta: dict[str, Any]) -> Iterator[list[TraceEvent]]:
        """Batches of events; top-level metadata (``META_KEYS``) is stored into ``meta``."""
        first = self.peek()
        if first == 0x5B:  # '[': a bare array of events
            self.pos += 1
            yield from self._array(1)
            self._expect_end()
            return
        if first != 0x7B:
            self._not_an_object(first)
        self.pos += 1
        seen_events = False
        if self.peek() == 0x7D:
            self.pos += 1
        else:
            while True:
                if self.peek() != 0x22:
                    if self.peek() == -1:
                        raise self.truncated("the top-level object")
                    raise self.error("invalid JSON: expected a key (a string)")
                at = self.pos
                key = self.decode(self.value(), at)
                if self.peek() != 0x3A:  # ':'
                    raise self.error("invalid JSON: expected ':'")
                self.pos += 1
                if key == "traceEvents":
                    if seen_events:
                        raise self.error("'traceEvents' appears twice")
                    if self.peek() != 0x5B:
                        raise self.error("'traceEvents' is not an array")
                    self.pos += 1
                    seen_events = True
                    yield from self._array(2)
                else:
                    self.peek()
                    at = self.pos
                    text = self.value()
                    val = self.decode(text, at) if key in META_KEYS else None
                    if key in META_KEYS:
                        meta[key] = val
                c = self.peek()
                if c == 0x2C:  # ','
                    self.pos += 1
                    continue
                if c == 0x7D:  # '}'
                    self.pos += 1
                    break
                if c == -1:
                    raise self.truncated("the top-level object")
                raise self.error("invalid JSON: expected ',' or '}'")
        self._expect_end()
        if not seen_events:
            raise NotATrace(f"{self.path}: not a Chrome trace: the JSON object has no "
                            "'traceEvents' array")

    def _not_an_object(self, first: int) -> None:
        what = "an empty file" if first == -1 else describe_start(self.buf[self.pos:])
        msg = (f"{self.path}: not a Chrome trace: expected a JSON object with 'traceEvents' "
               f"or an array of events, found {what}")
        if first == -1 or not looks_like_json(first):
            raise ValueError(msg)
        try:  # a JSON scalar (a number in a .json file, say): valid JSON, not a trace
            at = self.pos
            self.decode(self.value(), at)
            self._expect_end()
        except ValueError:
            raise ValueError(msg) from None
        raise NotATrace(msg)

    def _expect_end(self) -> None:
        if self.peek() != -1:
            raise self.error("invalid JSON: extra data after the top-level value")

    def _array(self, outer: int) -> Iterator[list[TraceEvent]]:
        """Batches of the events of the array whose '[' was just consumed; ``outer`` is the
        nesting depth of its elements."""
        first, need_comma = True, False
        while True:
            c = self.peek()
            if c == -1:
                raise self.truncated("'traceEvents'")
            if c == 0x5D:  # ']'
                if not (first or need_comma):
                    raise self.error("invalid JSON: ',' before ']'")
                self.pos += 1
                return
            if need_comma:
                if c != 0x2C:
                    raise self.error("invalid JSON: expected ',' or ']' after an event")
                self.pos += 1
                need_comma = False
                continue
            first = False
            if c == 0x7B or c == 0x5B:
                batch = self._run(outer)
                if batch is None:
                    if len(self.buf) - self.pos > MAX_EVENT_BYTES:
                        raise self.error(f"an element of 'traceEvents' longer than "
                                         f"{MAX_EVENT_BYTES} bytes (unbalanced brackets?) "
                                         "starts")
                    if not self.fill():
                        raise self.truncated("'traceEvents'")
                    continue
                if batch:
                    yield batch
            else:  # a scalar element: not an event, but it must be JSON
                at = self.pos
                self.decode(self.value(), at)
            need_comma = True

    def _run(self, outer: int) -> list[TraceEvent] | None:
        """The events of the run of complete container elements at the cursor, separated by
        plain commas; None if not even the first is complete in the buffer. The cursor moves
        past the last element taken."""
        buf, p = self.buf, self.pos
        off, steps = structure(buf, p)
        depth = np.cumsum(steps, dtype=np.int64)
        neg = np.flatnonzero(depth < 0)  # the ']' closing the array, or a stray bracket
        if neg.size:
            off, steps, depth = off[:neg[0]], steps[:neg[0]], depth[:neg[0]]
        self._check_depth(depth, off, p, outer)
        at_zero = depth == 0
        closes = off[at_zero]
        n = closes.size
        if n == 0:
            return None
        opens = off[(depth == steps) & (steps == 1)][:n]
        a = np.frombuffer(buf, dtype=np.uint8)
        last = int(np.searchsorted(off, closes[-1])) + 1  # brackets of the complete elements
        bad = _mismatched(a, p + off[:last], steps[:last], depth[:last])
        if bad >= 0:
            i = p + int(off[bad])
            o = p + int(opens[np.searchsorted(opens, off[bad], side="right") - 1])
            raise self.error(f"invalid JSON in the element starting at byte {self.base + o}: "
                             f"{chr(buf[i])!r} does not close the bracket it should", i)
        if n > 1:
            ok = _gaps_ok(a, p + closes[:-1] + 1, opens[1:] - closes[:-1] - 1)
            if not ok.all():  # keep the elements before the first other separator
                n = int(np.argmin(ok)) + 1
                opens, closes = opens[:n], closes[:n]
        is_obj = a[p + opens] == 0x7B
        self.n_events += int(is_obj.sum())
        end = p + int(closes[-1]) + 1
        hits = [m.start() - p for m in _KEPT_CATEGORY.finditer(buf, p, end)]
        if not self.begin_seen:
            self.begin_seen = buf.find(b'"B"', p, end) >= 0
        if self.begin_seen:
            hits.extend(m.start() - p for m in _END_PHASE.finditer(buf, p, end))
        if buf.find(b"\\", p, end) >= 0:
            hits.extend(np.flatnonzero(a[p:end] == 0x5C).tolist())
        self.pos = end
        if not hits:
            return []
        el = np.unique(np.searchsorted(opens, np.asarray(hits), side="right") - 1)
        el = el[is_obj[el]]
        return self._events_of(buf, (p + opens[el]).tolist(), (p + closes[el] + 1).tolist())

    def _events_of(self, buf: bytes, starts: list[int], ends: list[int]) -> list[TraceEvent]:
        """Decode the object elements at the given spans (one json call) into events."""
        text = b"[" + b",".join([buf[s:e] for s, e in zip(starts, ends)]) + b"]"
        try:
            decoded = self.decoder.decode(text.decode("utf-8"))
        except ValueError:
            for s, e in zip(starts, ends):  # find the element at fault, and where
                self.decode(buf[s:e], s)
            raise
        base = self.base
        out = []
        for ev, s in zip(decoded, starts):
            rec = event_record(ev, base + s)
            if rec is not None:
                out.append(rec)
        return out


def _mismatched(a: np.ndarray, pos: np.ndarray, steps: np.ndarray, depth: np.ndarray) -> int:
    """Index of the first closing bracket of the wrong kind ('{' closed by ']', say), or -1.

    Brackets on one nesting level alternate open, close, open, ... in text order, so a
    stable sort by level puts each close right after its open (a radix sort: levels are
    small integers).
    """
    level = (depth + (steps < 0)).astype(np.int16)
    order = np.argsort(level, kind="stable")
    st, lv = steps[order], level[order]
    pair = (st[:-1] == 1) & (st[1:] == -1) & (lv[1:] == lv[:-1])
    opens, closes = order[:-1][pair], order[1:][pair]
    wrong = closes[a[pos[closes]] != a[pos[opens]] + 2]
    return int(wrong.min()) if wrong.size else -1


def _gaps_ok(a: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Whether each gap ``a[start:start + length]`` is whitespace around one comma."""
    ok = np.zeros(lengths.size, dtype=bool)
    for length in np.unique(lengths).tolist():
        sel = np.flatnonzero(lengths == length)
        if length <= 0:
            continue
        if length > 64:  # long runs of whitespace: rare, checked one by one
            ok[sel] = [_GAP.fullmatch(a[s:s + length].tobytes()) is not None
                       for s in starts[sel].tolist()]
            continue
        rows = a[starts[sel, None] + np.arange(length)]
        commas = rows == 0x2C
        ok[sel] = (commas.sum(axis=1) == 1) & (commas | _IS_WS[rows]).all(axis=1)
    return ok


def iter_events(path: str | os.PathLike[str], meta: dict[str, Any], counts: list[int], *,
                max_bytes: int | None = None, progress: Progress | None = None
                ) -> Iterator[list[TraceEvent]]:
    """Batches of the events the analysis uses from the trace at ``path``.

    The file holds a JSON object with a ``traceEvents`` array or a bare array of events.
    Top-level metadata goes into ``meta``; ``counts[0]`` is set to the number of events
    (object elements) read. ``max_bytes`` bounds the JSON text read (default: no bound for
    regular plain files, :data:`DEFAULT_MAX_BYTES` for gzip files, FIFOs and devices);
    ``progress(done, total)`` is called after each chunk. Raises ValueError (NotATrace for
    valid JSON that is not a trace) with the byte offset of the problem.
    """
    src = _Source(os.fspath(path), max_bytes, progress)
    try:
        parser = _Parser(src)
        yield from parser.events(meta)
        counts[0] = parser.n_events
    finally:
        src.close()


__all__ = ["CATEGORY_KIND", "DEFAULT_MAX_BYTES", "KIND_ANNOTATION", "KIND_KERNEL",
           "KIND_LAUNCH", "KIND_MEMCPY", "KIND_MEMSET", "META_KEYS", "NotATrace", "TraceEvent",
           "event_record", "iter_events"]
