"""Interval arithmetic on NumPy arrays: unions, covered length, intersections.

Intervals are half-open ``[start, end)`` in microseconds; zero-length intervals cover nothing.
"""

from __future__ import annotations

import numpy as np


def union(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of intervals as sorted, disjoint, non-empty segments (starts, ends)."""
    starts = np.asarray(starts, dtype=np.float64)
    ends = np.asarray(ends, dtype=np.float64)
    keep = ends > starts
    if not keep.all():
        starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        empty = np.empty(0, dtype=np.float64)
        return empty, empty.copy()
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    # a new segment starts where the start lies beyond everything seen so far
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, s.size - 1)
    return s[first], reach[last]


def length(seg_starts: np.ndarray, seg_ends: np.ndarray) -> float:
    """Total length of disjoint segments."""
    return float(np.sum(seg_ends - seg_starts)) if seg_starts.size else 0.0


def union_length(starts: np.ndarray, ends: np.ndarray) -> float:
    """Length of the union of intervals (concurrent time counted once)."""
    return length(*union(starts, ends))


def covered_before(seg_starts: np.ndarray, seg_ends: np.ndarray, x: np.ndarray) -> np.ndarray:
    """For each x, how much of the disjoint sorted segments lies before x."""
    x = np.asarray(x, dtype=np.float64)
    if seg_starts.size == 0:
        return np.zeros_like(x)
    cum = np.concatenate(([0.0], np.cumsum(seg_ends - seg_starts)))
    i = np.searchsorted(seg_starts, x, side="right") - 1  # last segment starting <= x
    inside = np.clip(x - seg_starts[np.maximum(i, 0)], 0.0,
                     (seg_ends - seg_starts)[np.maximum(i, 0)])
    return np.where(i >= 0, cum[np.maximum(i, 0)] + inside, 0.0)


def intersection_length(a: tuple[np.ndarray, np.ndarray],
                        b: tuple[np.ndarray, np.ndarray]) -> float:
    """Length of the intersection of two unions given as disjoint sorted segments."""
    if a[0].size == 0 or b[0].size == 0:
        return 0.0
    if a[0].size > b[0].size:
        a, b = b, a
    return float(np.sum(covered_before(b[0], b[1], a[1]) - covered_before(b[0], b[1], a[0])))


def subtract(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
             ) -> tuple[np.ndarray, np.ndarray]:
    """Segments of ``a`` not covered by ``b`` (both disjoint and sorted)."""
    if a[0].size == 0 or b[0].size == 0:
        return a[0].copy(), a[1].copy()
    pts = np.concatenate((a[0], a[1], b[0], b[1]))
    pts = np.unique(pts)
    lo, hi = pts[:-1], pts[1:]
    mid = (lo + hi) / 2
    in_a = np.searchsorted(a[0], mid, side="right") - 1
    in_a = (in_a >= 0) & (mid < a[1][np.maximum(in_a, 0)])
    in_b = np.searchsorted(b[0], mid, side="right") - 1
    in_b = (in_b >= 0) & (mid < b[1][np.maximum(in_b, 0)])
    keep = in_a & ~in_b
    return union(lo[keep], hi[keep])
