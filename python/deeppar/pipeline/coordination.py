"""Out-of-band coordination of a pipeline's ranks through the process group's key-value store:
the pre-step agreement and the failure notice.

*Agreement.* Before any message of a step, every rank shares what makes its program and its
messages consistent with the others' (a small picklable *payload*: schedule hash, rank mapping,
p2p shapes, input shapes, its argument problems...). The first step gathers every payload with
``all_gather_object`` (and adopts rank 0's random token, which names this pipeline's keys in the
store). Later steps go through the store: each rank writes ``None`` when its payload equals the
one of the last successful agreement, else the payload; it then waits for every rank's entry of
the same step. So a step whose arguments did not change anywhere costs one store write, one wait
and one read (no pickling of payloads, no collective on the process group), and any change on
any rank makes every rank see all payloads again.

*Failure notice.* A rank whose step raises after the agreement writes ``rank r: Error: message``
under the pipeline's failure key (the first notice wins) before finishing its part of the step's
communication with placeholder tensors (:meth:`~.comm.P2PComm.drain`), so that no peer waits for
a message that will never come. Peers read the key when their step ends (one store round trip)
and while waiting at the next agreement (polled every :data:`POLL_S` seconds), and raise
:class:`PipelineFailure` naming the failing rank and its exception. The notice and the polling
are :mod:`deeppar._coordination`'s, shared with the expert weight rearrangement.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

from deeppar._coordination import FailureNotice, default_store, describe, key_prefix, poll

#: seconds between two looks at the failure key while waiting for the other ranks' agreement
POLL_S = 1.0


class PipelineFailure(RuntimeError):
    """A pipeline step failed on another rank (named in the message, with its exception)."""


class StepCoordinator:
    """Agreement and failure notice of one pipeline over ``group`` (see the module doc)."""

    def __init__(self, group: dist.ProcessGroup | None, group_rank: int, world: int,
                 owner: str) -> None:
        self.group = group
        self.group_rank = group_rank
        self.world = world
        self.owner = owner  # "DualPipeV.step": the prefix of every error
        self.store: dist.Store | None = None
        self.prefix: str | None = None
        self._notice: FailureNotice | None = None
        self.step_no = 0
        #: every group rank's payload at the last successful agreement (None before the first)
        self.agreed: list[Any] | None = None

    # ------------------------------------------------------------------ agreement
    def exchange(self, payload: Any) -> tuple[list[Any], bool]:
        """Every group rank's payload of this step and whether all equal the last agreed ones
        (then the caller's checks of them passed already). Call :meth:`accept` once the
        payloads are found consistent."""
        unchanged = self.agreed is not None and payload == self.agreed[self.group_rank]
        if self.prefix is None:
            gathered: list[Any] = [None] * self.world
            token = os.urandom(8).hex()
            dist.all_gather_object(gathered, (payload, token), group=self.group)
            self.store = default_store()
            self.prefix = key_prefix("pipeline", self.group, gathered[0][1])
            self._notice = FailureNotice(self.store, f"{self.prefix}/failed")
            return [g[0] for g in gathered], False
        self.raise_if_failed()
        store = self.store
        assert store is not None
        keys = [self._key(self.step_no, r) for r in range(self.world)]
        store.set(keys[self.group_rank], pickle.dumps(None if unchanged else payload))
        self._wait(keys)
        values = [pickle.loads(v) for v in store.multi_get(keys)]
        if self.step_no >= 2:  # every rank has read it: all wrote this step's entry
            store.delete_key(self._key(self.step_no - 2, self.group_rank))
        self.step_no += 1
        if all(v is None for v in values):
            return list(self.agreed), True  # type: ignore[arg-type]
        if any(v is None for v in values) and self.agreed is None:
            raise RuntimeError(f"{self.owner}: the ranks' agreement state diverged")
        return [v if v is not None else self.agreed[r]  # type: ignore[index]
                for r, v in enumerate(values)], False

    def accept(self, payloads: Sequence[Any]) -> None:
        """Record ``payloads`` (found consistent on every rank) as the last agreement."""
        self.agreed = list(payloads)

    def _key(self, step_no: int, group_rank: int) -> str:
        return f"{self.prefix}/agree/{step_no}/{group_rank}"

    def _wait(self, keys: list[str]) -> None:
        """Wait for ``keys`` (polling ``check``, see :func:`deeppar._coordination.poll`),
        looking at the failure key every :data:`POLL_S` seconds, up to the store's timeout."""
        store = self.store
        assert store is not None
        deadline = time.monotonic() + store.timeout.total_seconds()

        def look() -> None:
            self.raise_if_failed()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.owner}: timed out waiting for every rank to start "
                                   "the step")

        poll(lambda: store.check(keys), look, POLL_S)

    def wait_until(self, done: Callable[[], bool], on_failure: Callable[[], None]) -> None:
        """Poll ``done()`` (e.g. a CUDA event's ``query``) until it holds, looking at the
        failure key every :data:`POLL_S` seconds; on a failure notice call ``on_failure()``
        (e.g. abort the communicator whose kernels wait) and raise :class:`PipelineFailure`."""
        def look() -> None:
            if self.failure() is not None:
                on_failure()
                self.raise_if_failed()

        poll(done, look, POLL_S, first_pause_s=2e-4, max_pause_s=2e-4)

    # ------------------------------------------------------------------ failure notice
    def post_failure(self, rank: int, exc: BaseException) -> str:
        """Publish this rank's failure unless another rank's came first; returns the notice in
        force (the first one)."""
        notice = describe(rank, exc)
        return notice if self._notice is None else self._notice.post(notice)

    def failure(self) -> str | None:
        """The failure notice of this pipeline, if a rank has posted one."""
        return None if self._notice is None else self._notice.read()

    def raise_if_failed(self) -> None:
        """Raise :class:`PipelineFailure` when a rank has posted a failure notice."""
        notice = self.failure()
        if notice is not None:
            raise PipelineFailure(f"{self.owner}: the pipeline failed on {notice}; this "
                                  "pipeline's step results are invalid and its process group's "
                                  "point-to-point state is undefined: create a new group")


__all__ = ["POLL_S", "PipelineFailure", "StepCoordinator"]
