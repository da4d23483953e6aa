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
:class:`PipelineFailure` naming the failing rank and its exception.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist

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
            self.store = dist.distributed_c10d._get_default_store()
            group_name = dist.distributed_c10d._get_process_group_name(self.group) \
                if self.group is not None else "default"
            self.prefix = f"deeppar/pipeline/{group_name}/{gathered[0][1]}"
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
        """Wait for ``keys``, looking at the failure key every :data:`POLL_S` seconds, up to
        the store's timeout. Polls with ``check`` (sleeping 50 us, doubling up to 2 ms) rather
        than ``store.wait`` with a short timeout, whose every expiry makes c10d log a socket
        timeout warning while a peer is slow."""
        store = self.store
        assert store is not None
        deadline = time.monotonic() + store.timeout.total_seconds()
        next_look = time.monotonic() + POLL_S
        pause = 5e-5
        while not store.check(keys):
            time.sleep(pause)
            pause = min(2 * pause, 2e-3)
            now = time.monotonic()
            if now >= next_look:
                next_look = now + POLL_S
                self.raise_if_failed()
                if now > deadline:
                    raise RuntimeError(f"{self.owner}: timed out waiting for every rank to "
                                       "start the step")

    def wait_until(self, done: Callable[[], bool], on_failure: Callable[[], None]) -> None:
        """Poll ``done()`` (e.g. a CUDA event's ``query``) until it holds, looking at the
        failure key every :data:`POLL_S` seconds; on a failure notice call ``on_failure()``
        (e.g. abort the communicator whose kernels wait) and raise :class:`PipelineFailure`."""
        next_look = time.monotonic() + POLL_S
        while not done():
            time.sleep(2e-4)
            if time.monotonic() >= next_look:
                next_look = time.monotonic() + POLL_S
                if self.failure() is not None:
                    on_failure()
                    self.raise_if_failed()

    # ------------------------------------------------------------------ failure notice
    @property
    def _failure_key(self) -> str:
        return f"{self.prefix}/failed"

    def post_failure(self, rank: int, exc: BaseException) -> str:
        """Publish this rank's failure unless another rank's came first; returns the notice in
        force (the first one)."""
        notice = f"rank {rank}: {type(exc).__name__}: {exc}"
        if self.store is None:
            return notice
        first = self.store.compare_set(self._failure_key, "", notice)
        return first.decode(errors="replace") if isinstance(first, bytes) else str(first)

    def failure(self) -> str | None:
        """The failure notice of this pipeline, if a rank has posted one."""
        if self.store is None or not self.store.check([self._failure_key]):
            return None
        return self.store.get(self._failure_key).decode(errors="replace")

    def raise_if_failed(self) -> None:
        """Raise :class:`PipelineFailure` when a rank has posted a failure notice."""
        notice = self.failure()
        if notice is not None:
            raise PipelineFailure(f"{self.owner}: the pipeline failed on {notice}; this "
                                  "pipeline's step results are invalid and its process group's "
                                  "point-to-point state is undefined: create a new group")


__all__ = ["POLL_S", "PipelineFailure", "StepCoordinator"]
