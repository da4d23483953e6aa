"""Schedule generators: ``build(method, ranks, chunks)`` for 1F1B, ZB-H1, ZBV, DualPipe and
DualPipeV, all producing the :class:`~deeppar.pipeline.ir.Schedule` IR.

Micro-batch ids are global: ``0 .. chunks-1``. For DualPipe, ``0 .. chunks/2-1`` enter at rank 0
(direction 0) and ``chunks/2 .. chunks-1`` at the last rank (direction 1). Stage ids and
placements are described in :mod:`deeppar.pipeline.ir`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .ir import Action, Kind, Overlap, Schedule, StageInfo, Step, make_stages

#: methods accepted by :func:`build`, with a one-line description
METHODS: dict[str, str] = {
    "1f1b": "classic one-forward-one-backward (PipeDream-flush)",
    "zb1p": "zero-bubble ZB-H1 (Qi et al., ICLR 2024): 1F1B with B split into I and W",
    "zbv": "zero-bubble ZB-V, ordered as PyTorch's ScheduleZBVZeroBubble",
    "dualpipe": "DeepSeek-V3 DualPipe (bidirectional, 2 stage copies per rank)",
    "dualpipev": "DualPipeV, DualPipe cut in half (V-shaped, 2 stages per rank)",
}

_ALIASES = {"zbh1": "zb1p", "zb-h1": "zb1p", "zb_h1": "zb1p", "zb-v": "zbv",
            "dualpipe-v": "dualpipev", "dualpipe_v": "dualpipev"}


def canonical_method(method: str) -> str:
    """Lower-case method name with aliases resolved; raises ``ValueError`` for unknown ones."""
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, one of {', '.join(METHODS)}; got "
                         f"{type(method).__name__}")
    m = method.strip().lower()
    m = _ALIASES.get(m, m)
    if m not in METHODS:
        raise ValueError(f"unknown schedule method {method!r}; choose one of "
                         f"{', '.join(METHODS)}")
    return m


#: size limits of a schedule (about 1.2 million steps at the product limit: seconds to build,
#: hundreds of MB); larger requests would exhaust memory
MAX_RANKS = 1024
MAX_RANKS_X_CHUNKS = 1 << 20


def check_params(method: str, ranks: int, chunks: int) -> None:
    """Raise ``ValueError`` naming the violated constraint if ``build`` cannot build this."""
    m = canonical_method(method)
    # bool is an int subclass: ranks=True would silently mean one rank
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"{m}: ranks must be an integer >= 1, got {ranks!r}")
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"{m}: chunks (micro-batches) must be an integer >= 1, got {chunks!r}")
    if ranks > MAX_RANKS:
        raise ValueError(f"{m}: ranks must be at most {MAX_RANKS}, got {ranks}")
    if ranks * chunks > MAX_RANKS_X_CHUNKS:
        raise ValueError(f"{m}: ranks * chunks must be at most {MAX_RANKS_X_CHUNKS} (the schedule "
                         f"holds a few steps per rank and micro-batch), got {ranks} * {chunks}")
    if m == "dualpipe":
        if ranks % 2:
            raise ValueError(f"dualpipe: ranks must be even (each rank pairs with rank "
                             f"PP-1-r), got ranks={ranks}")
        if chunks % 2:
            raise ValueError(f"dualpipe: chunks must be even (half enter at each end), "
                             f"got chunks={chunks}")
        if chunks < 2 * ranks:
            raise ValueError(f"dualpipe: needs chunks >= 2*ranks = {2 * ranks}, "
                             f"got chunks={chunks}")
    elif m == "dualpipev" and chunks < 2 * ranks:
        raise ValueError(f"dualpipev: needs chunks >= 2*ranks = {2 * ranks} (the number of "
                         f"stages), got chunks={chunks}")


def build(method: str, ranks: int, chunks: int) -> Schedule:
    """Build the schedule ``method`` for ``ranks`` pipeline ranks and ``chunks`` micro-batches.

    ``method`` is one of :data:`METHODS` (``1f1b``, ``zb1p``, ``zbv``, ``dualpipe``,
    ``dualpipev``). Constraints: ``ranks >= 1`` and ``chunks >= 1`` always; DualPipe needs even
    ranks, even chunks and ``chunks >= 2*ranks``; DualPipeV needs ``chunks >= 2*ranks``.
    """
    m = canonical_method(method)
    check_params(m, ranks, chunks)
    return _BUILDERS[m](ranks, chunks)


# ------------------------------------------------------------------------------- placements
def _linear_stages(P: int) -> tuple[StageInfo, ...]:
    return make_stages([(r, 0, 0, 0, r) for r in range(P)], [list(range(P))])


def _v_stages(P: int) -> tuple[StageInfo, ...]:
    """Stages 0..2P-1, rank r holds r (slot/phase 0) and 2P-1-r (slot/phase 1)."""
    placement = []
    for s in range(2 * P):
        if s < P:
            placement.append((s, 0, 0, 0, s))
        else:
            placement.append((2 * P - 1 - s, 1, 1, 1, s))
    return make_stages(placement, [list(range(2 * P))])


def _dualpipe_stages(P: int) -> tuple[StageInfo, ...]:
    """Stage id k < P: S_k direction 0 on rank k (slot 0); id P+k: S_k direction 1 on rank
    P-1-k (slot 1). Phase = slot ^ (rank >= P/2)."""
    placement = []
    for s in range(2 * P):
        if s < P:
            rank, slot, direction, model = s, 0, 0, s
        else:
            k = s - P
            rank, slot, direction, model = P - 1 - k, 1, 1, k
        phase = slot ^ int(rank >= P // 2)
        placement.append((rank, slot, phase, direction, model))
    return make_stages(placement, [list(range(P)), list(range(P, 2 * P))])


def _act(stages: tuple[StageInfo, ...], kind: Kind, stage: int, mb: int) -> Action:
    info = stages[stage]
    return Action(kind, stage, mb, info.phase, info.direction)


# ------------------------------------------------------------------------------- 1F1B, ZB-H1
def _one_f_one_b(P: int, N: int, split: bool, method: str) -> Schedule:
    stages = _linear_stages(P)
    progs = [_one_f_one_b_rank(stages, P, N, r, split) for r in range(P)]
    return Schedule(method, P, N, stages, tuple(progs), tuple(0 for _ in range(N)))


def _one_f_one_b_rank(stages: tuple[StageInfo, ...], P: int, N: int, r: int, split: bool
                      ) -> tuple[Step, ...]:
    """1F1B on rank ``r``; with ``split`` (ZB-H1) every B is an I and ``W(k)`` follows
    ``I(k + r)``."""
    prog: list[Step] = []
    warm = min(P - r - 1, N)
    f = b = w = 0

    def fwd() -> None:
        nonlocal f
        prog.append(_act(stages, Kind.F, r, f))
        f += 1

    def bwd() -> None:
        nonlocal b, w
        if not split:
            prog.append(_act(stages, Kind.B, r, b))
            b += 1
            return
        prog.append(_act(stages, Kind.I, r, b))
        b += 1
        # the W of micro-batch (b-1) - r follows this I
        while w <= b - 1 - r:
            prog.append(_act(stages, Kind.W, r, w))
            w += 1

    for _ in range(warm):
        fwd()
    for _ in range(N - warm):
        fwd()
        bwd()
    for _ in range(warm):
        bwd()
    while split and w < N:  # the deferred tail
        prog.append(_act(stages, Kind.W, r, w))
        w += 1
    return tuple(prog)


def build_1f1b(P: int, N: int) -> Schedule:
    """Classic 1F1B (PipeDream-flush). Rank ``r`` runs ``w = min(P-r-1, N)`` warm-up forwards,
    then ``N-w`` pairs ``F, B``, then ``w`` cool-down backwards; micro-batches in order."""
    s = _one_f_one_b(P, N, split=False, method="1f1b")
    s.meta["rule"] = "warm-up min(P-r-1,N) F; (N-warm-up) x [F, B]; warm-up x B"
    return s


def build_zb1p(P: int, N: int) -> Schedule:
    """ZB-H1 ("Zero Bubble Pipeline Parallelism", Qi et al., ICLR 2024, handcrafted schedule
    ZB-H1): the 1F1B order of forwards and backwards, each backward split into ``I`` (input
    gradient, on the critical path) and ``W`` (weight gradient, deferrable).

    Exact rule, rank ``r`` of ``P``: the F/I order is 1F1B's (``min(P-r-1, N)`` warm-up F, then
    ``F, I`` pairs, then the cool-down I's). Each ``W`` is delayed by ``r`` micro-batches:
    ``W(k)`` runs right after ``I(k + r)``, and the last ``min(r, N)`` W's run, in order, after
    the last I. Activation memory is unchanged in the sense of the paper: a rank holds at most
    ``P`` micro-batches' activations (``P - r`` in flight as in 1F1B, plus ``r`` waiting for
    their W), the peak of 1F1B's first rank. The last rank, which in 1F1B waits longest for its
    first forwards, runs its I's early so gradients reach the upstream ranks sooner; with
    ``F = I = W`` the bubble is ``(P-1)(F + B - 2W)`` as published.
    """
    s = _one_f_one_b(P, N, split=True, method="zb1p")
    s.meta["rule"] = "1F1B order with B -> I; W(k) right after I(k+r); remaining W's at the end"
    return s


# ------------------------------------------------------------------------------- ZBV
def build_zbv(P: int, N: int) -> Schedule:
    """ZB-V in the order of PyTorch's ``ScheduleZBVZeroBubble`` (rank r holds stages r and
    2P-1-r). With ``n = max(2P-1, N)``, rank r runs:

    1. ``2(P-r)-1`` x F on chunk 0,
    2. ``r`` x [F chunk 1, F chunk 0],
    3. ``P-r`` x [F chunk 1, I chunk 1, W chunk 1],
    4. while chunk 0 has forwards left (``< n``) or chunk 1 lags chunk 0:
       [F chunk 0 (if any left), I chunk 0, W chunk 0, F chunk 1, I chunk 1, W chunk 1],
    5. ``r`` x [I chunk 0, I chunk 1],
    6. ``P-r`` x [I chunk 0, W chunk 0],
    7. the remaining W's of chunk 1, then those of chunk 0;

    actions on micro-batches ``>= N`` (padding when ``N < 2P-1``) are dropped.
    """
    stages = _v_stages(P)
    progs = [_zbv_rank(stages, P, N, r) for r in range(P)]
    sched = Schedule("zbv", P, N, stages, tuple(progs), tuple(0 for _ in range(N)))
    sched.meta["rule"] = "PyTorch ScheduleZBVZeroBubble order"
    return sched


def _zbv_rank(stages: tuple[StageInfo, ...], P: int, N: int, r: int) -> tuple[Step, ...]:
    n = max(2 * P - 1, N)
    s0, s1 = r, 2 * P - 1 - r
    cnt = {(s, k): 0 for s in (s0, s1) for k in (Kind.F, Kind.I, Kind.W)}
    ops: list[Action] = []

    def emit(s: int, k: Kind, mb: int | None = None) -> None:
        if mb is None:
            mb = cnt[(s, k)]
            cnt[(s, k)] += 1
        ops.append(_act(stages, k, s, mb))

    for _ in range(2 * (P - r) - 1):
        emit(s0, Kind.F)
    for _ in range(r):
        emit(s1, Kind.F)
        emit(s0, Kind.F)
    for _ in range(P - r):
        emit(s1, Kind.F)
        emit(s1, Kind.I)
        emit(s1, Kind.W)
    while cnt[(s1, Kind.F)] < cnt[(s0, Kind.F)] or cnt[(s0, Kind.F)] < n:
        if cnt[(s0, Kind.F)] < n:
            emit(s0, Kind.F)
        emit(s0, Kind.I)
        emit(s0, Kind.W)
        emit(s1, Kind.F)
        emit(s1, Kind.I)
        emit(s1, Kind.W)
    for _ in range(r):
        emit(s0, Kind.I)
        emit(s1, Kind.I)
    for _ in range(P - r):
        emit(s0, Kind.I)
        emit(s0, Kind.W)
    for s in (s1, s0):
        while cnt[(s, Kind.W)] < cnt[(s, Kind.I)]:
            emit(s, Kind.W)
    return tuple(a for a in ops if a.microbatch < N)


# ------------------------------------------------------------------------------- DualPipe(V)
def _dual(P: int, N: int, v: bool) -> Schedule:
    """The eight steps of the spec, shared by DualPipe (``v=False``) and DualPipeV."""
    stages = _v_stages(P) if v else _dualpipe_stages(P)
    progs = [_dual_rank(stages, P, N, v, r) for r in range(P)]
    if v:
        entry = tuple(0 for _ in range(N))
    else:
        entry = tuple(0 if m < N // 2 else P for m in range(N))
    return Schedule("dualpipev" if v else "dualpipe", P, N, stages, tuple(progs), entry)


def _dual_rank(stages: tuple[StageInfo, ...], P: int, N: int, v: bool, r: int
               ) -> tuple[Step, ...]:
    """Rank ``r``'s program of DualPipe (``v=False``) or DualPipeV."""
    half = P if v else P // 2
    per_phase = N if v else N // 2
    h = r if v else min(r, P - 1 - r)
    middle = (r == P - 1) if v else (h == half - 1)
    second_half = (not v) and r >= P // 2
    # phase -> stage id on this rank
    stage_of = {}
    for phase in (0, 1):
        slot = phase ^ int(second_half)
        stage_of[phase] = r if slot == 0 else 2 * P - 1 - r
    base = {p: (per_phase if stages[stage_of[p]].direction == 1 and not v else 0)
            for p in (0, 1)}
    fcnt = {0: 0, 1: 0}
    bcnt = {0: 0, 1: 0}
    wq: deque[Action] = deque()
    prog: list[Step] = []

    def F(p: int) -> Action:
        a = _act(stages, Kind.F, stage_of[p], base[p] + fcnt[p])
        fcnt[p] += 1
        return a

    def Bk(p: int, zb: bool) -> Action:
        a = _act(stages, Kind.I if zb else Kind.B, stage_of[p], base[p] + bcnt[p])
        bcnt[p] += 1
        if zb:
            wq.append(_act(stages, Kind.W, a.stage, a.microbatch))
        return a

    def W() -> Action:
        return wq.popleft()

    n1 = half - h - 1
    # 1. (half-h-1)*2 x F0
    for _ in range(2 * n1):
        prog.append(F(0))
    # 2. (h+1) x [F0, F1]
    for _ in range(h + 1):
        prog.append(F(0))
        prog.append(F(1))
    # 3. (half-h-1) x [B1 (W deferred), W, F1]
    for _ in range(n1):
        prog.append(Bk(1, True))
        prog.append(W())
        prog.append(F(1))
    # 4. (per_phase - 2*half + h + 1) x [F0&B1, F1&B0]; the middle ranks run their first
    #    F0&B1 unoverlapped (F0 then B1)
    for i in range(per_phase - 2 * half + h + 1):
        if i == 0 and middle:
            prog.append(F(0))
            prog.append(Bk(1, False))
        else:
            f = F(0)
            prog.append(Overlap(f, Bk(1, False)))
        f = F(1)
        prog.append(Overlap(f, Bk(0, False)))
    # 5. (half-h-1) x [B1, F1&B0]
    for _ in range(n1):
        prog.append(Bk(1, False))
        f = F(1)
        prog.append(Overlap(f, Bk(0, False)))
    # 6. (h+1) x [B1, B0]; the last h+1 of these 2(h+1) backwards defer their W
    zb = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        prog.append(Bk(1, zb))
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        prog.append(Bk(0, zb))
    # 7. (half-h-1) x [W, B0 (W deferred)]
    for _ in range(n1):
        prog.append(W())
        prog.append(Bk(0, True))
    # 8. (h+1) x W
    for _ in range(h + 1):
        prog.append(W())
    assert not wq, "W queue not empty at the end"
    assert fcnt == bcnt == {0: per_phase, 1: per_phase}, (fcnt, bcnt)
    return tuple(prog)


def build_dualpipe(P: int, N: int) -> Schedule:
    """DualPipe exactly as in ``specs/dualpipe.md`` (eight steps per rank, ``h = min(r, P-1-r)``,
    ``half = P/2``); see the module docstring of :mod:`deeppar.pipeline.ir` for stage ids.
    ``I`` is "B with its W deferred"; the middle ranks' first F0&B1 is an ``F`` followed by a
    ``B``; the W's run FIFO."""
    s = _dual(P, N, v=False)
    s.meta["rule"] = "DualPipe eight steps (specs/dualpipe.md)"
    return s


def build_dualpipev(P: int, N: int) -> Schedule:
    """DualPipeV exactly as in ``specs/dualpipe.md`` (``half -> P``, ``h -> r``); the last rank
    runs its first pair unoverlapped. Identical to PyTorch's ``ScheduleDualPipeV`` order."""
    s = _dual(P, N, v=True)
    s.meta["rule"] = "DualPipeV eight steps (specs/dualpipe.md)"
    return s


_BUILDERS: dict[str, Callable[[int, int], Schedule]] = {
    "1f1b": build_1f1b,
    "zb1p": build_zb1p,
    "zbv": build_zbv,
    "dualpipe": build_dualpipe,
    "dualpipev": build_dualpipev,
}

__all__ = ["METHODS", "build", "canonical_method", "check_params", "build_1f1b", "build_zb1p",
           "build_zbv", "build_dualpipe", "build_dualpipev"]
