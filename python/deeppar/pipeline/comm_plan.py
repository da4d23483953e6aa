"""Where a pipeline step's sends and receives are posted (the *comm plan*), and a checker.

The plan is a pure function of the schedule and of the mode (forward-only runs only the
forwards). For every rank it lists the *groups* (one ``batch_isend_irecv`` each) in the order
they are issued, the step before which each is issued, and the receives each step waits for.
The runtime executes exactly this plan.

Policy (``"lookahead"``, the default): the messages of a channel (ordered rank pair) are received
in the order the sender sends them. A step's sends are queued when it ends. Before each live
step, if sends are queued or the step needs a message not yet posted, one group is issued: the
queued sends first, then the receives of the next step (this one or a later one) that needs
unposted messages, each posted together with the channel's earlier messages. So a send never
goes out in a group of its own while a later receive exists (except at the very end of the
program), and the receive of a step after a W or a receive-free backward rides with the sends
before it, as in DeepSeek's DualPipe. The ``"send_only_flush"`` policy (sends issued alone
before a step without receives) is kept as a known-bad reference: it deadlocks under NCCL.

:func:`check_plan` simulates a plan under the NCCL model: each rank has one stream on which its
groups run one after another; a group starts once the previous one completed and the rank's
host has issued it; a send completes when the peer's group holding the matching receive has
started, a receive when the group holding the matching send has started (rendezvous, as for
messages above NCCL's buffer size or across nodes); a group completes when all its ops have;
a step that waits on a receive blocks its host until the group holding it completes, and the
end of the program waits for every group. Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from .ir import Action, Kind, Schedule, Step, Transfer
from .walk import ChannelCursor, walk

Msg = tuple[Hashable, int]  # (message key, peer rank)
POLICIES = ("rounds", "send_only_flush")


def live_actions(step: Step, forward_only: bool) -> tuple[Action, ...]:
    """Actions of ``step`` that run (forward-only: the forwards)."""
    if forward_only:
        return tuple(a for a in step.actions if a.kind is Kind.F)
    return step.actions


def step_transfers(sched: Schedule, rank: int, step: Step, op: str,
                   forward_only: bool) -> tuple[Transfer, ...]:
    """The transfers (``op`` = ``"recv"`` before, ``"send"`` after) of the live part of
    ``step``; empty when nothing of it runs."""
    live = live_actions(step, forward_only)
    if not live:
        return ()
    part: Step = live[0] if len(live) == 1 else step
    return sched.recvs_before(rank, part) if op == "recv" else sched.sends_after(rank, part)


@dataclass(frozen=True)
class Group:
    """One ``batch_isend_irecv``: issued before step ``before`` (``len(steps)``: at the end),
    sends first (in queue order), then receives (in channel order per peer)."""

    before: int
    sends: tuple[Msg, ...]
    recvs: tuple[Msg, ...]


@dataclass
class RankPlan:
    """A rank's groups in issue order and, per step index, the remote receives it waits for."""

    num_steps: int
    groups: list[Group] = field(default_factory=list)
    waits: dict[int, tuple[Msg, ...]] = field(default_factory=dict)

    def groups_before(self, index: int) -> list[Group]:
        return [g for g in self.groups if g.before == index]


@dataclass
class CommPlan:
    """Per-channel message order (``channels[(src, dst)]``) and every rank's groups."""

    channels: dict[tuple[int, int], list[Hashable]]
    ranks: list[RankPlan]


def build_plan(sched: Schedule, forward_only: bool = False,
               policy: str = "rounds") -> CommPlan:
    """The comm plan of ``sched`` (see the module docstring for the policies)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    P = sched.num_ranks
    recvs: list[list[tuple[Msg, ...]]] = []
    sends: list[list[tuple[Msg, ...]]] = []
    live: list[list[bool]] = []
    channels: dict[tuple[int, int], list[Hashable]] = {}
    for r in range(P):
        rr, ss, lv = [], [], []
        for step in sched.steps[r]:
            lv.append(bool(live_actions(step, forward_only)))
            rr.append(tuple((t.key, t.peer) for t in
                            step_transfers(sched, r, step, "recv", forward_only) if not t.local))
            out = tuple((t.key, t.peer) for t in
                        step_transfers(sched, r, step, "send", forward_only) if not t.local)
            ss.append(out)
            for key, peer in out:
                channels.setdefault((r, peer), []).append(key)
        recvs.append(rr)
        sends.append(ss)
        live.append(lv)
    if policy == "rounds":
        return CommPlan(channels, _rounds(recvs, sends, live))
    return CommPlan(channels, [_flush_plan(r, recvs[r], sends[r], live[r], channels)
                               for r in range(P)])


def _rounds(recvs: list[list[tuple[Msg, ...]]], sends: list[list[tuple[Msg, ...]]],
            live: list[list[bool]]) -> list[RankPlan]:
    """Round policy: every rank advances at most one step per round (a step may run once all
    its receives are assigned to earlier rounds); then every queued send forms the round: the
    sender issues it before its next step, the receiver posts the receive before its next step,
    in the same round. Groups of round t only wait for groups of earlier rounds, so every round
    starts on every rank and completes: no deadlock under the NCCL model."""
    P = len(live)
    plans = [RankPlan(len(live[r])) for r in range(P)]
    pos = [0] * P
    assigned: set[Hashable] = set()
    queued: list[list[Msg]] = [[] for _ in range(P)]

    def skip_dead(r: int) -> None:
        while pos[r] < len(live[r]) and not live[r][pos[r]]:
            pos[r] += 1

    def advance(r: int) -> bool:
        skip_dead(r)
        i = pos[r]
        if i >= len(live[r]) or not all(k in assigned for k, _ in recvs[r][i]):
            return False
        if recvs[r][i]:
            plans[r].waits[i] = recvs[r][i]
        queued[r] += sends[r][i]
        pos[r] += 1
        skip_dead(r)
        return True

    def deliver() -> bool:
        """Every queued send forms this round's groups (sender and receiver)."""
        if not any(queued):
            return False
        incoming: list[list[Msg]] = [[] for _ in range(P)]
        for r in range(P):
            for key, dst in queued[r]:
                incoming[dst].append((key, r))
                assigned.add(key)
        for r in range(P):
            if queued[r] or incoming[r]:
                plans[r].groups.append(Group(pos[r], tuple(queued[r]), tuple(incoming[r])))
            queued[r] = []
        return True

    walk(P, advance, per_round=1, end_round=deliver)
    stuck = [r for r in range(P) if pos[r] < len(live[r])]
    if stuck:
        raise ValueError(f"the schedule cannot run: ranks {stuck} wait for messages never sent")
    return plans


def _flush_plan(me: int, recvs: list[tuple[Msg, ...]], sends: list[tuple[Msg, ...]],
                live: list[bool], channels: dict[tuple[int, int], list[Hashable]]) -> RankPlan:
    """Reference policy: queued sends go out with the next step's receives, or alone before a
    step without receives; receives posted in channel order up to the one needed."""
    n = len(live)
    plan = RankPlan(n)
    cursor = ChannelCursor(channels, me, "recv")
    posted: set[Hashable] = set()
    queued: list[Msg] = []
    for i in range(n):
        if not live[i]:
            continue
        new: list[Msg] = []
        for key, src in recvs[i]:
            for k in cursor.through(src, key, posted.__contains__):
                new.append((k, src))
                posted.add(k)
        if new or queued:
            plan.groups.append(Group(i, tuple(queued), tuple(new)))
            queued = []
        if recvs[i]:
            plan.waits[i] = recvs[i]
        queued += sends[i]
    if queued:
        plan.groups.append(Group(n, tuple(queued), ()))
    return plan


@dataclass
class Deadlock:
    """Where a simulated plan got stuck: per stuck rank, a description."""

    stuck: dict[int, str]

    def __str__(self) -> str:
        return "deadlock: " + "; ".join(f"rank {r}: {s}" for r, s in sorted(self.stuck.items()))


def check_plan(plan: CommPlan) -> Deadlock | None:
    """Simulate ``plan`` under the NCCL model (module docstring); ``None`` if every rank
    finishes, else the :class:`Deadlock` with each stuck rank's host and stream position."""
    P = len(plan.ranks)
    # where each send / receive lives: (rank, group index), matched by channel position
    send_at: dict[tuple[int, int, int], tuple[int, int]] = {}
    recv_at: dict[tuple[int, int, int], tuple[int, int]] = {}
    group_of_recv: list[dict[Hashable, int]] = [{} for _ in range(P)]
    ops: list[list[list[tuple[str, tuple[int, int, int]]]]] = []
    for r, rp in enumerate(plan.ranks):
        out_cursor = ChannelCursor(plan.channels, r, "send")
        in_cursor = ChannelCursor(plan.channels, r, "recv")
        rops = []
        for gi, g in enumerate(rp.groups):
            gops = []
            for key, peer in g.sends:
                at = out_cursor.take(peer, key)
                if at is None:
                    raise ValueError(f"rank {r} sends {key} out of channel order")
                send_at[(r, peer, at)] = (r, gi)
                gops.append(("send", (r, peer, at)))
            for key, peer in g.recvs:
                at = in_cursor.take(peer, key)
                if at is None:
                    raise ValueError(f"rank {r} receives {key} out of channel order")
                recv_at[(peer, r, at)] = (r, gi)
                group_of_recv[r][key] = gi
                gops.append(("recv", (peer, r, at)))
            rops.append(gops)
        ops.append(rops)
    # host programme per rank: ("issue", gi) / ("wait", gi)
    progs: list[list[tuple[str, int]]] = []
    for r, rp in enumerate(plan.ranks):
        prog: list[tuple[str, int]] = []
        gi = 0
        for i in range(rp.num_steps + 1):
            while gi < len(rp.groups) and rp.groups[gi].before == i:
                prog.append(("issue", gi))
                gi += 1
            for key, _src in rp.waits.get(i, ()):
                if key not in group_of_recv[r]:
                    raise ValueError(f"rank {r} step {i} waits for {key}, never posted")
                prog.append(("wait", group_of_recv[r][key]))
        prog += [("wait", g) for g in range(len(rp.groups))]
        progs.append(prog)
    host = [0] * P
    issued = [0] * P
    started = [[False] * len(rp.groups) for rp in plan.ranks]
    done = [[False] * len(rp.groups) for rp in plan.ranks]
    head = [0] * P  # stream position: first group not completed

    def advance(r: int) -> bool:
        """Run rank ``r``'s host as far as it can go, then start and complete its stream's
        groups in order while their peers' matching groups have started."""
        changed = False
        while host[r] < len(progs[r]):
            what, gi = progs[r][host[r]]
            if what == "issue":
                issued[r] = gi + 1
            elif not done[r][gi]:
                break
            host[r] += 1
            changed = True
        while head[r] < issued[r]:
            gi = head[r]
            if not started[r][gi]:
                started[r][gi] = True
                changed = True
            for kind, c in ops[r][gi]:
                other = (recv_at if kind == "send" else send_at).get(c)
                if other is None or not started[other[0]][other[1]]:
                    return changed
            done[r][gi] = True
            head[r] += 1
            changed = True
        return changed

    walk(P, advance)
    stuck: dict[int, str] = {}
    for r in range(P):
        if host[r] == len(progs[r]) and head[r] == len(plan.ranks[r].groups):
            continue
        where = "host finished" if host[r] == len(progs[r]) else \
            f"host waits on group {progs[r][host[r]][1]}"
        if head[r] < len(plan.ranks[r].groups):
            g = plan.ranks[r].groups[head[r]]
            where += (f"; stream at group {head[r]} (before step {g.before}: sends "
                      f"{list(g.sends)}, recvs {list(g.recvs)})")
        stuck[r] = where
    return Deadlock(stuck) if stuck else None


__all__ = ["CommPlan", "Deadlock", "Group", "Msg", "POLICIES", "RankPlan", "build_plan",
           "check_plan", "live_actions", "step_transfers"]
