"""The comm plan (where sends and receives are posted) is deadlock-free under the NCCL model."""

from __future__ import annotations

import pytest

from deeppar.pipeline.comm_plan import build_plan, check_plan
from deeppar.pipeline.schedules import build

METHODS = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")


def _cases():
    for method in METHODS:
        for ranks in range(2, 9):
            if method == "dualpipe" and ranks % 2:
                continue
            for chunks in sorted({1, 2, ranks, ranks + 1, 2 * ranks, 2 * ranks + 1,
                                  2 * ranks + 2, 4 * ranks}):
                yield method, ranks, chunks


@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_plan_is_deadlock_free(method: str, forward_only: bool) -> None:
    checked = 0
    for m, ranks, chunks in _cases():
        if m != method:
            continue
        try:
            sched = build(method, ranks, chunks)
        except ValueError:
            continue
        dead = check_plan(build_plan(sched, forward_only))
        assert dead is None, f"{method} {ranks}x{chunks} forward_only={forward_only}: {dead}"
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("method,ranks,chunks", [("dualpipe", 4, 8), ("dualpipe", 8, 16),
                                                 ("dualpipev", 4, 8), ("dualpipev", 2, 5)])
def test_checker_finds_send_only_flush_deadlock(method: str, ranks: int, chunks: int) -> None:
    dead = check_plan(build_plan(build(method, ranks, chunks), False, "send_only_flush"))
    assert dead is not None and dead.stuck


def test_plan_channel_order_and_waits() -> None:
    sched = build("dualpipe", 4, 8)
    plan = build_plan(sched)
    for r, rp in enumerate(plan.ranks):
        got: dict[int, list] = {}
        for g in rp.groups:
            for key, src in g.recvs:
                got.setdefault(src, []).append(key)
        for src, keys in got.items():
            assert keys == plan.channels[(src, r)]
        befores = [g.before for g in rp.groups]
        assert befores == sorted(befores)
