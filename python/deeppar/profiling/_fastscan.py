"""Bytes-level scanner for Chrome-trace files: the fast path of the loader.

The file is read as bytes in chunks. For a chunk without backslashes, NumPy finds the
elements of ``traceEvents`` (braces outside strings, depth counting) and checks that only
separators lie between them; a regex finds the elements whose ``cat`` (a key of the element
itself) is kept, and one more regex, run once over those elements joined together, takes
their fields (``ph``, ``cat``, ``ts``, ``dur``, ``name``, ``pid``, ``tid``,
``args.device/stream/correlation``) in any key order. All of this runs in C; Python only
converts the fields of kept events. CPU ops and flow events are never decoded (so their
contents are not validated beyond strings and brackets).

Chunks with escapes, or a layout the expressions do not take, are decoded by ``json``
element by element with the same results. Anything else unexpected (not a trace,
truncated, invalid UTF-8 or JSON) raises :class:`Unsupported`, and the caller re-reads the
file with the text parser of ``_jsonstream``, which either succeeds or reports the error.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from typing import Any

_CHUNK = 1 << 22  # bytes read per refill

# record targets of "B"/"E" events (see the loader's _record): the event itself, and the
# target of an "E" without a category
BEGIN_END, NO_CAT = 5, -1


class Unsupported(Exception):
    """The fast path cannot read this input; use the text parser instead."""


# ------------------------------------------------------------------------------ grammar
# Applied only to chunks without backslashes, so a string is '"[^"]*"' (which the regex
# engine scans at memchr speed); chunks with escapes go to json.

_W = rb"[ \t\r\n]*+"
_S = rb'"[^"]*+"'
_INT = rb"-?(?:0|[1-9][0-9]*+)(?![.eE0-9])"
_NUM = rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][-+]?+[0-9]++)?+"
_NEXT = rb"(?:," + _W + rb'(?=")|(?=\}))'  # ',' before the next key, or the closing '}'
_ATOM = rb"(?:" + _S + rb"|[-+.0-9A-Za-z]++)"  # scalars of members the loader ignores


def _value(depth: int) -> bytes:
    """A JSON value nested at most ``depth`` containers deep (scalars checked loosely)."""
    if depth == 0:
        return _ATOM
    v = _value(depth - 1)
    return (rb"(?:" + _ATOM + rb"|\[" + _W + rb"(?:" + v + _W + rb"(?:," + _W
            + rb"(?=[^\]])|(?=\])))*+\]|\{" + _W + rb"(?:" + _S + _W + rb":" + _W + v + _W
            + _NEXT + rb")*+\})")


def _object(members: list[bytes]) -> bytes:
    return rb"\{" + _W + rb"(?:(?:" + rb"|".join(members) + rb")" + _W + _NEXT + rb")*+\}"


def _member(key: bytes, value: bytes) -> bytes:
    return rb'"' + key + rb'"' + _W + rb":" + _W + value


def _other(keys: tuple[bytes, ...], value: bytes) -> bytes:
    return rb'(?!"(?:' + rb"|".join(keys) + rb')")' + _S + _W + rb":" + _W + value


# Fields of a kept event, in any key order; every group is non-empty when present (findall
# gives b"" for a group that did not take part).
_EVENT = _object([
    _member(b"ph", rb"(" + _S + rb")"),
    _member(b"cat", rb"(" + _S + rb")"),
    _member(b"ts", rb"(" + _NUM + rb"|" + _S + rb")"),
    _member(b"dur", rb"(" + _NUM + rb"|" + _S + rb")"),
    _member(b"name", rb"(" + _S + rb")"),
    _member(b"pid", rb"(" + _INT + rb"|" + _S + rb")"),
    _member(b"tid", rb"(" + _INT + rb"|" + _S + rb")"),
    _member(b"args", rb"(?=(\{))" + _object([
        _member(b"device", rb"(" + _INT + rb")"),
        _member(b"stream", rb"(" + _INT + rb")"),
        _member(b"correlation", rb"(" + _INT + rb")"),
        _other((b"device", b"stream", b"correlation"), _value(2))])),
    _other((b"ph", b"cat", b"ts", b"dur", b"name", b"pid", b"tid", b"args"), _value(3)),
])
EVENTS = re.compile(_EVENT + rb"(?=\x00|\Z)")  # kept events joined by NUL bytes

_END_EVENT = re.compile(rb'"ph"' + _W + rb":" + _W + rb'"E"')
_WS = re.compile(_W)
_SEP = re.compile(rb"[ \t\r\n,]*+")
_GAP = re.compile(rb"[ \t\r\n]*+,[ \t\r\n]*+")
# tokens for finding the end of a value: whole strings and brackets; a lone '"' is a
# string cut off by the end of the buffer
_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+"|[{}\[\]"]', re.DOTALL)
_SCALAR_END = re.compile(rb"[^ \t\r\n,\]}]*+")
_KEY = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)


# ------------------------------------------------------------------------------ values

def number(raw: bytes) -> int | str:
    """A captured ``ts``/``dur`` as ``json.loads(..., parse_float=str)`` gives it: ints as
    int, floats (and strings) as their text."""
    if raw.isdigit():
        return int(raw)
    if raw[0] == 34:  # '"'
        return raw[1:-1].decode()
    if raw[0] == 45 and raw[1:].isdigit():  # '-'
        return int(raw)
    return raw.decode()


class _IdValues(dict):
    """Captured ``pid``/``tid`` bytes -> value (int, or str when quoted, None when absent)."""

    def __missing__(self, raw: bytes) -> int | str | None:
        val = None if not raw else raw[1:-1].decode() if raw[0] == 34 else int(raw)
        self[raw] = val
        return val


# ------------------------------------------------------------------------------ reader

class _Reader:
    """Bytes buffer over a (possibly gzipped) file, checked to be UTF-8 as it is read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        if self.fh.read(2) == b"\x1f\x8b":
            self.fh.seek(0)
            self.fh = gzip.GzipFile(fileobj=self.fh, mode="rb")
        else:
            self.fh.seek(0)
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.buf = b""
        self.pos = 0
        self.base = 0  # bytes dropped from the front of buf so far
        self.eof = False

    def close(self) -> None:
        fh = self.fh
        fh.close()
        if isinstance(fh, gzip.GzipFile) and fh.fileobj is not None:
            fh.fileobj.close()

    def fill(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at end of file."""
        if self.eof:
            return False
        try:
            more = self.fh.read(_CHUNK)
            self.utf8.decode(more, final=not more)  # raises on invalid UTF-8
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            raise Unsupported from None
        if not more:
            self.eof = True
            return False
        self.base += self.pos
        self.buf = self.buf[self.pos:] + more
        self.pos = 0
        return True

    def peek(self) -> int:
        """The next byte after whitespace (-1 at end of file), without consuming it."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return -1

    def value_end(self) -> int:
        """End of the JSON value at the cursor, refilling as needed."""
        while True:
            end = _value_end(self.buf, self.pos)
            if end >= 0:
                return end
            if not self.fill():
                raise Unsupported  # truncated: the text parser says so

    def take_value(self, decoder: json.JSONDecoder) -> Any:
        """Decode the JSON value at the cursor with ``decoder`` and move past it."""
        end = self.value_end()
        try:
            obj = decoder.decode(self.buf[self.pos:end].decode())
        except (ValueError, RecursionError):
            raise Unsupported from None
        self.pos = end
        return obj


def _value_end(buf: bytes, pos: int) -> int:
    """End offset of the JSON value starting at ``pos``, -1 if ``buf`` ends first.

    Only brackets and strings are followed; the slice is validated by whoever decodes it.
    """
    first = buf[pos:pos + 1]
    if first in (b"{", b"["):
        depth = 0
        for tok in _TOKEN.finditer(buf, pos):
            t = tok[0]
            if t == b'"':
                return -1
            if t in (b"{", b"["):
                depth += 1
            elif t in (b"}", b"]"):
                depth -= 1
                if depth == 0:
                    return tok.end()
        return -1
    if first == b'"':
        m = _KEY.match(buf, pos)
        return m.end() if m else -1
    end = _SCALAR_END.match(buf, pos).end()
    return end if end < len(buf) else -1


# ------------------------------------------------------------------------------ scanning

Record = tuple  # (target, ts, dur, name, pid, tid, device, stream, corr)
Batch = list  # records, yielded a chunk at a time


def iter_records(path: str, meta: dict[str, Any], wanted: dict[str, int],
                 named: frozenset[int], from_dict: Callable[[dict[str, Any]], Record | None],
                 counts: list[int], meta_keys: tuple[str, ...]) -> Iterator[Batch]:
    """Yield the records of the kept events of the trace at ``path``, in lists.

    ``wanted`` maps kept categories to a target code; events need ``ph == "X"`` (a
    missing ``ts`` is passed on as None, for the caller to count). ``named`` are the
    targets whose name is decoded. ``from_dict`` builds the record
    of an element that json decoded (or returns None). ``counts[0]`` counts the elements
    that are objects. Raises :class:`Unsupported` where the text parser must take over.
    """
    rd = _Reader(os.fspath(path))
    try:
        yield from _document(rd, meta, wanted, named, from_dict, counts, meta_keys)
    finally:
        rd.close()


def _document(rd: _Reader, meta: dict[str, Any], wanted: dict[str, int],
              named: frozenset[int], from_dict: Callable[[dict[str, Any]], Record | None],
              counts: list[int], meta_keys: tuple[str, ...]) -> Iterator[Batch]:
    decoder = json.JSONDecoder(parse_float=str)
    wanted_b = {b'"' + k.encode() + b'"': v for k, v in wanted.items()}
    first = rd.peek()
    if first == 0x5B:  # '[': a bare array of events
        rd.pos += 1
        yield from _array(rd, decoder, wanted_b, named, from_dict, counts)
        return
    if first != 0x7B:  # '{'
        raise Unsupported
    rd.pos += 1
    seen_events = False
    while True:
        ch = rd.peek()
        if ch == 0x7D:  # '}'
            break
        if ch == 0x2C:  # ','
            rd.pos += 1
            continue
        if ch != 0x22:  # '"'
            raise Unsupported
        key = rd.take_value(decoder)
        if rd.peek() != 0x3A:  # ':'
            raise Unsupported
        rd.pos += 1
        if key == "traceEvents":
            if rd.peek() != 0x5B:
                raise Unsupported
            rd.pos += 1
            seen_events = True
            yield from _array(rd, decoder, wanted_b, named, from_dict, counts)
        else:
            rd.peek()
            val = rd.take_value(decoder)
            if key in meta_keys:
                meta[key] = val
    if not seen_events:
        raise Unsupported


def _array(rd: _Reader, decoder: json.JSONDecoder, wanted: dict[bytes, int],
           named: frozenset[int], from_dict: Callable[[dict[str, Any]], Record | None],
           counts: list[int]) -> Iterator[Batch]:
    """Records of the array whose '[' was just consumed."""
    import numpy as np

    ids = _IdValues()
    cat_re = re.compile(rb'"cat"' + _W + rb":" + _W + rb'"(?:'
                        + rb"|".join(re.escape(c[1:-1]) for c in wanted) + rb')"')
    # "E" events may have no category: once the text shows a "B", they are candidates too
    end_re: re.Pattern[bytes] | None = None
    while True:
        rd.pos = _SEP.match(rd.buf, rd.pos).end()
        buf, pos = rd.buf, rd.pos
        if pos >= len(buf) - 1:
            if not rd.fill():
                raise Unsupported  # file ends inside the array
            continue
        if buf[pos] == 0x5D:  # ']'
            rd.pos = pos + 1
            return
        if end_re is None and buf.find(b'"B"', pos) >= 0:
            end_re = _END_EVENT
        if buf.find(b"\\", pos) < 0:
            got = _chunk(np, buf, pos, cat_re, end_re)
            if got is not None:
                end, n, spans = got
                counts[0] += n
                if spans:
                    yield _records(buf, spans, wanted, named, ids, decoder, from_dict)
                rd.pos = end
                if n:
                    continue
                if not rd.fill():  # one element longer than the buffer, or a cut file
                    raise Unsupported
                continue
        # escapes or an unusual layout: json decodes the elements of this buffer
        until = rd.base + len(buf)
        while rd.base + rd.pos < until:
            if rd.peek() == 0x5D:
                break
            ev = rd.take_value(decoder)
            if isinstance(ev, dict):
                counts[0] += 1
                rec = from_dict(ev)
                if rec is not None:
                    yield [rec]
            rd.pos = _SEP.match(rd.buf, rd.pos).end()


def _chunk(np: Any, buf: bytes, pos: int, cat_re: re.Pattern[bytes],
           end_re: re.Pattern[bytes] | None = None
           ) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Find the complete object elements in ``buf[pos:]`` (no backslashes in it).

    Returns (end of the last complete element, number of elements, spans of the elements
    whose category is kept), or None if the text between elements is not just separators.
    """
    a = np.frombuffer(buf, dtype=np.uint8)[pos:]
    quotes = np.flatnonzero(a == 34)
    br = np.flatnonzero((a & 0xF9) == 0x79)  # '{', '}' and the odd 'y'
    c = a[br]
    br = br[(c == 123) | (c == 125)]
    br = br[(np.searchsorted(quotes, br) & 1) == 0]  # outside strings
    step = np.where(a[br] == 123, 1, -1)
    depth = np.cumsum(step)
    below = np.flatnonzero(depth < 0)  # the closing '}' of the whole document
    if below.size:
        br, step, depth = br[:below[0]], step[:below[0]], depth[:below[0]]
    ends = br[(step < 0) & (depth == 0)] + 1
    n = int(ends.size)
    if n == 0:
        return pos, 0, []
    starts = br[(step > 0) & (depth == 1)][:n]
    # between elements only whitespace and one comma
    s_list = (starts + pos).tolist()
    e_list = (ends + pos).tolist()
    if _SEP.match(buf, pos).end() != s_list[0]:
        return None
    gaps = [buf[e:s] for e, s in zip(e_list, s_list[1:])]
    bad = {g for g in set(gaps) if not _GAP.fullmatch(g)}
    if bad:  # keep the elements before the first odd gap (e.g. the end of the array)
        n = next(i for i, g in enumerate(gaps) if g in bad) + 1
        starts, ends = starts[:n], ends[:n]
    end = e_list[n - 1]
    # kept categories, as keys of the element itself (depth 1)
    hits = [m.start() - pos for m in cat_re.finditer(buf, pos, end)]
    if end_re is not None:
        hits += [m.start() - pos for m in end_re.finditer(buf, pos, end)]
        hits.sort()
    if not hits:
        return end, n, []
    hits_a = np.asarray(hits)
    in_el = depth[np.searchsorted(br, hits_a) - 1] == 1
    idx = np.unique(np.searchsorted(starts, hits_a[in_el], side="right") - 1)
    return end, n, list(zip((starts[idx] + pos).tolist(), (ends[idx] + pos).tolist()))


def _records(buf: bytes, spans: list[tuple[int, int]], wanted: dict[bytes, int],
             named: frozenset[int], ids: _IdValues, decoder: json.JSONDecoder,
             from_dict: Callable[[dict[str, Any]], Record | None]) -> list[Record]:
    """Records of the elements at ``spans`` (candidates whose category is kept)."""
    blob = b"\x00".join([buf[s:e] for s, e in spans])
    rows = EVENTS.findall(blob)
    if len(rows) != len(spans) or blob.count(b'"args"') > sum(1 for r in rows if r[7]):
        # an element the expression does not take (or a repeated "args"): json decodes
        out = []
        for s, e in spans:
            try:
                ev = decoder.decode(buf[s:e].decode())
            except ValueError:
                raise Unsupported from None
            rec = from_dict(ev) if isinstance(ev, dict) else None
            if rec is not None:
                out.append(rec)
        return out
    get_target = wanted.get
    out = [
        (target, number(ts) if ts else None, number(dur) if dur else 0,
         name[1:-1].decode() if name and target in named else "",
         ids[pid], ids[tid], int(device) if device else None,
         int(stream) if stream else None, int(corr) if corr else None)
        for ph, cat, ts, dur, name, pid, tid, _args, device, stream, corr in rows
        if (target := get_target(cat)) is not None and ph == b'"X"']
    if b'"B"' in blob or b'"E"' in blob:
        out += _begin_end(rows, get_target, ids)
    return out


def _begin_end(rows: list[tuple], get_target: Callable[[bytes], int | None], ids: _IdValues
               ) -> list[Record]:
    """Records of the "B"/"E" rows (as the loader's ``_record`` gives them)."""
    out = []
    for ph, cat, ts, _dur, name, pid, tid, *_rest in rows:
        if ph != b'"B"' and ph != b'"E"':
            continue
        target = get_target(cat)
        if target is None and (ph == b'"B"' or cat):
            continue
        out.append((BEGIN_END, number(ts) if ts else None, ph[1:-1].decode(),
                    name[1:-1].decode() if name else "", ids[pid], ids[tid],
                    NO_CAT if target is None else target, None, None))
    return out
