"""The store-based failure notice and polling shared by the pipeline runtime and the expert
weight rearrangement (``deeppar._coordination``), on an in-process store."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from deeppar._coordination import FailureNotice, describe, poll


def test_first_notice_wins_and_every_reader_sees_it() -> None:
    store = dist.HashStore()
    a, b = FailureNotice(store, "x/failed"), FailureNotice(store, "x/failed")
    assert a.read() is None
    first = describe(2, ValueError("bad slot"))
    assert first == "rank 2: ValueError: bad slot"
    assert a.post(first) == first
    assert b.post(describe(0, RuntimeError("later"))) == first
    assert a.read() == b.read() == first
    assert FailureNotice(store, "y/failed").read() is None  # another key, another notice


def test_poll_returns_once_done_and_looks_between() -> None:
    """``poll`` keeps calling ``done`` until it holds, and ``look`` at most once per interval
    (ordered events, no wall-clock threshold: a preempted thread only makes it longer)."""
    every = 0.02
    looks: list[float] = []
    calls = {"done": 0}

    def done() -> bool:
        calls["done"] += 1
        return len(looks) >= 3  # done only once look has run three times

    poll(done, lambda: looks.append(time.monotonic()), every_s=every)
    assert len(looks) == 3
    assert calls["done"] > len(looks)  # done is called between looks, not only at them
    gaps = [b - a for a, b in zip(looks, looks[1:])]
    # at most one look per interval (less 1 ms: the clock is read again inside look)
    assert all(g >= every - 1e-3 for g in gaps), gaps


def test_poll_stops_when_look_raises() -> None:
    store = dist.HashStore()
    notice = FailureNotice(store, "z/failed")

    def look() -> None:
        if notice.read() is not None:
            raise RuntimeError(notice.read())

    notice.post("rank 1: RuntimeError: gone")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1: RuntimeError: gone"):
        poll(lambda: False, look, every_s=0.01)
    assert time.monotonic() - t0 < 1.0
