"""Discrete-event simulation of a schedule.

Each rank runs its steps in program order; a step starts as soon as the rank is free and every
tensor it receives (:meth:`Schedule.recvs_before`) is ready. A tensor is ready when the step
producing it *ends* (for an overlapped pair: when the whole pair ends) plus the p2p latency
``comm`` if the producer is on another rank (a local hand-over, like DualPipeV's turn, costs
nothing). Sends never block (buffered, as with ``isend`` posted right after the step).

Reported (:class:`SimResult`): the makespan, each rank's bubble (makespan minus its busy time),
each rank's peak number of live activations (a (stage, micro-batch) activation is live from the
start of its ``F`` to the end of its ``B``, or of its ``W`` when the backward was split; within
an overlapped pair the forward's activation is counted before the backward's is freed) and the
timeline.

Durations come from a :class:`Costs` (constants, optionally per stage) or a
:class:`MeasuredCosts` (measured per-step times). Both implement the :class:`CostModel`
protocol: ``duration(schedule, rank, index, step) -> float`` and ``latency(schedule, src_rank,
dst_rank) -> float``.

The published bubble formulas (``specs/dualpipe.md``) are in :data:`PUBLISHED_BUBBLE`;
:func:`compare_published` sets them against the simulation. 1F1B's ``(PP-1)(F+B)`` and ZB-H1's
``(PP-1)(F+B-2W)`` (with ``F = I = W``, the paper's setting) are reproduced exactly. DualPipe's
``(PP/2-1)(F&B+B-3W)`` holds only when ``I = B - W`` equals ``F`` and ``W <= F``
(the spec's condition) and otherwise does not: e.g. with ``F=1, B=3, W=1`` (``I = 2 != F``) the
simulated bubble is larger (see :func:`compare_published` and the tests).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from deeppar._io import dumps_json

from .ir import Kind, Overlap, Schedule, Step
from .walk import walk

Number = float | int
PerStage = Number | Sequence[Number]


class CostModel(Protocol):
    """What the simulator needs: the duration of each step and the p2p latency."""

    def duration(self, schedule: Schedule, rank: int, index: int, step: Step) -> float: ...

    def latency(self, schedule: Schedule, src_rank: int, dst_rank: int) -> float: ...


def _is_number(x: Any) -> bool:
    """A finite, non-negative int or float (bool is not a cost)."""
    return (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and x >= 0)


def _check_cost(name: str, v: Any, per_stage: bool = True) -> int | None:
    """Raise ``ValueError`` unless ``v`` is a finite number >= 0 (or, with ``per_stage``, a
    non-empty list/tuple of them). Returns the list's length, None for a number."""
    if _is_number(v):
        return None
    if per_stage and isinstance(v, (list, tuple)) and v and all(_is_number(x) for x in v):
        return len(v)
    what = "a finite number >= 0" + (" or a list of one per stage" if per_stage else "")
    raise ValueError(f"cost {name} must be {what}, got {v!r}")


def _at(v: PerStage | None, stage: int) -> float | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    return float(v[stage])


@dataclass(frozen=True)
class Costs:
    """Constant costs per stage.

    ``F``: forward chunk; ``B``: full backward chunk (input + weight gradient); ``W``: its
    weight-gradient part, so an ``I`` (backward with W deferred) takes ``B - W``; ``FB``: an
    overlapped forward+backward pair (default ``None`` = ``F + B``, no overlap gain; if the
    pair's backward is an ``I``, ``FB - W``); ``comm``: p2p latency between different ranks.
    Each of ``F, B, W, FB`` is a finite number >= 0 or a list/tuple of them indexed by stage id
    (an overlapped pair uses the ``FB`` of its forward's stage); lists must all have the same
    length, and :func:`simulate` checks it against the schedule's number of stages.
    Bad values raise ``ValueError`` naming the cost.
    """

    F: PerStage = 1.0
    B: PerStage = 2.0
    W: PerStage = 1.0
    FB: PerStage | None = None
    comm: float = 0.0

    def __post_init__(self) -> None:
        lengths = {name: _check_cost(name, getattr(self, name))
                   for name in ("F", "B", "W", "FB") if getattr(self, name) is not None}
        _check_cost("comm", self.comm, per_stage=False)
        per_stage = {name: n for name, n in lengths.items() if n is not None}
        if len(set(per_stage.values())) > 1:
            raise ValueError("per-stage costs must all have the same length (one per stage), "
                             "got " + ", ".join(f"{k}: {n}" for k, n in per_stage.items()))
        n = max(per_stage.values(), default=1)
        if any(_at(self.W, i) > _at(self.B, i)  # type: ignore[operator]
               for i in range(n)):
            raise ValueError(f"W ({self.W}) cannot exceed B ({self.B}): W is a part of B")

    def validate(self, schedule: Schedule) -> None:
        """Raise ``ValueError`` if a per-stage cost list does not have one entry per stage of
        ``schedule`` (called by :func:`simulate`)."""
        n = schedule.num_stages
        for name in ("F", "B", "W", "FB"):
            v = getattr(self, name)
            if isinstance(v, (list, tuple)) and len(v) != n:
                raise ValueError(f"cost {name} must be a finite number >= 0 or a list of one per "
                                 f"stage ({n} for this {schedule.method} schedule), got "
                                 f"{len(v)} values: {v!r}")

    def action_time(self, kind: Kind, stage: int) -> float:
        f, b, w = _at(self.F, stage), _at(self.B, stage), _at(self.W, stage)
        assert f is not None and b is not None and w is not None
        return {Kind.F: f, Kind.B: b, Kind.I: b - w, Kind.W: w}[kind]

    def duration(self, schedule: Schedule, rank: int, index: int, step: Step) -> float:
        if isinstance(step, Overlap):
            fb = _at(self.FB, step.forward.stage)
            bwd = self.action_time(step.backward.kind, step.backward.stage)
            if fb is None:
                return self.action_time(Kind.F, step.forward.stage) + bwd
            if step.backward.kind is Kind.I:
                return fb - (_at(self.W, step.backward.stage) or 0.0)
            return fb
        return self.action_time(step.kind, step.stage)

    def latency(self, schedule: Schedule, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else float(self.comm)

    def scaled(self, factor: float) -> Costs:
        """The same costs times ``factor`` (latency unchanged): a stage cut in ``1/factor``."""
        def sc(v: PerStage | None) -> PerStage | None:
            if v is None:
                return None
            return v * factor if isinstance(v, (int, float)) else [x * factor for x in v]
        return Costs(sc(self.F), sc(self.B), sc(self.W), sc(self.FB), self.comm)  # type: ignore


@dataclass
class MeasuredCosts:
    """Measured per-step durations, e.g. from the DualPipe runtime's timeline.

    ``durations`` maps a step to its duration (any time unit, consistently). A key is, in
    order of precedence:

    1. ``(rank, index)``: the ``index``-th step of ``rank``'s program (``schedule.steps[rank]``);
    2. the step itself (an :class:`~deeppar.pipeline.ir.Action` or ``Overlap``);
    3. its string, ``str(step)``: ``"F3@s1"``, ``"I3@s1"``, ``"W3@s1"``, ``"B3@s1"``,
       ``"(F3@s1;B1@s6)"`` (unique in a schedule, so no rank is needed).

    Steps not found fall back to ``fallback`` (a :class:`Costs`), or raise ``KeyError`` when it
    is ``None``. ``comm`` is the p2p latency between different ranks. :func:`simulate` first
    checks the keys against the schedule (:meth:`validate`): a key naming no step of it (a
    ``(rank, index)`` past the rank's program, ``"F99@s0"`` with 8 micro-batches), or a
    ``by_index`` list whose length is not that of its rank's program, raises ``ValueError``
    rather than being ignored. ``by_index_lengths`` records those list lengths
    (:meth:`from_dict` fills it).

    JSON form (:meth:`to_json` / :meth:`from_json`, what the runtime writes)::

        {"comm": 0.0,
         "durations": {"F3@s1": 1.25, "(F3@s1;B1@s6)": 3.5, ...},     # by step string
         "by_index": {"0": [1.0, 1.1, ...], "1": [...]}}              # or per rank, in order

    Either ``durations`` or ``by_index`` (or both) may be present. :meth:`from_dict` also reads
    the runtime's own timeline file, the Chrome trace that
    :func:`deeppar.pipeline.timeline.write_chrome_trace` writes (one complete event per step,
    the rank as its thread, the step's index in ``args``, microseconds).
    """

    durations: Mapping[Any, float] = field(default_factory=dict)
    comm: float = 0.0
    fallback: Costs | None = None
    by_index_lengths: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [(k, v) for k, v in self.durations.items() if not _is_number(v)]
        if bad:
            raise ValueError(f"measured durations must be finite numbers >= 0, got "
                             f"{bad[0][1]!r} for {bad[0][0]!r}")
        _check_cost("comm", self.comm, per_stage=False)
        if self.fallback is not None and not isinstance(self.fallback, Costs):
            raise ValueError(f"fallback must be a Costs, got {type(self.fallback).__name__}")

    def validate(self, schedule: Schedule) -> None:
        """Raise ``ValueError`` for keys that name no step of ``schedule`` and for per-rank
        lists (``by_index``) whose length differs from the rank's program."""
        steps = {st for prog in schedule.steps for st in prog}
        names = {str(st) for st in steps}
        unknown = []
        for k in self.durations:
            if isinstance(k, tuple):
                ok = (len(k) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                          for x in k)
                      and 0 <= k[0] < schedule.num_ranks
                      and 0 <= k[1] < len(schedule.steps[k[0]]))
            elif isinstance(k, str):
                ok = k in names
            else:
                ok = k in steps
            if not ok:
                unknown.append(k)
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:5])
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise ValueError(f"measured durations name steps that are not in this "
                             f"{schedule.method} schedule (ranks={schedule.num_ranks}, "
                             f"chunks={schedule.num_chunks}): {shown}{more}")
        for r, n in self.by_index_lengths.items():
            if not 0 <= r < schedule.num_ranks:
                raise ValueError(f"measured by_index names rank {r}; the schedule has ranks "
                                 f"0..{schedule.num_ranks - 1}")
            if n != len(schedule.steps[r]):
                raise ValueError(f"measured by_index of rank {r} has {n} durations; its "
                                 f"program has {len(schedule.steps[r])} steps")
        if self.fallback is not None:
            self.fallback.validate(schedule)

    def duration(self, schedule: Schedule, rank: int, index: int, step: Step) -> float:
        d = self.durations
        for key in ((rank, index), step, str(step)):
            if key in d:
                return float(d[key])
        if self.fallback is not None:
            return self.fallback.duration(schedule, rank, index, step)
        raise KeyError(f"no measured duration for rank {rank} step {index} ({step}) "
                       "and no fallback costs")

    def latency(self, schedule: Schedule, src_rank: int, dst_rank: int) -> float:
        return 0.0 if src_rank == dst_rank else float(self.comm)

    def to_dict(self) -> dict[str, Any]:
        by_str: dict[str, float] = {}
        by_index: dict[str, list[float]] = {}
        for k, v in self.durations.items():
            if isinstance(k, tuple):
                r, i = k
                lst = by_index.setdefault(str(r), [])
                if len(lst) != i:
                    raise ValueError("by-index durations must be contiguous from 0 to serialise")
                lst.append(float(v))
            else:
                by_str[str(k)] = float(v)
        return {"comm": self.comm, "durations": by_str, "by_index": by_index}

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), what="the measured costs")

    @staticmethod
    def from_dict(d: Mapping[str, Any], fallback: Costs | None = None) -> MeasuredCosts:
        """Read the JSON form (see the class doc); ``ValueError`` for a malformed one."""
        if not isinstance(d, Mapping):
            raise ValueError(f"measured costs must be a JSON object, got {type(d).__name__}")
        if "traceEvents" in d:
            return MeasuredCosts.from_chrome_trace(d, fallback)
        extra = set(d) - {"comm", "durations", "by_index"}
        if extra:
            raise ValueError(f"measured costs: unknown field(s) {sorted(extra)}; expected "
                             "'durations', 'by_index', 'comm'")
        by_str = d.get("durations", {})
        if not isinstance(by_str, Mapping):
            raise ValueError("measured costs: 'durations' must map step strings to numbers")
        durations: dict[Any, float] = {}
        for k, v in by_str.items():
            if not _is_number(v):
                raise ValueError(f"measured costs: duration of {k!r} must be a finite number "
                                 f">= 0, got {v!r}")
            durations[str(k)] = float(v)
        by_index = d.get("by_index", {})
        if not isinstance(by_index, Mapping):
            raise ValueError("measured costs: 'by_index' must map ranks to lists of numbers")
        lengths: dict[int, int] = {}
        for r, lst in by_index.items():
            try:
                rank = int(r)
            except ValueError:
                raise ValueError(f"measured costs: by_index key {r!r} is not a rank") from None
            if not isinstance(lst, list) or not all(_is_number(v) for v in lst):
                raise ValueError(f"measured costs: by_index of rank {r} must be a list of "
                                 f"finite numbers >= 0, got {lst!r}")
            lengths[rank] = len(lst)
            for i, v in enumerate(lst):
                durations[(rank, i)] = float(v)
        comm = d.get("comm", 0.0)
        _check_cost("comm", comm, per_stage=False)
        return MeasuredCosts(durations, float(comm), fallback, lengths)

    @staticmethod
    def from_chrome_trace(d: Mapping[str, Any], fallback: Costs | None = None
                          ) -> MeasuredCosts:
        """Per-step durations of a measured timeline's Chrome trace (see the class doc):
        every complete (``"X"``) event with an integer ``args.index`` is step ``index`` of rank
        ``tid``; ``comm`` (optional) is the latency. ``ValueError`` for a trace with no steps."""
        events = d.get("traceEvents")
        if not isinstance(events, list):
            raise ValueError("measured timeline: 'traceEvents' must be a list of events")
        durations: dict[Any, float] = {}
        for e in events:
            if not isinstance(e, Mapping) or e.get("ph") != "X":
                continue
            args, rank, dur = e.get("args"), e.get("tid"), e.get("dur")
            index = args.get("index") if isinstance(args, Mapping) else None
            if not (isinstance(rank, int) and isinstance(index, int)):
                continue
            if not _is_number(dur):
                raise ValueError(f"measured timeline: step {index} of rank {rank} has duration "
                                 f"{dur!r}, not a finite number >= 0")
            durations[(rank, index)] = float(dur)
        if not durations:
            raise ValueError("measured timeline: no step events (complete events with the rank "
                             "as 'tid' and 'args.index') in 'traceEvents'")
        comm = d.get("comm", 0.0)
        _check_cost("comm", comm, per_stage=False)
        return MeasuredCosts(durations, float(comm), fallback)

    @staticmethod
    def from_json(text: str, fallback: Costs | None = None) -> MeasuredCosts:
        return MeasuredCosts.from_dict(json.loads(text), fallback)


@dataclass(frozen=True)
class TimedStep:
    """One step of a run, simulated (cost units) or measured by the runtime (microseconds):
    the ``index``-th step of ``rank``'s program, ``step`` as in the schedule (or, in a
    forward-only run, the live forward action of an overlapped pair)."""

    rank: int
    index: int
    step: Step
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def kind(self) -> str:
        """``F``, ``B``, ``I``, ``W`` or ``FB`` (an overlapped pair)."""
        return "FB" if isinstance(self.step, Overlap) else self.step.kind.value


@dataclass
class SimResult:
    """Outcome of :func:`simulate`. ``bubble[r] = makespan - busy[r]``."""

    schedule: Schedule
    makespan: float
    busy: list[float]
    bubble: list[float]
    peak_activations: list[int]
    timeline: list[TimedStep]

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.schedule.method,
            "ranks": self.schedule.num_ranks,
            "chunks": self.schedule.num_chunks,
            "makespan": self.makespan,
            "busy": self.busy,
            "bubble": self.bubble,
            "peak_activations": self.peak_activations,
            "timeline": [{"rank": t.rank, "index": t.index, "step": str(t.step),
                          "start": t.start, "end": t.end} for t in self.timeline],
        }


def _as_cost_model(costs: CostModel | Mapping[Any, float] | None) -> CostModel:
    if costs is None:
        return Costs()
    if isinstance(costs, Mapping):
        return MeasuredCosts(costs)
    return costs


def simulate(schedule: Schedule, costs: CostModel | Mapping[Any, float] | None = None
             ) -> SimResult:
    """Simulate ``schedule`` with ``costs`` (a :class:`Costs`, a :class:`MeasuredCosts`, or a
    plain mapping of measured durations; default ``Costs()`` = F 1, B 2, W 1, no overlap gain,
    no latency). Raises ``ValueError`` if the schedule deadlocks, for costs that do not fit it
    (see :meth:`Costs.validate` and :meth:`MeasuredCosts.validate`; any cost model with a
    ``validate(schedule)`` method is checked) and for durations that are not finite and >= 0."""
    model = _as_cost_model(costs)
    check = getattr(model, "validate", None)
    if callable(check):
        check(schedule)
    s = schedule
    P = s.num_ranks
    producer = s.producers()
    end: list[list[float]] = [[0.0] * len(p) for p in s.steps]
    start: list[list[float]] = [[0.0] * len(p) for p in s.steps]
    pos = [0] * P
    free = [0.0] * P

    def advance(r: int) -> bool:
        prog = s.steps[r]
        i = pos[r]
        if i >= len(prog):
            return False
        ready = free[r]
        for t in s.recvs_before(r, prog[i]):
            if t.key not in producer:
                continue  # validator's business; treat as available
            pr, pi = producer[t.key]
            if pos[pr] <= pi:
                return False
            ready = max(ready, end[pr][pi] + model.latency(s, pr, r))
        d = float(model.duration(s, r, i, prog[i]))
        if not d >= 0 or not math.isfinite(d):
            raise ValueError(f"duration {d} for rank {r} step {i} ({prog[i]}) is not a "
                             "finite number >= 0")
        start[r][i] = ready
        end[r][i] = ready + d
        if not math.isfinite(end[r][i]):
            raise ValueError(f"costs too large: rank {r} step {i} ({prog[i]}) would end "
                             "beyond the largest float (the times overflow)")
        free[r] = end[r][i]
        pos[r] += 1
        return True

    walk(P, advance)
    stuck = [(r, str(s.steps[r][pos[r]])) for r in range(P) if pos[r] < len(s.steps[r])]
    if stuck:
        raise ValueError(f"schedule deadlocks: ranks blocked at {stuck}")
    makespan = max(free) if P else 0.0
    busy = [sum(e - b for b, e in zip(start[r], end[r])) for r in range(P)]
    timeline = [TimedStep(r, i, st, start[r][i], end[r][i])
                for r, prog in enumerate(s.steps) for i, st in enumerate(prog)]
    timeline.sort(key=lambda t: (t.start, t.rank))
    return SimResult(s, makespan, busy, [makespan - b for b in busy],
                     [peak_activations(s, r) for r in range(P)], timeline)


def peak_activations(schedule: Schedule, rank: int) -> int:
    """Peak number of live (stage, micro-batch) activations on ``rank`` (see module doc).
    Program order suffices: a rank's steps never overlap in time."""
    live = peak = 0
    for step in schedule.steps[rank]:
        for a in step.actions:  # an Overlap lists its F first
            if a.kind is Kind.F:
                live += 1
                peak = max(peak, live)
            elif a.kind in (Kind.B, Kind.W):
                live -= 1
    return peak


# ------------------------------------------------------------------------------ published
def _f(c: Costs, name: str) -> float:
    v = getattr(c, name)
    if v is None and name == "FB":
        return _f(c, "F") + _f(c, "B")
    if not isinstance(v, (int, float)):
        raise ValueError("published formulas need scalar costs")
    return float(v)


#: bubble formulas of the published cost table (specs/dualpipe.md), PP = number of ranks
#: (for DualPipeV the table's PP stages run on PP/2 ranks: formula with PP = 2 * ranks)
PUBLISHED_BUBBLE: dict[str, Callable[[int, Costs], float]] = {
    "1f1b": lambda pp, c: (pp - 1) * (_f(c, "F") + _f(c, "B")),
    "zb1p": lambda pp, c: (pp - 1) * (_f(c, "F") + _f(c, "B") - 2 * _f(c, "W")),
    "dualpipe": lambda pp, c: (pp / 2 - 1) * (_f(c, "FB") + _f(c, "B") - 3 * _f(c, "W")),
    "dualpipev": lambda pp, c: (pp / 2 - 1) * (_f(c, "FB") + _f(c, "B") - 3 * _f(c, "W")),
}


def schedule_bubble(result: SimResult) -> float:
    """The bubble the published table means: the largest per-rank bubble,
    ``makespan - min(busy)`` (equal on every rank for 1F1B and ZB-H1; for DualPipe with an
    overlap gain, ``FB < F + B``, the middle ranks, which run the most overlapped pairs)."""
    return max(result.bubble)


def compare_published(method: str, ranks: int, chunks: int, costs: Costs | None = None
                      ) -> dict[str, Any]:
    """Set the simulated bubble against the published formula.

    Returns ``{"method", "ranks", "chunks", "pp", "simulated", "published", "difference",
    "holds", "condition"}``: ``simulated`` is :func:`schedule_bubble` of the simulated run,
    ``published`` the table's formula with ``PP = ranks`` (``2 * ranks`` for DualPipeV, whose
    table row counts stages), ``difference = simulated - published`` and ``holds`` whether they
    agree to 1e-9. ``condition`` states when the formula is exact. Raises ``ValueError`` for a
    method without a published formula (zbv) and for per-stage (non-scalar) costs.
    """
    from .schedules import build, canonical_method

    m = canonical_method(method)
    if m not in PUBLISHED_BUBBLE:
        raise ValueError(f"no published bubble formula for {m!r}; have "
                         f"{', '.join(PUBLISHED_BUBBLE)}")
    c = costs or Costs()
    res = simulate(build(m, ranks, chunks), c)
    pp = 2 * ranks if m == "dualpipev" else ranks
    published = PUBLISHED_BUBBLE[m](pp, c)
    simulated = schedule_bubble(res)
    cond = {
        "1f1b": "always (no latency)",
        "zb1p": "F = B - W = W (the paper's setting)",
        "dualpipe": "B - W = F and W <= F (spec)",
        "dualpipev": "B - W = F and W <= F (spec)",
    }[m]
    return {"method": m, "ranks": ranks, "chunks": chunks, "pp": pp, "simulated": simulated,
            "published": published, "difference": simulated - published,
            "holds": abs(simulated - published) < 1e-9, "condition": cond}


__all__ = ["CostModel", "Costs", "MeasuredCosts", "PUBLISHED_BUBBLE", "SimResult", "TimedStep",
           "compare_published", "peak_activations", "schedule_bubble", "simulate"]
