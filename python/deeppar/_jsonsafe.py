"""Reading JSON that may be hostile: bounded size, bounded nesting, standard numbers only,
and one-line errors that say where.

``json.load`` on untrusted input can eat memory without bound (``/dev/zero``, a FIFO), raise
``RecursionError`` on deeply nested arrays, and accept ``NaN``, ``Infinity`` or ``1e999``
(which becomes infinity). :func:`load_json_file` refuses all of these with a ``ValueError``
naming the file and the byte offset. :func:`structure` (brackets and commas outside strings,
found with NumPy) is shared with the streaming trace parser.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

import numpy as np

MAX_DEPTH = 256  # arrays/objects nested deeper than this are refused (json would recurse)
DEFAULT_MAX_BYTES = 1 << 30  # for load_json_file: small configuration/measurement files

# what each byte is to the structure scanner: 1 opens, -1 closes, 0 nothing
_STEP = np.zeros(256, dtype=np.int8)
_STEP[[ord("{"), ord("[")]] = 1
_STEP[[ord("}"), ord("]")]] = -1
_JSON_START = frozenset(b' \t\r\n{["-0123456789tfn')


def structure(buf: bytes, start: int = 0, end: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (from ``start``) of the brackets outside strings in ``buf[start:end]``, and
    their steps (+1 opens, -1 closes).

    ``buf[start]`` must lie outside a string. Quotes escaped by an odd number of backslashes
    do not delimit strings. A string cut off by ``end`` hides everything after its quote.
    """
    a = np.frombuffer(buf, dtype=np.uint8, count=(len(buf) if end is None else end) - start,
                      offset=start)
    quotes = np.flatnonzero(a == 34)
    if quotes.size and buf.find(b"\\", start, end) >= 0:
        quotes = quotes[~_escaped(a, quotes)]
    # '{', '}', '[' and ']' (with 'Y', '_', 'y', DEL) in one pass, then the exact bytes
    offsets = np.flatnonzero((a & 0xD9) == 0x59)
    steps = _STEP[a[offsets]]
    brackets = steps != 0
    offsets, steps = offsets[brackets], steps[brackets]
    if quotes.size:
        outside = (np.searchsorted(quotes, offsets) & 1) == 0
        offsets, steps = offsets[outside], steps[outside]
    return offsets, steps


def _escaped(a: np.ndarray, quotes: np.ndarray) -> np.ndarray:
    """Whether each quote is preceded by an odd run of backslashes."""
    bs = np.flatnonzero(a == 92)
    if bs.size == 0:
        return np.zeros(quotes.size, dtype=bool)
    new_run = np.ones(bs.size, dtype=bool)
    new_run[1:] = bs[1:] != bs[:-1] + 1
    run_start = bs[np.maximum.accumulate(np.where(new_run, np.arange(bs.size), 0))]
    last = np.searchsorted(bs, quotes) - 1  # last backslash before each quote
    ok = last >= 0
    li = np.maximum(last, 0)
    adjacent = ok & (bs[li] == quotes - 1)
    run = bs[li] - run_start[li] + 1
    return adjacent & (run % 2 == 1)


def first_too_deep(steps: np.ndarray, depth0: int = 0, limit: int = MAX_DEPTH) -> int:
    """Index of the first step that nests deeper than ``limit`` (starting at ``depth0``),
    or -1."""
    if steps.size == 0:
        return -1
    depth = np.cumsum(steps, dtype=np.int64) + depth0
    over = np.flatnonzero(depth > limit)
    return int(over[0]) if over.size else -1


def describe_start(data: bytes) -> str:
    """How the first bytes of a file look, for errors about non-JSON input."""
    if not data:
        return "an empty file"
    head = data[:16]
    if head[0] < 32 or head[0] > 126:
        return f"binary data (first byte 0x{head[0]:02x})"
    return f"text starting with {head.decode('ascii', 'replace')!r}"


def looks_like_json(first: int) -> bool:
    """Whether a JSON text may start with this byte (whitespace included)."""
    return first in _JSON_START


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text} is out of range for a float")
    return x


def read_limited(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a file, refusing directories and anything longer than ``max_bytes``
    (which also bounds FIFOs and devices such as ``/dev/zero``)."""
    path = os.fspath(path)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path}: is a directory, expected a JSON file")
    if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
        raise ValueError(f"{path}: {st.st_size} bytes, more than the limit of {max_bytes} "
                         "for this JSON file")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes} bytes (not a regular file?); "
                         "refusing to read further")
    return data


def loads_strict(data: bytes, what: str) -> Any:
    """Decode standard JSON from ``data``; ``what`` names it in errors (e.g. the path).

    Refuses non-JSON at the first byte, nesting deeper than :data:`MAX_DEPTH`, ``NaN`` and
    ``Infinity``, floats that overflow, integers too long to convert, and invalid UTF-8,
    each with a one-line ``ValueError`` giving the byte offset.
    """
    stripped = data.lstrip(b" \t\r\n")
    if not stripped or not looks_like_json(stripped[0]):
        raise ValueError(f"{what}: not JSON: {describe_start(stripped)}")
    offsets, steps = structure(data)
    deep = first_too_deep(steps)
    if deep >= 0:
        raise ValueError(f"{what}: JSON nested deeper than {MAX_DEPTH} levels at byte "
                         f"{int(offsets[deep])}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what}: not UTF-8 text at byte {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        at = len(text[:exc.pos].encode("utf-8"))
        raise ValueError(f"{what}: invalid JSON at byte {at} (line {exc.lineno}, column "
                         f"{exc.colno}): {exc.msg}") from None
    except ValueError as exc:  # a constant, an overflowing float, a huge integer
        raise ValueError(f"{what}: invalid JSON value: {exc}") from None


def load_json_file(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> Any:
    """Read and decode a JSON file safely (see :func:`read_limited`, :func:`loads_strict`)."""
    return loads_strict(read_limited(path, max_bytes), os.fspath(path))


__all__ = ["DEFAULT_MAX_BYTES", "MAX_DEPTH", "describe_start", "first_too_deep",
           "load_json_file", "loads_strict", "looks_like_json", "read_limited", "structure"]
