"""Pipeline schedules as data: the IR that the runtime executes, the simulator times and the
pictures draw.

A :class:`Schedule` is, for every rank, an ordered tuple of *steps*. A step is either one
:class:`Action` or an :class:`Overlap` (a forward and a backward action run as one overlapped
pair, DualPipe's ``F&B``). Actions are

==== =========================================================================================
kind meaning
==== =========================================================================================
F    forward of one micro-batch through one stage
B    full backward (input gradient *and* weight gradient, ``B = I + W``)
I    backward input gradient only; the weight-gradient part is *deferred* to a later ``W``
     of the same (stage, micro-batch). DualPipe's "B (its W deferred)" is an ``I``.
W    the deferred weight-gradient part of an earlier ``I`` (same stage and micro-batch)
==== =========================================================================================

Stages are numbered globally ("stage ids"); every stage id lives on exactly one rank, in one of
its local *slots* (the index into that rank's ``modules`` tuple). Each stage is one hop of a
linear chain: ``prev`` is the stage the activations come from (``None``: the micro-batch's input
enters here) and ``next`` the stage they go to (``None``: this stage computes the loss).
``direction`` 0 means data flowing towards higher ranks (rank 0 -> last), 1 the reverse.

Placements (``P`` = number of ranks):

* ``1f1b``, ``zb1p``: stage ``r`` on rank ``r``; one slot.
* ``zbv``, ``dualpipev``: stages ``0 .. 2P-1``; rank ``r`` holds ``modules=(S_r, S_(2P-1-r))``
  (PyTorch's numbering); stages ``0..P-1`` have direction 0, ``P..2P-1`` direction 1; the turn
  ``P-1 -> P`` is on the last rank (a *local* hand-over, no send). Loss on rank 0.
* ``dualpipe``: the model has ``P`` stages ``S_0..S_(P-1)`` but each exists twice, once per
  direction. Stage id ``k`` (``k < P``) is ``S_k`` in direction 0 on rank ``k``; stage id
  ``P + k`` is ``S_k`` in direction 1 on rank ``P-1-k``. So rank ``r`` holds stage ids
  ``r`` (slot 0, ``S_r``) and ``2P-1-r`` (slot 1, ``S_(P-1-r)``): ``modules=(S_r, S_(P-1-r))``
  as in the spec. ``StageInfo.model_stage`` tells which ``S_k`` a stage id runs. Micro-batches
  ``0 .. N/2-1`` enter at rank 0 (direction 0, loss on rank P-1); ``N/2 .. N-1`` enter at rank
  P-1 (direction 1, loss on rank 0).

``phase`` is the DualPipe phase of a stage on its rank: for ``dualpipe`` the phase of slot ``i``
on rank ``r`` is ``i ^ (r >= P/2)`` (phase 0 = the direction in which the rank holds the earlier
stage); for every other method ``phase == slot``.

Communication is derived, never stored: :meth:`Schedule.recvs_before` tells what a step must
receive before it runs and :meth:`Schedule.sends_after` what it sends when it ends. These are
exactly what the runtime posts.

Everything here is plain, frozen, comparable and JSON-serialisable (:meth:`Schedule.to_json`,
:meth:`Schedule.from_json`); ``str(action)`` is compact (``F3@s1``, ``I3@s1``, ``(F3@s1;B1@s6)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from deeppar._io import dumps_json


class Kind(StrEnum):
    """Kind of an action (``Overlap.kind`` is the string ``"FB"``)."""

    F = "F"  # forward
    B = "B"  # full backward: input gradient + weight gradient
    I = "I"  # noqa: E741  backward input gradient only (W deferred)
    W = "W"  # deferred weight gradient of an earlier I

    def __str__(self) -> str:
        return self.value

    @property
    def is_backward(self) -> bool:
        """B or I: the actions that consume an output gradient and produce an input gradient."""
        return self in (Kind.B, Kind.I)


#: kind of tensor moved between stages
TensorKind = Literal["activation", "gradient"]

_ACTION_RE = re.compile(r"^([FBIW])(\d+)@s(\d+)$")


@dataclass(frozen=True, order=True)
class Action:
    """One compute action: ``kind`` of ``microbatch`` on ``stage``.

    ``phase`` (local DualPipe phase) and ``direction`` are copies of the stage's
    :class:`StageInfo` fields, kept here so that an action is self-describing.
    """

    kind: Kind
    stage: int
    microbatch: int
    phase: int = 0
    direction: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, Kind):
            object.__setattr__(self, "kind", Kind(self.kind))

    def __str__(self) -> str:
        return f"{self.kind.value}{self.microbatch}@s{self.stage}"

    def __repr__(self) -> str:
        return f"Action({self})"

    @property
    def actions(self) -> tuple[Action, ...]:
        """The atomic actions of this step: ``(self,)``."""
        return (self,)

    @property
    def defers_w(self) -> bool:
        """True for an ``I``: a backward whose weight-gradient part runs in a later ``W``."""
        return self.kind is Kind.I

    @property
    def is_forward(self) -> bool:
        return self.kind is Kind.F

    @property
    def is_backward(self) -> bool:
        """B or I."""
        return self.kind.is_backward

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "stage": self.stage,
            "microbatch": self.microbatch,
            "phase": self.phase,
            "direction": self.direction,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Action:
        return Action(Kind(d["kind"]), int(d["stage"]), int(d["microbatch"]),
                      int(d.get("phase", 0)), int(d.get("direction", 0)))


@dataclass(frozen=True, order=True)
class Overlap:
    """DualPipe's ``F&B``: a forward and a backward (``B`` or ``I``) of different micro-batches
    run as one overlapped pair on one rank. Its outputs are ready when the whole pair ends; its
    receives (of both parts) are needed before it starts."""

    forward: Action
    backward: Action

    def __post_init__(self) -> None:
        if self.forward.kind is not Kind.F or not self.backward.is_backward:
            raise ValueError(f"an Overlap pairs an F with a B or I, got {self.forward}, "
                             f"{self.backward}")

    kind = "FB"

    def __str__(self) -> str:
        return f"({self.forward};{self.backward})"

    def __repr__(self) -> str:
        return f"Overlap{self}"

    @property
    def actions(self) -> tuple[Action, ...]:
        """``(forward, backward)``."""
        return (self.forward, self.backward)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "FB", "forward": self.forward.to_dict(),
                "backward": self.backward.to_dict()}


#: one entry of a rank's program
Step = Action | Overlap


def step_from_dict(d: dict[str, Any]) -> Step:
    """Inverse of ``step.to_dict()``."""
    if d["kind"] == "FB":
        return Overlap(Action.from_dict(d["forward"]), Action.from_dict(d["backward"]))
    return Action.from_dict(d)


@dataclass(frozen=True, order=True)
class StageInfo:
    """Where a stage id lives and who its neighbours are.

    ``slot`` is the index into the holding rank's ``modules`` tuple; ``model_stage`` the model
    partition it runs (equal to ``stage`` except for DualPipe, where two stage ids run the same
    partition in opposite directions); ``prev``/``next`` the neighbouring stage ids in the data
    flow (``None`` at the input / loss end) and ``prev_rank``/``next_rank`` the ranks holding them.
    """

    stage: int
    rank: int
    slot: int
    phase: int
    direction: int
    model_stage: int
    prev: int | None
    next: int | None
    prev_rank: int | None
    next_rank: int | None

    @property
    def is_first(self) -> bool:
        """The micro-batch input enters here."""
        return self.prev is None

    @property
    def is_last(self) -> bool:
        """This stage computes the loss."""
        return self.next is None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True, order=True)
class Transfer:
    """A tensor moved between two stages, seen from one side.

    ``op`` is ``"recv"`` (needed before the step runs) or ``"send"`` (posted after it ends).
    ``tensor`` is ``"activation"`` (the forward output of the earlier stage, which is the input
    of the later one) or ``"gradient"`` (the gradient w.r.t. that activation, going back from the
    later stage to the earlier one).
    ``peer`` is the other rank; ``local`` is True when ``peer`` is this rank (DualPipeV's turn on
    the last rank): then nothing is sent, the tensor is handed over in memory (detached, with
    ``requires_grad``), and the matching "send" and "recv" are both reported with ``local=True``.

    ``stage`` is the stage on this side and ``peer_stage`` the one on the other side; the pair
    (``stage``, ``peer_stage``) plus ``microbatch`` and ``tensor`` identify the message uniquely:
    activations flow ``prev -> next``, gradients ``next -> prev``.
    """

    op: Literal["send", "recv"]
    tensor: TensorKind
    peer: int
    stage: int
    peer_stage: int
    microbatch: int
    local: bool = False

    def __str__(self) -> str:
        arrow = "->" if self.op == "send" else "<-"
        where = "local" if self.local else f"r{self.peer}"
        kind = "act" if self.tensor == "activation" else "grad"
        return f"{self.op} {kind}{self.microbatch} s{self.stage}{arrow}s{self.peer_stage}@{where}"

    @property
    def key(self) -> tuple[str, int, int, int]:
        """Identity of the message, the same on both sides: (tensor, src stage, dst stage, mb)."""
        if self.op == "send":
            return (self.tensor, self.stage, self.peer_stage, self.microbatch)
        return (self.tensor, self.peer_stage, self.stage, self.microbatch)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Schedule:
    """A complete pipeline schedule.

    ``steps[r]`` is rank ``r``'s program, run top to bottom. ``stages[s]`` describes stage id
    ``s``. ``entry[m]`` is the stage id where micro-batch ``m`` enters (its input is given on that
    stage's rank); the loss of ``m`` is computed on the last stage of its chain.
    ``num_chunks`` is the number of micro-batches in total (for DualPipe both directions
    together). ``meta`` holds free-form, JSON-able notes (for example the formula a generator
    follows); it does not take part in equality.
    """

    method: str
    num_ranks: int
    num_chunks: int
    stages: tuple[StageInfo, ...]
    steps: tuple[tuple[Step, ...], ...]
    entry: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ----------------------------------------------------------------- placement queries
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def stage(self, stage: int) -> StageInfo:
        return self.stages[stage]

    def rank_of(self, stage: int) -> int:
        return self.stages[stage].rank

    def stages_of(self, rank: int) -> tuple[int, ...]:
        """Stage ids held by ``rank``, ordered by slot (= the rank's ``modules`` order)."""
        return tuple(s.stage for s in sorted(
            (s for s in self.stages if s.rank == rank), key=lambda s: s.slot))

    @property
    def placement(self) -> tuple[tuple[int, ...], ...]:
        """``placement[r]`` = :meth:`stages_of` ``(r)``."""
        return tuple(self.stages_of(r) for r in range(self.num_ranks))

    def path(self, microbatch: int) -> tuple[int, ...]:
        """Stage ids micro-batch ``microbatch`` goes through, input to loss."""
        out = [self.entry[microbatch]]
        while self.stages[out[-1]].next is not None:
            out.append(self.stages[out[-1]].next)  # type: ignore[arg-type]
        return tuple(out)

    def direction_of(self, microbatch: int) -> int:
        """Direction of the stage where the micro-batch enters (DualPipe: 0 or 1; others 0)."""
        return self.stages[self.entry[microbatch]].direction

    def input_rank(self, microbatch: int) -> int:
        """Rank on which the input of ``microbatch`` is given."""
        return self.stages[self.entry[microbatch]].rank

    def loss_stage(self, microbatch: int) -> int:
        return self.path(microbatch)[-1]

    def loss_rank(self, microbatch: int) -> int:
        """Rank that computes the loss of ``microbatch`` (and holds its label)."""
        return self.stages[self.loss_stage(microbatch)].rank

    def losses(self, rank: int) -> tuple[int, ...]:
        """Micro-batches whose loss ``rank`` computes, in the order it computes them (the order
        of its forwards on a last stage). DualPipe: rank P-1 for micro-batches ``< N/2``,
        rank 0 for the others; DualPipeV/ZBV: rank 0 for all; 1F1B/ZB1P: the last rank."""
        return tuple(a.microbatch for a in self.rank_actions(rank)
                     if a.kind is Kind.F and self.stages[a.stage].is_last)

    # ----------------------------------------------------------------- programs
    def rank_actions(self, rank: int) -> Iterator[Action]:
        """Atomic actions of ``rank`` in program order (an Overlap gives its F, then its B/I)."""
        for step in self.steps[rank]:
            yield from step.actions

    def all_actions(self) -> Iterator[tuple[int, int, Action]]:
        """``(rank, step index, action)`` for every atomic action."""
        for r, prog in enumerate(self.steps):
            for i, step in enumerate(prog):
                for a in step.actions:
                    yield r, i, a

    # ----------------------------------------------------------------- communication
    def recvs_before(self, rank: int, step: Step) -> tuple[Transfer, ...]:
        """What ``step`` on ``rank`` must receive before it runs.

        * ``F`` on stage ``s`` with ``prev`` stage ``p``: the activation of ``p`` (from
          ``rank_of(p)``; ``local=True`` if that is this rank). Nothing on a first stage (the
          input is local data).
        * ``B``/``I`` on stage ``s`` with ``next`` stage ``n``: the gradient w.r.t. ``s``'s output
          from ``rank_of(n)``. Nothing on a last stage (the loss is computed locally).
        * ``W``: nothing (it needs only the local ``I`` of the same stage and micro-batch).
        * ``Overlap``: those of its forward, then those of its backward.

        The step also needs its own earlier local state (the F of the same stage and micro-batch
        before a B/I; the I before a W); that is not a transfer and is not listed.
        """
        del rank  # the step's stages determine everything; kept for a uniform signature
        return self._transfers("recv", step)

    def sends_after(self, rank: int, step: Step) -> tuple[Transfer, ...]:
        """What ``step`` on ``rank`` sends once it ends.

        * ``F`` on stage ``s`` with ``next`` stage ``n``: its output activation to
          ``rank_of(n)``. Nothing on a last stage.
        * ``B``/``I`` on stage ``s`` with ``prev`` stage ``p``: the gradient w.r.t. its input to
          ``rank_of(p)``. Nothing on a first stage.
        * ``W``: nothing.
        * ``Overlap``: those of its forward, then those of its backward (all after the pair).

        ``local=True`` marks a hand-over inside the rank (DualPipeV's turn): no communication.
        """
        del rank
        return self._transfers("send", step)

    def _transfers(self, way: str, step: Step) -> tuple[Transfer, ...]:
        """Transfers of ``step``: a forward talks to the stage before it (receive) or after it
        (send), a backward the other way round; W and first/last stages have none."""
        out: list[Transfer] = []
        for a in step.actions:
            info = self.stages[a.stage]
            if a.kind is Kind.F:
                tensor, peer = "activation", (info.prev if way == "recv" else info.next)
            elif a.kind.is_backward:
                tensor, peer = "gradient", (info.next if way == "recv" else info.prev)
            else:
                continue
            if peer is None:
                continue
            peer_rank = self.stages[peer].rank
            out.append(Transfer(way, tensor, peer_rank, a.stage,  # type: ignore[arg-type]
                                peer, a.microbatch, peer_rank == info.rank))
        return tuple(out)

    def producers(self) -> dict[tuple[str, int, int, int], tuple[int, int]]:
        """``Transfer.key`` of every message -> ``(rank, step index)`` of the step whose
        :meth:`sends_after` produces it (local hand-overs included)."""
        return {t.key: (r, i) for r, prog in enumerate(self.steps)
                for i, st in enumerate(prog) for t in self.sends_after(r, st)}

    def consumers(self) -> dict[tuple[str, int, int, int], tuple[int, int]]:
        """``Transfer.key`` of every message -> ``(rank, step index)`` of the step whose
        :meth:`recvs_before` needs it."""
        return {t.key: (r, i) for r, prog in enumerate(self.steps)
                for i, st in enumerate(prog) for t in self.recvs_before(r, st)}

    # ----------------------------------------------------------------- text and JSON
    def parse_step(self, text: str) -> Step:
        """Inverse of ``str(step)`` for this schedule (``F3@s1``, ``(F3@s1;B1@s6)``)."""
        text = text.strip()
        if text.startswith("(") and text.endswith(")"):
            f, b = text[1:-1].split(";")
            return Overlap(self.parse_step(f), self.parse_step(b))  # type: ignore[arg-type]
        m = _ACTION_RE.match(text)
        if not m:
            raise ValueError(f"not an action: {text!r} (expected e.g. 'F3@s1')")
        s, mb = int(m.group(3)), int(m.group(2))
        if s >= self.num_stages:
            raise ValueError(f"{text!r}: stage s{s} is out of range (this {self.method} "
                             f"schedule has stages s0..s{self.num_stages - 1})")
        if mb >= self.num_chunks:
            raise ValueError(f"{text!r}: micro-batch {mb} is out of range (this {self.method} "
                             f"schedule has micro-batches 0..{self.num_chunks - 1})")
        info = self.stages[s]
        return Action(Kind(m.group(1)), s, mb, info.phase, info.direction)

    def format(self) -> str:
        """One line per rank: ``rank r: F0@s0 F1@s0 ...``."""
        width = len(str(self.num_ranks - 1))
        return "\n".join(f"rank {r:>{width}}: " + " ".join(str(s) for s in prog)
                         for r, prog in enumerate(self.steps))

    def __str__(self) -> str:
        return (f"Schedule({self.method}, ranks={self.num_ranks}, chunks={self.num_chunks})\n"
                + self.format())

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "num_ranks": self.num_ranks,
            "num_chunks": self.num_chunks,
            "stages": [s.to_dict() for s in self.stages],
            "entry": list(self.entry),
            "steps": [[s.to_dict() for s in prog] for prog in self.steps],
            "meta": self.meta,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Schedule:
        """Inverse of :meth:`to_dict`. Raises ``ValueError`` naming the field that is missing,
        malformed or out of range (stage ids, ranks and micro-batches are checked)."""
        if not isinstance(d, dict):
            raise ValueError(f"a schedule must be a JSON object, got {type(d).__name__}")

        def field_of(name: str, conv: Any) -> Any:
            if name not in d:
                raise ValueError(f"schedule: field {name!r} is missing")
            try:
                return conv(d[name])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"schedule: field {name!r} is malformed: "
                                 f"{type(e).__name__}: {e}") from None

        method = field_of("method", str)
        num_ranks = field_of("num_ranks", int)
        num_chunks = field_of("num_chunks", int)
        stages = field_of("stages", lambda v: tuple(StageInfo(**s) for s in v))
        steps = field_of("steps", lambda v: tuple(tuple(step_from_dict(s) for s in prog)
                                                  for prog in v))
        entry = field_of("entry", lambda v: tuple(int(e) for e in v))
        meta = dict(d.get("meta") or {})
        if num_ranks < 1 or num_chunks < 1:
            raise ValueError(f"schedule: num_ranks and num_chunks must be >= 1, got "
                             f"{num_ranks}, {num_chunks}")
        if len(steps) != num_ranks:
            raise ValueError(f"schedule: field 'steps' has {len(steps)} programs for "
                             f"num_ranks={num_ranks}")
        if len(entry) != num_chunks:
            raise ValueError(f"schedule: field 'entry' has {len(entry)} entries for "
                             f"num_chunks={num_chunks}")
        for i, st in enumerate(stages):
            if st.stage != i or not 0 <= st.rank < num_ranks:
                raise ValueError(f"schedule: field 'stages'[{i}] is inconsistent: {st}")
        if any(not 0 <= e < len(stages) for e in entry):
            raise ValueError(f"schedule: field 'entry' names a stage outside "
                             f"0..{len(stages) - 1}: {list(entry)}")
        for r, prog in enumerate(steps):
            for step in prog:
                for a in step.actions:
                    if not 0 <= a.stage < len(stages) or not 0 <= a.microbatch < num_chunks:
                        raise ValueError(f"schedule: field 'steps'[{r}] has {a}, out of range "
                                         f"(stages 0..{len(stages) - 1}, micro-batches "
                                         f"0..{num_chunks - 1})")
        return Schedule(method, num_ranks, num_chunks, stages, steps, entry, meta)

    def to_json(self, indent: int | None = None) -> str:
        return dumps_json(self.to_dict(), indent=indent, what="the schedule")

    @staticmethod
    def from_json(text: str) -> Schedule:
        """Inverse of :meth:`to_json`; ``ValueError`` for bad JSON or a bad schedule."""
        return Schedule.from_dict(json.loads(text))


def make_stages(placement: list[tuple[int, int, int, int, int]],
                chains: list[list[int]]) -> tuple[StageInfo, ...]:
    """Build the :class:`StageInfo` table.

    ``placement[s] = (rank, slot, phase, direction, model_stage)`` for each stage id ``s``;
    ``chains`` lists each linear chain of stage ids in data-flow order.
    """
    prev: dict[int, int | None] = {}
    nxt: dict[int, int | None] = {}
    for chain in chains:
        for i, s in enumerate(chain):
            prev[s] = chain[i - 1] if i > 0 else None
            nxt[s] = chain[i + 1] if i + 1 < len(chain) else None
    out = []
    for s, (rank, slot, phase, direction, model_stage) in enumerate(placement):
        p, n = prev[s], nxt[s]
        out.append(StageInfo(s, rank, slot, phase, direction, model_stage, p, n,
                             None if p is None else placement[p][0],
                             None if n is None else placement[n][0]))
    return tuple(out)


__all__ = [
    "Action",
    "Kind",
    "Overlap",
    "Schedule",
    "StageInfo",
    "Step",
    "TensorKind",
    "Transfer",
    "make_stages",
    "step_from_dict",
]
