"""Move expert weights between expert-parallel ranks to a new placement, all or nothing.

Rank ``r`` of a group of ``W`` ranks holds the physical slots ``[r * R/W, (r + 1) * R/W)`` of
every layer: per layer, a list (or dict) of tensors whose first dimension is the local slot
(e.g. ``w13 [R/W, 2 * I, H]`` and ``w2 [R/W, H, I]``). Given the placement in use, the new one
and ``source_slot`` (which old slot each new slot copies, as ``migrate`` returns it),
``rearrange_expert_weights`` leaves every rank holding exactly the new placement's weights,
bit for bit.

Phases; nothing is written into a slot unless every rank got everything:

1. validate: shapes, ids, that every new slot's source holds its expert, that the new
   placement covers every expert, and that every rank has the same plan (a digest) and the same
   per-slot tensor layout; every rank's verdict is shared (below), so every rank raises the
   same ``ValueError`` together;
2. allocate: receive buffers for the slots that come from another rank, a staged copy of
   the slots refilled from another slot of the same rank, and the slot index tensors of the
   commit; shared the same way;
3. transfer, layer by layer: one ``dist.batch_isend_irecv`` of the layer's sends (read from the
   old slots) and receives, waited for on a thread of this call; then every rank marks itself
   done and waits for the others' marks, and the first rank to see them all records the
   decision (below);
4. commit: ``index_copy_`` of the buffers and staged copies into their slots (no
   communication, no allocation: everything the commit uses exists before the decision).
   Only a device fault during these copies could still fail on one rank after the others
   committed; it is raised as it is, not as a notice.

Ranks coordinate through the c10d store (:mod:`deeppar._coordination`), never with a blocking
collective, so no rank blocks on a peer that failed. Each call's keys are named by the call's
number on its group (every rank makes the same calls). A verdict is shared by each rank writing
its own key and waiting for the others'. While a call lasts, each rank bumps a heartbeat key
every :data:`HEARTBEAT_S` seconds from a thread of its own.

Failures go through one key, the *decision* (first writer wins): either ``"ok"`` or a notice
naming the failing rank, and every rank raises the same ``RuntimeError`` with it:

- a rank that raises during the transfers posts its notice, then finishes its remaining sends
  and receives with placeholders, so its peers finish theirs and raise at the end of the
  phase (the process group stays usable);
- a rank that dies is seen, on gloo, by each peer whose transfer with it fails (gloo reports
  the closed connection to ``wait``), which names it and finishes its own transfers; on any
  backend and in any phase, by the ranks waiting for it once its heartbeat has been silent for
  ``heartbeat_timeout`` seconds, or has not beaten at all within ``heartbeat_timeout`` of the
  waiting rank's first look at it (so a rank that enters the call that much later than its
  peers is taken for dead too);
- a rank that cannot finish its messages (posting them failed, or an unexpected error) marks
  the call abandoned: the others stop within :data:`LOOK_S`;
- a rank that neither finishes nor fails but keeps its heartbeat (hung in a transfer) makes
  the others give up after ``transfer_timeout``, naming it.

A rank that gives up with device (NCCL) transfers in flight would wait for them forever: it
aborts the communicator of an explicit ``group`` (unusable after). It never aborts the default
group (``group=None``): that would abort every group of the process; it raises the same error
with a warning, and the default group must then be destroyed and initialised again (in
practice, the job restarted) before it carries other traffic.

Store keys: each rank deletes its key of a shared verdict once every rank has posted the next
one (all have read it). What remains after a call, a few bytes each: per rank its heartbeat
and done keys, and the decision (after a failure, also the keys of the phase that failed and
the abandon mark); each rank deletes its own at the first verdict of its next call on the same
group, so they do not accumulate. After the last call they stay until the store goes with the
process group (keys of a rank that died stay too).

Extra memory on a rank: one slot's bytes (the sum over its per-slot tensors) times the number
of its slots that are received or refilled locally; sends read the slots in place (a copy of
one layer's sends only for tensors whose slots are not contiguous) and, after a failure, one
zero slot per tensor as placeholder.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deeppar._coordination import FailureNotice, default_store, describe, key_prefix, poll
from deeppar.eplb.migration import check_placement

Weights = Sequence[Sequence[torch.Tensor] | Mapping[str, torch.Tensor]]

#: seconds between two looks at the store while a rank waits for transfers or for the others
LOOK_S = 0.05
#: seconds between two heartbeats of a rank inside a call
HEARTBEAT_S = 0.5
#: default ``heartbeat_timeout`` (seconds): heartbeat silence after which a rank that others
#: wait for is taken for dead
DEFAULT_HEARTBEAT_TIMEOUT_S = 30.0
#: default ``transfer_timeout`` (seconds): bound of the transfer phase when a rank hangs
DEFAULT_TRANSFER_TIMEOUT_S = 300.0
#: longest pause between two looks at keys of the store that a rank waits for: bounds the
#: load on the store's host while many ranks wait
_STORE_PAUSE_S = 0.01
#: longest wait for a thread of the call to end when the call ends
_JOIN_S = 1.0
_OK = "ok"  # the decision once every rank finished its transfers and none posted a failure
_STORE_LOST = ("the process group's store is unreachable (its host, rank 0 unless set "
               "otherwise, may have died)")
_calls: dict[str, int] = {}  # calls made on each group: names their store keys
#: store keys this rank wrote in the last call on each group, deleted during the next call
#: (once every rank has entered it, so has left the last one)
_keys_to_delete: dict[str, list[str]] = {}


@dataclass(frozen=True)
class RearrangeStats:
    """What one rank did."""

    sent: int  # slot copies sent to other ranks
    received: int  # slots received from other ranks
    local_copies: int  # slots refilled from another slot of this rank
    bytes_sent: int
    bytes_received: int
    extra_bytes: int  # receive buffers and staged local copies held at once


def _tensors(layer: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(layer, Mapping):
        return [layer[k] for k in sorted(layer)]
    return list(layer)


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _layout(weights: Weights) -> str:
    """Digest of the per-slot shapes and dtypes (must match on every rank)."""
    parts = [(tuple(t.shape[1:]), str(t.dtype)) for layer in weights for t in _tensors(layer)]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _first_error(errors: Sequence[str | None], what: str, exc: type[Exception]) -> None:
    """Raise ``exc`` naming the first rank that reported an error (the same on every rank)."""
    for rank, error in enumerate(errors):
        if error is not None:
            raise exc(f"{what} (rank {rank}): {error}")


def _check_local(weights: Weights, current: torch.Tensor, new: torch.Tensor,
                 source: torch.Tensor, world: int) -> tuple[torch.Tensor, ...]:
    """The three maps as CPU int64, checked; ValueError/TypeError naming what is wrong."""
    if not isinstance(new, torch.Tensor) or new.dim() != 2:
        raise ValueError("new_phy2log must be a [layers, replicas] tensor")
    layers, replicas = new.shape
    experts = int(current.max()) + 1 if isinstance(current, torch.Tensor) and current.numel() \
        else 1
    old = check_placement(current, layers, experts, replicas, name="current")
    new = check_placement(new, layers, experts, replicas, name="new")
    if replicas % world:
        raise ValueError(f"num_replicas ({replicas}) must be a multiple of the group size "
                         f"({world})")
    if not isinstance(source, torch.Tensor) or tuple(source.shape) != (layers, replicas) or (
        source.dtype.is_floating_point or source.dtype == torch.bool
    ):
        raise ValueError(f"source_slot must be an integer tensor [{layers}, {replicas}]")
    src = source.detach().to("cpu", torch.int64)
    if int(src.min()) < 0 or int(src.max()) >= replicas:
        raise ValueError(f"source_slot holds a slot outside [0, {replicas})")
    wrong = (old.gather(1, src) != new).nonzero()
    if wrong.numel():
        layer, slot = wrong[0].tolist()
        raise ValueError(f"source_slot[{layer}, {slot}] = {int(src[layer, slot])} does not hold "
                         f"expert {int(new[layer, slot])} in the current placement")
    per_rank = replicas // world
    if len(weights) != layers:
        raise ValueError(f"weights has {len(weights)} layers, the plan {layers}")
    for layer, held in enumerate(weights):
        tensors = _tensors(held)
        if not tensors:
            raise ValueError(f"weights[{layer}] holds no tensor")
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"weights[{layer}] must hold tensors, got {type(t).__name__}")
            if t.dim() < 1 or t.shape[0] != per_rank:
                raise ValueError(f"weights[{layer}] has a tensor of shape {tuple(t.shape)}; its "
                                 f"first dimension must be the {per_rank} local slots")
    return old, new, src


def _allocate_buffers(like: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """Receive buffers for ``count`` slots of each tensor in ``like``."""
    return [torch.empty((count, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in like]


def _send_tensor(tensors: torch.Tensor, local_slot: int) -> torch.Tensor:
    """What a send of ``local_slot`` reads: the slot itself when it is contiguous, else a copy."""
    return tensors[local_slot].contiguous()


def _check_seconds(name: str, value: object, at_least: float = 0.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    if value < at_least:
        raise ValueError(f"{name} must be at least {at_least:g} s (two heartbeat periods), got "
                         f"{value!r}")


def _check_heartbeat_timeout(value: object) -> None:
    """Below two heartbeat periods a live rank could be taken for dead."""
    _check_seconds("heartbeat_timeout", value, at_least=2 * HEARTBEAT_S)


def _heartbeat_timeout_or_default(value: object) -> float:
    """``value`` if valid, else the default (used until the shared verdict rejects it)."""
    try:
        _check_heartbeat_timeout(value)
    except ValueError:
        return DEFAULT_HEARTBEAT_TIMEOUT_S
    return float(value)  # type: ignore[arg-type]


def _slot_index(slots: list[int], device: torch.device) -> torch.Tensor:
    """Index tensor of local ``slots`` for the commit's ``index_copy_``."""
    return torch.tensor(slots, dtype=torch.int64, device=device)


def _error(notice: str) -> RuntimeError:
    return RuntimeError(f"expert weight rearrangement failed, nothing changed: {notice}")


class _Heartbeat:
    """Bumps ``key`` every :data:`HEARTBEAT_S` seconds on a thread of its own until stopped
    (the store client serialises its operations, so threads may share it)."""

    def __init__(self, store: dist.Store, key: str) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            with contextlib.suppress(Exception):  # the store is gone: nothing to tell
                while True:
                    store.add(key, 1)
                    if self._stop.wait(HEARTBEAT_S):
                        return

        self._thread = threading.Thread(target=beat, name="deeppar-eplb-heartbeat",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating; waits briefly for the thread (a store operation that hangs on a lost
        store keeps it, as a daemon, until the store times out)."""
        self._stop.set()
        self._thread.join(timeout=_JOIN_S)


class _Waiter:
    """Waits for posted P2P works, in order, on a thread of its own. The calling thread polls
    it instead of waiting: on gloo, a peer's death reaches only ``wait()`` (``is_completed()``
    stays False) and a ``wait(timeout)`` that expires closes the connection. On a device
    (NCCL), ``wait()`` only orders streams: the thread then polls ``is_completed()``. A work
    that never ends keeps the thread, and the tensors of the works queued after it, alive: no
    transfer ever lands in freed memory."""

    def __init__(self, on_device: bool) -> None:
        self.on_device = on_device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._peers: list[tuple[int, ...]] = []  # group peers of each work, in order
        self.finished = 0  # written by the waiting thread only
        self.errors: list[tuple[tuple[int, ...], BaseException]] = []
        self._thread = threading.Thread(target=self._run, name="deeppar-eplb-transfer-wait",
                                        daemon=True)
        self._thread.start()

    def add(self, works: Sequence[dist.Work], peers: Sequence[int]) -> None:
        """``peers``: of each op posted; one work per op, or (NCCL) one for the batch."""
        per_work = [(p,) for p in peers] if len(works) == len(peers) \
            else [tuple(sorted(set(peers)))] * len(works)
        self._peers += per_work
        for item in zip(works, per_work):
            self._queue.put(item)

    def idle(self) -> bool:
        return self.finished == len(self._peers)

    def pending_peers(self) -> list[int]:
        return sorted({p for peers in self._peers[self.finished:] for p in peers})

    def close(self) -> None:
        """End the thread once the works queued are finished, and wait for it if they are
        (one waiting for a work that never ends stays, as a daemon: see the class doc)."""
        self._queue.put(None)
        if self.idle():
            self._thread.join(timeout=_JOIN_S)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            work, peers = item
            try:
                work.wait()
                while self.on_device and not work.is_completed():
                    time.sleep(1e-4)
            except Exception as exc:  # noqa: BLE001 - reported as this peer's failure
                self.errors.append((peers, exc))
            self.finished += 1


class _Call:
    """One call on one rank (see the module doc): its store keys and heartbeat, the shared
    verdicts, the transfers and the decision. Every wait polls the store; a failure anywhere
    makes every rank raise the same error (:meth:`together` marks those)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world: int,
                 transfer_timeout: float, heartbeat_timeout: float, on_device: bool) -> None:
        self.group, self.rank, self.world = group, rank, world
        self.transfer_timeout, self.on_device = transfer_timeout, on_device
        self.heartbeat_timeout = _heartbeat_timeout_or_default(heartbeat_timeout)
        self.root = key_prefix("eplb-rearrange", group, "")
        number = _calls.get(self.root, 0)
        _calls[self.root] = number + 1
        self.prefix = f"{self.root}{number}"
        self.store = default_store()
        self.decision = FailureNotice(self.store, f"{self.prefix}/decision")
        self.abandoned_key = f"{self.prefix}/abandoned"
        self.beat_keys = [f"{self.prefix}/beat/{r}" for r in range(world)]
        self.own_keys = [self.beat_keys[rank]] + (
            [self.decision.key, self.abandoned_key] if rank == 0 else [])
        self.beats: dict[int, tuple[int, float]] = {}  # rank: (last count, when it changed)
        self.next_beat_look = time.monotonic() + HEARTBEAT_S
        # before the transfers, wait for a peer as long as a collective would
        self.deadline = time.monotonic() + self.store.timeout.total_seconds()
        self.late = "did not get there within the process group's timeout"
        self.cause: BaseException | None = None  # this rank's own failure
        self.failed_together = False
        self.decided = False  # every rank got everything: the commit follows
        self.transferring = False
        self.waiter: _Waiter | None = None
        self.reported = 0  # waiter errors already posted
        self.shared_key: str | None = None  # this rank's key of the last verdict shared
        self.heartbeat = _Heartbeat(self.store, self.beat_keys[rank])

    def together(self, exc: Exception) -> Exception:
        """``exc``, which every rank raises (no notice needed)."""
        self.failed_together = True
        return exc

    def close(self) -> None:
        self.heartbeat.stop()
        if self.waiter is not None:
            self.waiter.close()
        _keys_to_delete.setdefault(self.root, []).extend(self.own_keys)

    def _drop_shared_key(self) -> None:
        """Delete this rank's key of the last verdict: called once every rank has posted a
        later key, so every rank has read it."""
        if self.shared_key is not None:
            self.store.delete_key(self.shared_key)
            self.own_keys.remove(self.shared_key)
            self.shared_key = None

    # ------------------------------------------------------------------ verdicts
    def share(self, name: str, payload: Any) -> list[Any]:
        """Every rank's ``payload``: an all-gather through the store that never blocks on a
        rank that failed. The first one also deletes this rank's keys of the last call."""
        keys = [f"{self.prefix}/{name}/{r}" for r in range(self.world)]
        self.own_keys.append(keys[self.rank])
        self.store.set(keys[self.rank], pickle.dumps(payload))
        self._wait(lambda: self.store.check(keys),
                   lambda: [r for r, k in enumerate(keys) if not self.store.check([k])], True)
        notice = self.decision.read()  # a late rank: the peers may have given up already
        if notice is not None and notice != _OK:
            raise self.together(_error(notice))
        for key in _keys_to_delete.pop(self.root, []):  # every rank has left the last call
            self.store.delete_key(key)
        self._drop_shared_key()
        self.shared_key = keys[self.rank]
        return [pickle.loads(v) for v in self.store.multi_get(keys)]

    # ------------------------------------------------------------------ transfers
    def transfer(self, layers: int,
                 layer_ops: Callable[[int, bool], list[tuple[dist.P2POp, int]]]) -> None:
        """Run every layer's transfers (``layer_ops(layer, placeholders)``: the layer's ops and
        their group peers), then wait for every rank's and record the decision; returns when
        every rank got everything."""
        self.transferring = True
        self.deadline = time.monotonic() + self.transfer_timeout
        self.late = f"not finished after transfer_timeout={self.transfer_timeout:g} s (hung?)"
        self.waiter = _Waiter(self.on_device)
        for layer in range(layers):
            ops = self._build(layer, layer_ops)
            if not ops:
                continue
            try:
                works = dist.batch_isend_irecv([op for op, _ in ops])
            except Exception as exc:  # noqa: BLE001 - ops half posted: cannot drain
                raise self.abandon(exc) from exc
            self.waiter.add(works, [peer for _, peer in ops])
            self._wait(self.waiter.idle, self.waiter.pending_peers, False, 2e-3)
            if self.on_device:  # order this thread's stream after the transfers
                for work in works:
                    with contextlib.suppress(Exception):  # reported by the waiter
                        work.wait()
            self._report_lost_peers()
        done = [f"{self.prefix}/done/{r}" for r in range(self.world)]
        self.own_keys.append(done[self.rank])
        self.store.set(done[self.rank], "1")
        self._wait(lambda: self.store.check(done),
                   lambda: [r for r, k in enumerate(done) if not self.store.check([k])], True)
        self._drop_shared_key()
        decision = self.decision.post(_OK)
        if decision != _OK:
            raise self.together(_error(decision)) from self.cause
        self.decided = True

    def _build(self, layer: int, layer_ops) -> list[tuple[dist.P2POp, int]]:
        if self.cause is None:
            try:
                return layer_ops(layer, False)
            except Exception as exc:  # noqa: BLE001 - any failure aborts every rank
                self.cause = exc
                self.decision.post(describe(self.rank, exc))
        return layer_ops(layer, True)  # if this fails too, the caller abandons

    def _report_lost_peers(self) -> None:
        """Post a notice for each peer whose transfer failed (on gloo: the peer died)."""
        assert self.waiter is not None
        for peers, exc in self.waiter.errors[self.reported:]:
            first_line = str(exc).strip().split("\n")[0]
            names = ", ".join(map(str, peers))
            self.decision.post(f"rank {names}: its transfer with rank {self.rank} failed (the "
                               f"process died or its connection broke): {first_line}")
        self.reported = len(self.waiter.errors)

    # ------------------------------------------------------------------ failures
    def abandon(self, exc: BaseException) -> Exception:
        """This rank failed outside the agreed paths and cannot finish its messages: post its
        failure and make every rank stop waiting now. Returns the error to raise."""
        self.cause = self.cause or exc
        notice = self.decision.post(describe(self.rank, exc))
        self.store.set(self.abandoned_key, str(self.rank))
        return self._give_up(notice)

    def _give_up(self, notice: str) -> Exception:
        """The error of a rank that stops waiting. Device transfers would wait forever: abort
        the communicator then, of an explicit group only (aborting the default group aborts
        every group of the process); the group is unusable after."""
        in_flight = self.waiter is not None and not self.waiter.idle()
        if self.transferring and self.on_device and in_flight:
            abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if _is_default_group(self.group) or abort is None:
                warnings.warn("expert weight rearrangement gave up with device transfers in "
                              "flight; the process group was not aborted (the default group, "
                              "or no abort in this torch): destroy and initialise it again "
                              "before further use", RuntimeWarning, stacklevel=3)
            else:
                abort(self.group)
        return self.together(_error(notice))

    def _wait(self, done: Callable[[], bool], awaited: Callable[[], list[int]],
              stop_on_notice: bool, max_pause_s: float = _STORE_PAUSE_S) -> None:
        """Poll ``done()``; look at the store every :data:`LOOK_S` seconds and at the
        heartbeats of the ``awaited()`` ranks every :data:`HEARTBEAT_S`."""
        poll(done, lambda: self._look(awaited, stop_on_notice), LOOK_S,
             max_pause_s=max_pause_s)

    def _look(self, awaited: Callable[[], list[int]], stop_on_notice: bool) -> None:
        if self.store.check([self.abandoned_key]):
            raise self._give_up(self.decision.read() or "a rank abandoned the call")
        if stop_on_notice:  # (during transfers, a failed rank finishes them first)
            notice = self.decision.read()
            if notice is not None and notice != _OK:
                raise self.together(_error(notice)) from self.cause
        now = time.monotonic()
        if now < self.next_beat_look:
            return
        self.next_beat_look = now + HEARTBEAT_S
        ranks = awaited()
        silent = [r for r in ranks if self._silent(r, now)]
        if silent:
            notice = self.decision.post(
                f"rank {', '.join(map(str, silent))}: no heartbeat for "
                f"{self.heartbeat_timeout:g} s (the process died, is stuck or never entered "
                f"the call), seen by rank {self.rank}")
        elif now > self.deadline and ranks:
            notice = self.decision.post(f"rank {', '.join(map(str, ranks))}: {self.late}, "
                                        f"seen by rank {self.rank}")
        else:
            return
        if notice != _OK:  # (else every rank is done: the wait ends by itself)
            raise self._give_up(notice) from self.cause

    def _silent(self, rank: int, now: float) -> bool:
        """Whether ``rank``'s heartbeat count has not changed for ``heartbeat_timeout``
        seconds since this rank first looked at it (a rank that never beat included)."""
        count = self.store.add(self.beat_keys[rank], 0)
        last = self.beats.get(rank)
        if last is None or count != last[0]:
            self.beats[rank] = (count, now)
            return False
        return now - last[1] > self.heartbeat_timeout


def _is_default_group(group: dist.ProcessGroup | None) -> bool:
    return group is None or group is dist.GroupMember.WORLD


def _on_device(weights: Weights) -> bool:
    try:
        return _tensors(weights[0])[0].device.type != "cpu"
    except Exception:  # noqa: BLE001 - malformed weights: validation reports them
        return False


@torch.no_grad()
def rearrange_expert_weights(
    weights: Weights,
    current_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    source_slot: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    transfer_timeout: float = DEFAULT_TRANSFER_TIMEOUT_S,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
) -> RearrangeStats:
    """Rewrite this rank's expert ``weights`` in place from ``current_phy2log [L, R]`` to
    ``new_phy2log [L, R]``; a collective: every rank of ``group`` calls it with the same plan.

    ``source_slot [L, R]``: old slot whose weights each new slot receives (``Migration``'s).
    Raises the same ValueError on every rank (nothing moved) for a bad or disagreeing plan, and
    the same RuntimeError on every rank (nothing changed), naming the failing rank, if a rank
    fails to allocate or transfer, or dies (see the module doc). ``transfer_timeout``
    (seconds) bounds the transfer phase for a rank that hangs; ``heartbeat_timeout``
    (seconds, at least two heartbeat periods) is how long a silent rank (dead, or not in the
    call yet) is waited for.
    On a device, giving up with transfers in flight aborts an explicit ``group``; the default
    group is not aborted and must be initialised again (see the module doc).
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    call = _Call(group, rank, world, transfer_timeout, heartbeat_timeout, _on_device(weights))
    try:
        return _rearrange(call, weights, current_phy2log, new_phy2log, source_slot,
                          heartbeat_timeout)
    except Exception as exc:
        # decided: only the commit's copies ran (a device fault), not a failure to share
        if call.failed_together or call.decided:
            raise
        if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
            raise _error(_STORE_LOST) from exc
        try:
            error = call.abandon(exc)  # e.g. a failure while finishing its transfers
        except (dist.DistNetworkError, dist.DistStoreError):
            error = _error(_STORE_LOST)
        raise error from exc
    except BaseException as exc:
        with contextlib.suppress(Exception):
            call.abandon(exc)
        raise
    finally:
        call.close()


def _rearrange(call: _Call, weights: Weights, current_phy2log: torch.Tensor,
               new_phy2log: torch.Tensor, source_slot: torch.Tensor,
               heartbeat_timeout: float) -> RearrangeStats:
    rank, world = call.rank, call.world
    error = None
    digest = layout = ""
    try:
        _check_seconds("transfer_timeout", call.transfer_timeout)
        _check_heartbeat_timeout(heartbeat_timeout)
        old, new, src = _check_local(weights, current_phy2log, new_phy2log, source_slot, world)
        digest, layout = _digest(old, new, src), _layout(weights)
    except (ValueError, TypeError) as exc:
        error = str(exc)
    verdicts = call.share("valid", (error, digest, layout))
    try:
        _first_error([e for e, _, _ in verdicts], "invalid expert transfer plan", ValueError)
        if len({d for _, d, _ in verdicts}) > 1:
            raise ValueError("ranks disagree on the expert transfer plan: plan digests "
                             + ", ".join(f"rank {r}: {d}" for r, (_, d, _) in enumerate(verdicts)))
        if len({lay for _, _, lay in verdicts}) > 1:
            raise ValueError("ranks disagree on the expert weight layout (per-slot shapes or "
                             "dtypes differ between ranks)")
    except ValueError as exc:
        raise call.together(exc) from None

    layers, replicas = new.shape
    per_rank = replicas // world
    # Per layer, local slot indices: incoming [(dst, src rank)], local [(dst, src)],
    # outgoing [(src, dst rank)].
    plans = []
    for layer in range(layers):
        incoming, local, outgoing = [], [], []
        for s, from_slot in enumerate(src[layer].tolist()):
            sr, dr = from_slot // per_rank, s // per_rank
            if from_slot == s:  # the slot keeps its expert (checked: old[src] == new)
                continue
            if sr == dr == rank:
                local.append((s - rank * per_rank, from_slot - rank * per_rank))
            elif dr == rank:
                incoming.append((s - rank * per_rank, sr))
            elif sr == rank:
                outgoing.append((from_slot - rank * per_rank, dr))
        plans.append((incoming, local, outgoing))

    # Phase 2: buffers for what arrives, staged copies of what is refilled locally, and the
    # commit's copies (slot index, destination, source), so the commit allocates nothing.
    error = None
    buffers: list[list[torch.Tensor]] = []
    commits: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    stats = None
    try:
        extra = 0
        slot_bytes = []
        for layer, (incoming, local, _) in enumerate(plans):
            tensors = _tensors(weights[layer])
            buffers.append(_allocate_buffers(tensors, len(incoming)))
            staged = [t[[f for _, f in local]] for t in tensors]  # advanced indexing: a copy
            for slots, sources in ((incoming, buffers[-1]), (local, staged)):
                if slots:
                    index = _slot_index([d for d, _ in slots], tensors[0].device)
                    commits += [(index, t, s) for t, s in zip(tensors, sources)]
            slot_bytes.append(sum(t[0].numel() * t.element_size() for t in tensors))
            extra += slot_bytes[-1] * (len(incoming) + len(local))
        stats = RearrangeStats(
            sent=sum(len(p[2]) for p in plans),
            received=sum(len(p[0]) for p in plans),
            local_copies=sum(len(p[1]) for p in plans),
            bytes_sent=sum(b * len(p[2]) for b, p in zip(slot_bytes, plans)),
            bytes_received=sum(b * len(p[0]) for b, p in zip(slot_bytes, plans)),
            extra_bytes=extra,
        )
    except Exception as exc:  # noqa: BLE001 - any failure (OOM, device error) aborts all ranks
        error = f"{type(exc).__name__}: {exc}"
        buffers, commits = [], []
    errors = call.share("allocated", error)
    try:
        _first_error(errors, "expert weight rearrangement aborted, nothing changed",
                     RuntimeError)
    except RuntimeError as exc:
        raise call.together(exc) from None

    # Phase 3: the transfers, layer by layer, and the decision.
    placeholders: dict[tuple, torch.Tensor] = {}

    def placeholder(t: torch.Tensor, _local_slot: int) -> torch.Tensor:
        key = (tuple(t.shape[1:]), t.dtype, t.device)
        if key not in placeholders:
            placeholders[key] = torch.zeros(t.shape[1:], dtype=t.dtype, device=t.device)
        return placeholders[key]

    def layer_ops(layer: int, placeholders_only: bool) -> list[tuple[dist.P2POp, int]]:
        return _layer_ops(plans[layer], _tensors(weights[layer]), buffers[layer], src[layer],
                          rank, per_rank, call.group, placeholder if placeholders_only
                          else _send_tensor)

    call.transfer(layers, layer_ops)

    # Phase 4: commit, copies into existing storage only.
    for index, dst, source in commits:
        dst.index_copy_(0, index, source)
    assert stats is not None  # (set whenever the allocation verdict passed)
    return stats


def _layer_ops(plan, tensors, buffers, src_row, rank, per_rank, group,
               send: Callable[[torch.Tensor, int], torch.Tensor]
               ) -> list[tuple[dist.P2POp, int]]:
    """P2P ops of one layer and their group peers, in global new-slot order (the same order
    on sender and receiver); ``send(tensor, local_slot)`` gives what a send reads."""
    incoming, _, _ = plan

    def peer(group_rank: int) -> int:  # P2POp takes global ranks
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    slot_of_buffer = {rank * per_rank + d: j for j, (d, _) in enumerate(incoming)}
    ops = []
    for s, from_slot in enumerate(src_row.tolist()):
        sr, dr = from_slot // per_rank, s // per_rank
        if sr == dr:
            continue
        if dr == rank:
            j = slot_of_buffer[s]
            ops += [(dist.P2POp(dist.irecv, buf[j], peer(sr), group), sr) for buf in buffers]
        elif sr == rank:
            local = from_slot - rank * per_rank
            ops += [(dist.P2POp(dist.isend, send(t, local), peer(dr), group), dr)
                    for t in tensors]
    return ops
