"""Stream the events of a Chrome-trace JSON file without building the whole document.

``json.load`` keeps every event of a trace alive at once (several times the file size in
memory). Here the file is read in chunks (gzip decompressed on the fly) and each element of
``traceEvents`` is decoded by the C scanner (``raw_decode``) and handed to the caller, who
keeps only the fields it needs. Floats are kept as their literal text so that fractional
microsecond timestamps on epoch-sized clocks lose no precision.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from typing import Any

_CHUNK = 1 << 20  # characters read per refill
_LOW_WATER = 1 << 16  # refill when fewer characters than this are left
_WS = " \t\r\n"
_SEP = re.compile(r"[ \t\r\n,]*")
# top-level keys whose (small) values are kept as metadata
META_KEYS = ("schemaVersion", "distributedInfo", "deviceProperties", "traceName",
              "displayTimeUnit", "baseTimeNanoseconds")


def _open_text(path: str) -> io.TextIOBase:
    """Open ``path`` as UTF-8 text, transparently gunzipping (detected by magic bytes)."""
    if os.path.isdir(path):
        raise ValueError(f"trace path {path!r} is a directory, expected a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"trace file not found: {path!r}")
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")  # noqa: SIM115 - closed by the reader


class _Reader:
    """A refillable text buffer over a file with a cursor, for incremental decoding."""

    def __init__(self, path: str, fh: io.TextIOBase) -> None:
        self.path = path
        self.fh = fh
        self.buf = ""
        self.pos = 0
        self.consumed = 0  # characters dropped from the front of buf so far
        self.eof = False
        self.decoder = json.JSONDecoder(parse_float=str)

    def refill(self) -> bool:
        """Append the next chunk; False at end of file."""
        if self.eof:
            return False
        try:
            more = self.fh.read(_CHUNK)
        except EOFError as exc:  # gzip stream cut short
            raise ValueError(f"{self.path}: truncated gzip file ({exc})") from None
        except gzip.BadGzipFile as exc:
            raise ValueError(f"{self.path}: corrupt gzip file ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.path}: not UTF-8 text, so not a JSON trace ({exc})") from None
        if not more:
            self.eof = True
            return False
        self.consumed += self.pos
        self.buf = self.buf[self.pos:] + more
        self.pos = 0
        return True

    def skip_ws(self) -> str:
        """Skip whitespace and return the next character ('' at end of file)."""
        while True:
            buf, pos, n = self.buf, self.pos, len(self.buf)
            while pos < n and buf[pos] in _WS:
                pos += 1
            self.pos = pos
            if pos < n:
                return buf[pos]
            if not self.refill():
                return ""

    def value(self) -> Any:
        """Decode the JSON value at the cursor, refilling as needed."""
        self.skip_ws()
        while True:
            if len(self.buf) - self.pos < _LOW_WATER and not self.eof:
                self.refill()
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                if self.refill():
                    continue
                raise self.error(f"truncated or invalid JSON ({exc.msg})", exc.pos) from None
            self.pos = end
            return obj

    def error(self, what: str, pos: int | None = None) -> ValueError:
        at = self.consumed + (self.pos if pos is None else pos)
        return ValueError(f"{self.path}: {what} at character {at}")


class NotATrace(ValueError):
    """The file is valid JSON but not a Chrome trace (no ``traceEvents``, not an array)."""


def iter_trace_events(path: str, meta: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield the events of the Chrome trace at ``path`` one at a time.

    The file may hold a JSON object with a ``traceEvents`` array or a bare array of events.
    Small top-level values (``distributedInfo``, ``deviceProperties``, ...) are stored into
    ``meta`` as they are met. Raises ValueError for anything that is not such a trace.
    """
    fh = _open_text(os.fspath(path))
    with fh:
        rd = _Reader(os.fspath(path), fh)
        first = rd.skip_ws()
        if first == "[":
            rd.pos += 1
            yield from _iter_array(rd)
            return
        if first != "{":
            what = "an empty file" if first == "" else f"text starting with {first!r}"
            msg = (f"{path}: not a Chrome trace: expected a JSON object with "
                   f"'traceEvents' or an array of events, found {what}")
            raise NotATrace(msg) if first and _is_json_scalar(rd) else ValueError(msg)
        rd.pos += 1
        seen_events = False
        while True:
            ch = rd.skip_ws()
            if ch == "}":
                break
            if ch == ",":
                rd.pos += 1
                continue
            if ch != '"':
                if ch == "":
                    raise rd.error("truncated JSON (file ends inside the top-level object)")
                raise rd.error(f"invalid JSON (unexpected {ch!r})")
            key = rd.value()
            if rd.skip_ws() != ":":
                raise rd.error("invalid JSON (expected ':')")
            rd.pos += 1
            if key == "traceEvents":
                if rd.skip_ws() != "[":
                    raise rd.error("'traceEvents' is not an array")
                rd.pos += 1
                seen_events = True
                yield from _iter_array(rd)
            else:
                val = rd.value()
                if key in META_KEYS:
                    meta[key] = val
        if not seen_events:
            raise NotATrace(f"{path}: not a Chrome trace: the JSON object has no "
                            "'traceEvents' array")


def _is_json_scalar(rd: _Reader) -> bool:
    """Whether the rest of the file is one JSON value and nothing else."""
    try:
        rd.value()
    except ValueError:
        return False
    return rd.skip_ws() == ""


def _iter_array(rd: _Reader) -> Iterator[dict[str, Any]]:
    """Yield the object elements of the array whose '[' was just consumed."""
    sep = _SEP.match
    scan = rd.decoder.scan_once  # the C scanner itself: no Python frame per element
    while True:
        buf = rd.buf
        pos = sep(buf, rd.pos).end()
        rd.pos = pos
        if len(buf) - pos < _LOW_WATER and not rd.eof:
            rd.refill()
            continue
        if pos >= len(buf):
            raise rd.error("truncated JSON (file ends inside 'traceEvents')")
        if buf[pos] == "]":
            rd.pos = pos + 1
            return
        try:
            ev, rd.pos = scan(buf, pos)
        except (StopIteration, json.JSONDecodeError):
            ev = rd.value()  # refills until the element is complete, or raises
        if isinstance(ev, dict):
            yield ev
