"""Out-of-band coordination of a process group's ranks through its c10d key-value store.

A *failure notice* is one store key that the first failing rank writes (``compare_set``: the
first writer wins, later ones read what is in force), so every rank can report the same
failure, naming the rank, without a collective on a process group that a peer may have left.
:func:`poll` waits for a local condition while looking at such keys now and then; it sleeps
with a short backoff instead of calling ``store.wait`` with a short timeout, whose every expiry
makes c10d log a socket timeout warning.

Users: the pipeline runtime's step agreement (:mod:`deeppar.pipeline.coordination`) and the
expert weight rearrangement (:mod:`deeppar.eplb.rearrange`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch.distributed as dist


def default_store() -> dist.Store:
    """The store of the default process group (shared by its subgroups)."""
    return dist.distributed_c10d._get_default_store()


def key_prefix(kind: str, group: dist.ProcessGroup | None, token: str) -> str:
    """Prefix of the store keys of one ``kind`` of use of ``group``; ``token`` (agreed by the
    ranks, e.g. rank 0's random one) keeps uses of the same group apart."""
    name = "default" if group is None else dist.distributed_c10d._get_process_group_name(group)
    return f"deeppar/{kind}/{name}/{token}"


def describe(rank: int, exc: BaseException) -> str:
    """The notice text of ``exc`` raised on ``rank``: ``"rank r: Type: message"``."""
    return f"rank {rank}: {type(exc).__name__}: {exc}"


class FailureNotice:
    """One key of ``store`` holding the first notice posted (see the module doc)."""

    def __init__(self, store: dist.Store, key: str) -> None:
        self.store = store
        self.key = key

    def post(self, text: str) -> str:
        """Write ``text`` unless a notice is already there; returns the notice in force."""
        first = self.store.compare_set(self.key, "", text)
        return first.decode(errors="replace") if isinstance(first, bytes) else str(first)

    def read(self) -> str | None:
        """The notice in force, or None."""
        if not self.store.check([self.key]):
            return None
        return self.store.get(self.key).decode(errors="replace")


def poll(done: Callable[[], bool], look: Callable[[], None], every_s: float,
         first_pause_s: float = 5e-5, max_pause_s: float = 2e-3) -> None:
    """Call ``done()`` until it holds, sleeping between calls (doubling from ``first_pause_s``
    up to ``max_pause_s``), and call ``look()`` every ``every_s`` seconds; ``look`` stops the
    wait by raising (a failure notice, a deadline)."""
    next_look = time.monotonic() + every_s
    pause = first_pause_s
    while not done():
        time.sleep(pause)
        pause = min(2 * pause, max_pause_s)
        now = time.monotonic()
        if now >= next_look:
            next_look = now + every_s
            look()


__all__ = ["FailureNotice", "default_store", "describe", "key_prefix", "poll"]
