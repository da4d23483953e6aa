"""Schedule validator.

:func:`check` returns a list of problems (empty when the schedule is valid); :func:`validate`
raises :class:`ScheduleError` listing them. A valid schedule satisfies:

1. **Placement**: every action runs on the rank holding its stage, with that stage's ``phase``
   and ``direction``; an ``Overlap`` pairs an ``F`` with a ``B``/``I``.
2. **Coverage**: every micro-batch visits every stage of its path exactly once forward and once
   backward (one ``B``, or one ``I`` plus one ``W``), and no other stage.
3. **Local order**: on each rank, ``F(s, m)`` comes before the backward of ``(s, m)`` and an
   ``I`` before its ``W``. (Overlapped pairs count as one step: the two parts may not depend on
   each other.)
4. **Sends match receives**: every send of :meth:`Schedule.sends_after` has exactly one
   matching receive of :meth:`Schedule.recvs_before` on the peer rank and vice versa (local
   hand-overs included).
5. **No deadlock** (:func:`deadlock`): each rank runs its steps in order, a step starts only
   when everything it receives has been produced (sends are asynchronous and buffered, as with
   ``isend`` / ``batch_isend_irecv`` posted right after the producing step), and all ranks
   finish.

:func:`deadlock` also offers ``mode="rendezvous"``: a send completes only once the receiver has
posted the matching receive, and a rank waits for all its pending sends before its next step
(receives are posted just before the step that needs them). That is stricter than what the
runtime needs and is reported for information (:func:`channel_order_mismatches` similarly tells
whether the per-peer order of sends equals the order of the matching receives, which matters to
transports that match messages by order, like NCCL).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Literal

from .ir import Kind, Overlap, Schedule
from .walk import walk


class ScheduleError(ValueError):
    """A schedule violates one of the rules of :mod:`deeppar.pipeline.validate`."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"invalid schedule ({len(problems)} problems):\n  {shown}{more}")


def check(schedule: Schedule, *, deadlock_mode: Literal["eager", "rendezvous"] | None = "eager"
          ) -> list[str]:
    """All problems of ``schedule`` (see the module docstring); ``[]`` when it is valid."""
    problems: list[str] = []
    problems += _check_placement(schedule)
    problems += _check_coverage(schedule)
    problems += _check_local_order(schedule)
    problems += _check_matching(schedule)
    if deadlock_mode is not None and not problems:
        stuck = deadlock(schedule, mode=deadlock_mode)
        if stuck:
            problems.append(f"deadlock ({deadlock_mode}): ranks blocked at " + ", ".join(
                f"r{r}:{s}" for r, s in stuck))
    return problems


def validate(schedule: Schedule, **kwargs) -> Schedule:
    """Raise :class:`ScheduleError` if :func:`check` finds problems; return the schedule."""
    problems = check(schedule, **kwargs)
    if problems:
        raise ScheduleError(problems)
    return schedule


def _check_placement(s: Schedule) -> list[str]:
    out = []
    if len(s.steps) != s.num_ranks:
        out.append(f"{len(s.steps)} programs for {s.num_ranks} ranks")
    for i, st in enumerate(s.stages):
        if st.stage != i:
            out.append(f"stages[{i}] has id {st.stage}")
    if len(s.entry) != s.num_chunks:
        out.append(f"entry has {len(s.entry)} items for {s.num_chunks} micro-batches")
    for r, i, a in s.all_actions():
        if not 0 <= a.stage < s.num_stages:
            out.append(f"rank {r} step {i}: {a} on unknown stage")
            continue
        info = s.stages[a.stage]
        if info.rank != r:
            out.append(f"rank {r} step {i}: {a} but stage {a.stage} is on rank {info.rank}")
        if (a.phase, a.direction) != (info.phase, info.direction):
            out.append(f"rank {r} step {i}: {a} has phase/direction {a.phase}/{a.direction}, "
                       f"stage says {info.phase}/{info.direction}")
        if not 0 <= a.microbatch < s.num_chunks:
            out.append(f"rank {r} step {i}: {a} micro-batch out of range")
    for r, prog in enumerate(s.steps):
        for i, step in enumerate(prog):
            if isinstance(step, Overlap) and (
                    step.forward.kind is not Kind.F or not step.backward.is_backward):
                out.append(f"rank {r} step {i}: bad overlapped pair {step}")
    return out


def _check_coverage(s: Schedule) -> list[str]:
    out = []
    count: Counter[tuple[Kind, int, int]] = Counter(
        (a.kind, a.stage, a.microbatch) for _, _, a in s.all_actions())
    expected = set()
    for m in range(s.num_chunks):
        for st in s.path(m):
            expected.add((st, m))
            f = count[(Kind.F, st, m)]
            b, i, w = count[(Kind.B, st, m)], count[(Kind.I, st, m)], count[(Kind.W, st, m)]
            if f != 1:
                out.append(f"micro-batch {m} has {f} forwards on stage {st} (want 1)")
            if not ((b == 1 and i == 0 and w == 0) or (b == 0 and i == 1 and w == 1)):
                out.append(f"micro-batch {m} on stage {st}: {b} B, {i} I, {w} W "
                           "(want one B, or one I and one W)")
    for (_k, st, m), _n in count.items():
        if (st, m) not in expected:
            out.append(f"micro-batch {m} runs on stage {st}, which is not on its path")
    return out


def _check_local_order(s: Schedule) -> list[str]:
    out = []
    for r, prog in enumerate(s.steps):
        seen: dict[tuple[Kind, int, int], int] = {}
        for i, step in enumerate(prog):
            for a in step.actions:
                key = (a.stage, a.microbatch)
                if a.is_backward and (Kind.F, *key) not in seen:
                    out.append(f"rank {r} step {i}: {a} before its forward")
                if a.kind is Kind.W and (Kind.I, *key) not in seen:
                    out.append(f"rank {r} step {i}: {a} before its I")
            for a in step.actions:
                seen[(a.kind, a.stage, a.microbatch)] = i
            if isinstance(step, Overlap):
                f, b = step.forward, step.backward
                if (f.stage, f.microbatch) == (b.stage, b.microbatch):
                    out.append(f"rank {r} step {i}: {step} pairs F and B of the same work")
    return out


def _check_matching(s: Schedule) -> list[str]:
    out = []
    sends: Counter = Counter()
    recvs: Counter = Counter()
    for r, prog in enumerate(s.steps):
        for step in prog:
            for t in s.sends_after(r, step):
                sends[(r, t.peer, t.key)] += 1
            for t in s.recvs_before(r, step):
                recvs[(t.peer, r, t.key)] += 1
    for k in sends.keys() | recvs.keys():
        if sends[k] != 1 or recvs[k] != 1:
            src, dst, key = k
            out.append(f"{key[0]} of micro-batch {key[3]} s{key[1]}->s{key[2]} "
                       f"(rank {src} -> rank {dst}): {sends[k]} sends, {recvs[k]} receives")
    return out


def deadlock(schedule: Schedule, mode: Literal["eager", "rendezvous"] = "eager"
             ) -> list[tuple[int, str]]:
    """Run the programs with blocking semantics; return ``[(rank, step)]`` for the ranks left
    blocked (``[]`` when every rank finishes).

    ``eager``: a step waits for the steps that produce what it receives (and, being in program
    order, for the earlier steps of its rank). ``rendezvous``: additionally a rank may start step
    ``j`` only after every send of step ``j-1`` was matched, i.e. its receiver has reached the
    step that consumes it (receives are posted just before the consuming step).
    """
    s = schedule
    producer, consumer = s.producers(), s.consumers()
    needs: list[list[list[tuple[int, int]]]] = []  # [rank][step] -> producing (rank, step)
    sends_to: list[list[list[tuple[int, int]]]] = []  # [rank][step] -> consuming (rank, step)
    for r, prog in enumerate(s.steps):
        needs.append([[producer[t.key] for t in s.recvs_before(r, st) if t.key in producer]
                      for st in prog])
        sends_to.append([[consumer[t.key] for t in s.sends_after(r, st) if t.key in consumer]
                         for st in prog])
    pos = [0] * s.num_ranks  # next step to run on each rank (= steps done)
    lengths = [len(p) for p in s.steps]

    def advance(r: int) -> bool:
        j = pos[r]
        if j >= lengths[r] or not all(pos[pr] > pi for pr, pi in needs[r][j]):
            return False
        if mode == "rendezvous" and j > 0 and not all(
                pos[cr] >= ci or cr == r for cr, ci in sends_to[r][j - 1]):
            return False
        pos[r] += 1
        return True

    walk(s.num_ranks, advance)
    return [(r, str(s.steps[r][pos[r]])) for r in range(s.num_ranks) if pos[r] < lengths[r]]


def channel_order_mismatches(schedule: Schedule, *, by_tensor: bool = False
                             ) -> list[tuple]:
    """Channels whose order of sends (sender's program order) differs from the order in which
    the receiver consumes them. A channel is ``(src, dst)``, or ``(src, dst, tensor)`` with
    ``by_tensor=True`` (activations and gradients on separate channels, e.g. separate process
    groups or tags). Empty means a transport that matches messages per channel in posting order
    (NCCL) gets the right tensors with every send posted right after its step and every receive
    right before its step.

    DualPipe/DualPipeV/ZBV are not order-consistent per ``(src, dst)`` (a rank interleaves
    activations and gradients to a neighbour differently from how the neighbour consumes them)
    but are per ``(src, dst, tensor)``."""
    sent: dict[tuple, list] = defaultdict(list)
    got: dict[tuple, list] = defaultdict(list)
    for r, prog in enumerate(schedule.steps):
        for step in prog:
            for t in schedule.sends_after(r, step):
                if not t.local:
                    sent[(r, t.peer, t.tensor) if by_tensor else (r, t.peer)].append(t.key)
            for t in schedule.recvs_before(r, step):
                if not t.local:
                    got[(t.peer, r, t.tensor) if by_tensor else (t.peer, r)].append(t.key)
    return sorted(k for k in sent.keys() | got.keys() if sent[k] != got[k])


__all__ = ["ScheduleError", "channel_order_mismatches", "check", "deadlock", "validate"]
