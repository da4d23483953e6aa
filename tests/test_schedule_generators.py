"""Schedule generators: the spec's step counts, PyTorch's orders, validity, errors."""

from __future__ import annotations

import pytest

from deeppar.pipeline import Action, Kind, Overlap, build
from deeppar.pipeline.export import to_torch_actions
from deeppar.pipeline.validate import check

METHODS = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")


def _grid(method):
    for P in range(1, 9):
        for N in range(1, 3 * P + 5):
            try:
                yield P, N, build(method, P, N)
            except ValueError:
                continue


@pytest.mark.parametrize("method", METHODS)
def test_every_generator_is_valid(method):
    n = 0
    for P, N, s in _grid(method):
        assert check(s) == [], (method, P, N)
        assert s.num_ranks == P and s.num_chunks == N
        n += 1
    assert n >= 20


# ---------------------------------------------------------------------- DualPipe step counts
def _tokens(prog):
    """('F', phase) / ('B', phase, zb) / ('W',) / ('FB', fphase, bphase)."""
    out = []
    for st in prog:
        if isinstance(st, Overlap):
            assert st.backward.kind is Kind.B  # overlapped backwards never defer W
            out.append(("FB", st.forward.phase, st.backward.phase))
        elif st.kind is Kind.F:
            out.append(("F", st.phase))
        elif st.kind is Kind.W:
            out.append(("W",))
        else:
            out.append(("B", st.phase, st.kind is Kind.I))
    return out


def _spec_tokens(P, N, r, v):
    """The eight steps of specs/dualpipe.md, written out independently of the generator."""
    half, h, M = (P, r, N) if v else (P // 2, min(r, P - 1 - r), N // 2)
    middle = r == P - 1 if v else h == half - 1
    n = half - h - 1
    t = [("F", 0)] * (2 * n)
    t += [("F", 0), ("F", 1)] * (h + 1)
    t += [("B", 1, True), ("W",), ("F", 1)] * n
    for i in range(M - 2 * half + h + 1):
        t += [("F", 0), ("B", 1, False)] if (i == 0 and middle) else [("FB", 0, 1)]
        t += [("FB", 1, 0)]
    t += [("B", 1, False), ("FB", 1, 0)] * n
    bw = [1, 0] * (h + 1)
    for j, ph in enumerate(bw):  # the last h+1 of the 2(h+1) backward chunks defer W
        t.append(("B", ph, j >= h + 1))
    t += [("W",), ("B", 0, True)] * n
    t += [("W",)] * (h + 1)
    return t


@pytest.mark.parametrize("P", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 2, 6])
def test_dualpipe_follows_spec_steps(P, extra):
    N = 2 * P + extra
    s = build("dualpipe", P, N)
    for r in range(P):
        assert _tokens(s.steps[r]) == _spec_tokens(P, N, r, v=False), r


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("extra", [0, 1, 5])
def test_dualpipev_follows_spec_steps(P, extra):
    N = 2 * P + extra
    s = build("dualpipev", P, N)
    for r in range(P):
        assert _tokens(s.steps[r]) == _spec_tokens(P, N, r, v=True), r


def test_spec_odd_even_h_rule():
    """For odd h the W deferral starts at B1 of iteration (h+1)/2, for even h at B0 of h/2."""
    s = build("dualpipe", 8, 16)
    for r, h in ((1, 1), (2, 2), (3, 3)):
        prog = s.steps[r]
        n7 = 4 - h - 1  # step 7's backwards come after step 6's
        backs = [st for st in prog if isinstance(st, Action) and st.is_backward]
        tail = backs[-(2 * (h + 1) + n7):][:2 * (h + 1)]
        first_i = next(i for i, a in enumerate(tail) if a.kind is Kind.I)
        assert first_i == h + 1
        assert tail[first_i].phase == (1 if h % 2 else 0)
        assert all(a.kind is Kind.I for a in tail[first_i:])


def test_dualpipe_w_fifo_and_middle_ranks():
    s = build("dualpipe", 4, 8)
    for r, prog in enumerate(s.steps):
        order_i = [a for st in prog for a in st.actions if a.kind is Kind.I]
        order_w = [a for st in prog for a in st.actions if a.kind is Kind.W]
        assert [(a.stage, a.microbatch) for a in order_i] == \
               [(a.stage, a.microbatch) for a in order_w], r
    # middle ranks (1 and 2): the first F0&B1 runs unoverlapped (F then B)
    for r in (1, 2):
        prog = s.steps[r]
        first_pair_or_fb = next(i for i, st in enumerate(prog)
                                if isinstance(st, Overlap) or
                                (isinstance(st, Action) and st.kind is Kind.B))
        a, b = prog[first_pair_or_fb - 1], prog[first_pair_or_fb]
        assert isinstance(a, Action) and a.kind is Kind.F and a.phase == 0
        assert isinstance(b, Action) and b.kind is Kind.B and b.phase == 1


# ---------------------------------------------------------------------- PyTorch agreement
def _torch_ops(name, P, N):
    sv = pytest.importorskip("torch.distributed.pipelining._schedule_visualizer")
    ops = sv.get_schedule_ops(name, P, N, num_stages_per_rank=2)
    return [[str(a) for a in rank if a is not None] for rank in ops]


def test_dualpipev_example_from_torch():
    ops = to_torch_actions(build("dualpipev", 2, 4))
    assert ",".join(ops[0]).startswith("0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,")


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 6, 8])
def test_dualpipev_matches_torch(P):
    for N in list(range(2 * P, 2 * P + 7)) + [4 * P + 1]:
        assert to_torch_actions(build("dualpipev", P, N)) == _torch_ops("DualPipeV", P, N), N


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6])
def test_zbv_matches_torch(P):
    for N in range(1, 3 * P + 4):
        assert to_torch_actions(build("zbv", P, N)) == _torch_ops("ZBVZeroBubble", P, N), N


# ---------------------------------------------------------------------- 1F1B and ZB-H1
@pytest.mark.parametrize("P,N", [(1, 1), (1, 5), (4, 2), (4, 4), (4, 9), (7, 20)])
def test_1f1b_order(P, N):
    s = build("1f1b", P, N)
    for r, prog in enumerate(s.steps):
        warm = min(P - r - 1, N)
        kinds = "".join(a.kind.value for a in prog)
        assert kinds == "F" * warm + "FB" * (N - warm) + "B" * warm
        assert [a.microbatch for a in prog if a.kind is Kind.F] == list(range(N))
        assert [a.microbatch for a in prog if a.kind is Kind.B] == list(range(N))


@pytest.mark.parametrize("P,N", [(2, 3), (4, 8), (5, 12), (8, 8)])
def test_zb1p_rule(P, N):
    """1F1B's F/I order; W(k) right after I(k+r); the rest at the end."""
    s = build("zb1p", P, N)
    ref = build("1f1b", P, N)
    for r, prog in enumerate(s.steps):
        fi = [(a.kind.value, a.microbatch) for a in prog if a.kind is not Kind.W]
        assert fi == [("I" if a.kind is Kind.B else "F", a.microbatch) for a in ref.steps[r]]
        for i, a in enumerate(prog):
            if a.kind is Kind.W:
                prev = prog[i - 1]
                k = a.microbatch
                if k + r < N:
                    assert (prev.kind, prev.microbatch) == (Kind.I, k + r)
                else:
                    assert all(b.kind is Kind.W for b in prog[i:])


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("method,P,N,msg", [
    ("dualpipe", 3, 12, "ranks must be even"),
    ("dualpipe", 4, 9, "chunks must be even"),
    ("dualpipe", 4, 6, r"chunks >= 2\*ranks = 8"),
    ("dualpipev", 4, 7, r"chunks >= 2\*ranks = 8"),
    ("1f1b", 0, 4, "ranks must be an integer >= 1"),
    ("zbv", 2, 0, "chunks .* must be an integer >= 1"),
    ("gpipe", 2, 4, "unknown schedule method"),
    ("dualpipev", True, 4, "ranks must be an integer >= 1, got True"),
    ("1f1b", 2, True, "chunks .* must be an integer >= 1, got True"),
    ("1f1b", 2.0, 4, "ranks must be an integer"),
    ("1f1b", 2, "4", "chunks .* must be an integer"),
    (None, 2, 4, "method must be a string"),
])
def test_bad_parameters(method, P, N, msg):
    with pytest.raises(ValueError, match=msg):
        build(method, P, N)


def test_aliases():
    assert build("ZB-H1", 2, 4).method == "zb1p"
    assert build("DualPipeV", 2, 4).method == "dualpipev"
