"""The fused F&B engine on one process: bit-identical to F then B (and to one plain autograd
graph), the checks catch a dropped W or swapped sub-steps, declarations are validated, W goes to
the pipeline's store for an ``I`` backward, and the forward-only two-micro-batch overlap."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from _fused_helpers import (
    HIDDEN,
    MixLayer,
    MixStage,
    assert_bitwise,
    crit,
    fb_pair,
    grads_of,
    make_stages,
)

from deeppar.pipeline import fused
from deeppar.pipeline.fused import (
    ORDER_DEVICE,
    ORDER_HOST,
    FusedEngine,
    check_order,
    forward_substeps,
    forward_two_microbatches,
)
from deeppar.pipeline.overlap import can_overlap, run_overlapped
from deeppar.pipeline.substeps import (
    Comm,
    Compute,
    LayerSubSteps,
    StageSubSteps,
    check_stage,
    stage_substeps,
)
from deeppar.pipeline.weight_grad import WeightGradStore, activate


def _data(seed: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g)


def _compare(got: list[nn.Module], want: list[nn.Module], a: tuple, b: tuple) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x, y), "outputs / losses / input gradients differ"
    for s, r in zip(got, want):
        assert_bitwise(grads_of(s), grads_of(r))


@pytest.mark.parametrize("layers", [(1, 1), (2, 2), (3, 1), (1, 3)])
@pytest.mark.parametrize("order", [None, ORDER_DEVICE])
@pytest.mark.parametrize("seed", [0])
def test_pair_equals_f_then_b(layers: tuple[int, int], order, seed: int) -> None:
    torch.manual_seed(seed)
    got = [MixStage(layers[0]), MixStage(layers[1])]
    torch.manual_seed(seed)
    want = [MixStage(layers[0]), MixStage(layers[1])]
    xi, xj = _data(seed)
    eng = FusedEngine(order=order)
    a = fb_pair(eng, got, xi, xj, fused=True)
    b = fb_pair(eng, want, xi, xj, fused=False)
    _compare(got, want, a, b)
    # the forward's own backward later (through the record the pair kept)
    a[1].backward()
    b[1].backward()
    _compare(got, want, (), ())


def test_pair_equals_one_autograd_graph() -> None:
    got, want = make_stages(2, layers=2), make_stages(2, layers=2)
    xi, xj = _data(3)
    o, loss, gx = fb_pair(FusedEngine(), got, xi, xj, fused=True)
    xr = xj.clone().requires_grad_()
    crit(want[1].reference(xr)).backward()
    ref_out = want[0].reference(xi)
    assert torch.equal(o, ref_out) and torch.equal(gx, xr.grad)
    assert_bitwise(grads_of(got[1]), grads_of(want[1]))


def test_pair_with_output_gradients_and_nonleaf_input() -> None:
    """The backward side given (outputs, output gradients), its input made by another module:
    the input gradient continues into that module."""
    torch.manual_seed(4)
    pre_a, st_a = nn.Linear(HIDDEN, HIDDEN), make_stages(2, seed=4)
    torch.manual_seed(4)
    pre_b, st_b = nn.Linear(HIDDEN, HIDDEN), make_stages(2, seed=4)
    xi, xj = _data(5)
    g = torch.randn(4, HIDDEN)
    out_a = st_a[1](pre_a(xj))
    outs, _ = FusedEngine().forward_backward(st_a[0], [xi], None, [], st_a[1], None,
                                             [out_a], [g])
    out_b = st_b[1](pre_b(xj))
    ref = st_b[0](xi)
    out_b.backward(g)
    assert torch.equal(outs[0], ref)
    assert_bitwise(grads_of(pre_a), grads_of(pre_b))
    assert_bitwise(grads_of(st_a[1]), grads_of(st_b[1]))


def test_dropped_weight_gradient_is_caught(monkeypatch) -> None:
    """A broken engine that drops W: the bitwise comparison must fail."""
    got, want = make_stages(2), make_stages(2)
    xi, xj = _data(6)
    monkeypatch.setattr(fused._BackwardRun, "_weight",
                        lambda self, rec, k: setattr(rec, "weight_grad", None))
    a = fb_pair(FusedEngine(), got, xi, xj, fused=True)
    monkeypatch.undo()
    b = fb_pair(FusedEngine(), want, xi, xj, fused=False)
    with pytest.raises(AssertionError):
        _compare(got, want, a, b)


def test_swapped_substeps_are_caught() -> None:
    """A broken order that runs attn(B) (and its W) before mlp(B) (and its W), bypassing
    check_order: wrong gradients, and the bitwise comparison must fail; check_order itself
    rejects that order."""
    swapped = list(ORDER_HOST)
    for a, b in ((("B", "mlp"), ("B", "attn")), (("B", "mlp.W"), ("B", "attn.W"))):
        i, j = swapped.index(a), swapped.index(b)
        swapped[i], swapped[j] = swapped[j], swapped[i]
    with pytest.raises(ValueError, match="needs first"):
        check_order(swapped)
    got, want = make_stages(2), make_stages(2)
    xi, xj = _data(7)
    eng = FusedEngine()
    eng.order = tuple(swapped)
    a = fb_pair(eng, got, xi, xj, fused=True)
    b = fb_pair(eng, want, xi, xj, fused=False)
    with pytest.raises(AssertionError):
        _compare(got, want, a, b)


def test_order_checks() -> None:
    assert check_order(ORDER_DEVICE) == ORDER_DEVICE
    assert check_order(ORDER_HOST) == ORDER_HOST
    with pytest.raises(ValueError, match="exactly once"):
        check_order(ORDER_DEVICE[:-1])
    with pytest.raises(ValueError, match="exactly once"):
        FusedEngine(order=ORDER_DEVICE + (("F", "attn"),))


def test_timeline_and_profiler_labels() -> None:
    stages = make_stages(2, layers=2)
    xi, xj = _data(8)
    eng = FusedEngine()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fb_pair(eng, stages, xi, xj, fused=True)
    names = {e.name for e in eng.timeline}
    assert {"F.attn", "F.mlp", "F.post", "B.attn", "B.mlp", "W.attn", "W.mlp", "B.post",
            "comm.dispatch.F", "comm.combine.F", "comm.dispatch.B",
            "comm.combine.B"} <= names
    for e in eng.timeline:
        assert e.start <= e.end and e.stream in ("compute", "comm")
    assert {(e.name, e.layer) for e in eng.timeline if e.stream == "comm"} == {
        (f"comm.{c}.{d}", k) for c in ("dispatch", "combine") for d in "FB" for k in (0, 1)}
    labels = {e.name for e in prof.events()}
    assert {"F.attn[0]", "B.mlp[1]", "W.attn[0]", "comm.dispatch.F[1]",
            "comm.combine.B[0]"} <= labels


def test_weight_gradients_go_to_the_pipeline_store() -> None:
    """With the pipeline's store enabled (an I backward) W is queued there, both for the pair
    and for a plain backward, and running it gives the same gradients."""
    got, want = make_stages(2), make_stages(2)
    xi, xj = _data(9)
    store = WeightGradStore()
    with activate(store):
        store.enabled = True
        a = fb_pair(FusedEngine(), got, xi, xj, fused=True)
        store.enabled = False
        store.flush("pair")
    deferred = [p for layer in got[1].layers for m in (layer.w1, layer.w2, layer.attn)
                for p in m.parameters()]
    assert all(p.grad is None for p in deferred) and store.deferred > 0
    store.pop("pair")
    b = fb_pair(FusedEngine(), want, xi, xj, fused=False)
    _compare(got, want, a, b)
    # a plain (serial) backward defers too
    s2 = make_stages(1)[0]
    with activate(store):
        store.enabled = True
        crit(s2(xj)).backward()
        store.enabled = False
        store.flush("plain")
    assert s2.layers[0].w1.weight.grad is None and s2.layers[0].norm.weight.grad is not None
    store.pop("plain")
    ref = make_stages(1)[0]
    crit(ref(xj)).backward()
    assert_bitwise(grads_of(s2), grads_of(ref))


def test_runtime_dispatch() -> None:
    """The runtime's overlap entry: stages that declare sub-steps run on the engine; a class
    hook wins over the declaration."""
    assert can_overlap(make_stages(2))
    assert not can_overlap([nn.Linear(2, 2), nn.Linear(2, 2)])
    assert not can_overlap([make_stages(1)[0], nn.Linear(2, 2)])

    class Hooked(MixStage):
        calls = 0

        @classmethod
        def overlapped_forward_backward(cls, m0, i0, c0, l0, m1, loss1, o1, g1):
            cls.calls += 1
            out = m0(*i0)
            loss1.backward()
            return [out], c0(out)

    torch.manual_seed(0)
    hooked = [Hooked(1), Hooked(1)]
    xi, xj = _data(10)
    loss_j = crit(hooked[1](xj))
    eng = FusedEngine()
    run_overlapped(hooked[0], [xi], crit, [], hooked[1], loss_j, [], [], engine=eng)
    assert Hooked.calls == 1 and not eng.timeline
    st = make_stages(2)
    loss_j = crit(st[1](xj))
    run_overlapped(st[0], [xi], crit, [], st[1], loss_j, [], [], engine=eng)
    assert eng.timeline


# ----------------------------------------------------------------------------- declarations


def _layer_with(steps_fn) -> StageSubSteps:
    layer = MixLayer()
    steps = list(layer.declare().steps)
    return StageSubSteps(("x",), (LayerSubSteps(layer, tuple(steps_fn(layer, steps))),), ("x",))


@pytest.mark.parametrize("edit,match", [
    (lambda lay, s: s[:1] + s[2:], "missing sub-step"),
    (lambda lay, s: s + [s[0]], "more than once"),
    (lambda lay, s: s + [Compute("norm", lambda x: x, ("x",), ("x",))], "unknown sub-step"),
    (lambda lay, s: [s[0], s[2], s[1], s[3], s[4]], "order"),
    (lambda lay, s: [s[0], Compute("dispatch", lambda x: x, ("send",), ("recv",))] + s[2:],
     "must be a Comm"),
    (lambda lay, s: [Compute("attn", lay.attn_fn, ("x",), ("h", "send"),
                             modules=(lay.norm, lay.attn))] + s[1:], "not covered"),
    (lambda lay, s: [Compute("attn", lay.attn_fn, ("x",), ("h", "send"),
                             modules=(lay.norm, lay.attn, lay.gate),
                             deferred=(lay.w1,))] + s[1:], "among its modules"),
    (lambda lay, s: [Compute("attn", lay.attn_fn, ("y",), ("h", "send"),
                             modules=(lay.norm, lay.attn, lay.gate))] + s[1:], "reads"),
    (lambda lay, s: s[:2] + [Compute("mlp", lay.mlp_fn, ("recv",), ("out",),
                                     modules=(lay.w1, lay.w2, nn.Linear(2, 2)))] + s[3:],
     "not in the layer"),
])
def test_bad_declarations(edit, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_stage(_layer_with(edit))


def test_bad_declaration_from_a_stage() -> None:
    class Broken(MixStage):
        def substeps(self) -> StageSubSteps:
            good = super().substeps()
            layer = good.layers[0]
            return StageSubSteps(("x",), (LayerSubSteps(layer.layer, layer.steps[:3]),), ("x",))

    with pytest.raises(ValueError, match="missing sub-step"):
        Broken(1)(torch.randn(2, HIDDEN))
    with pytest.raises(ValueError, match="missing sub-step"):
        can_overlap([MixStage(1), Broken(1)])  # what a pipeline checks when it is built
    with pytest.raises(ValueError, match="stage outputs"):
        check_stage(StageSubSteps(("x",), MixStage(1).substeps().layers, ("nope",)))
    with pytest.raises(TypeError):
        stage_substeps(nn.Linear(2, 2))
    assert isinstance(Comm, type)


# ----------------------------------------------------------------------------- forward only


@pytest.mark.parametrize("lag", [0, 2, 5])
@pytest.mark.parametrize("rows", [2, 5])
@pytest.mark.parametrize("grad", [False, True])
def test_forward_two_microbatches(lag: int, rows: int, grad: bool) -> None:
    stages = make_stages(2, layers=2)
    x = _data(11, rows)[0]
    with torch.set_grad_enabled(grad):
        want = torch.cat([stages[1](stages[0](h)) for h in x.chunk(2)])
        eng = FusedEngine()
        got = forward_two_microbatches(stages, x, lag=lag, engine=eng)
    assert torch.equal(got, want.detach() if grad else want)
    # the two micro-batches alternate: B's first attn comes before A's last sub-step
    tl = [(e.microbatch, e.name, e.layer) for e in eng.timeline if e.stream == "compute"]
    # every sub-step ran once per micro-batch and stage
    assert sorted(tl) == sorted((mb, f"F.{n}", k) for mb in (0, 1) for _ in stages
                                for k in (0, 1) for n in ("attn", "mlp", "post"))
    assert tl.index((1, "F.attn", 0)) < tl.index((0, "F.post", 1))
    if lag == 0:
        assert tl[:2] == [(0, "F.attn", 0), (1, "F.attn", 0)]
    else:
        first_b = tl.index((1, "F.attn", 0))
        assert [t for t in tl[:first_b] if t[0] == 0] == tl[:first_b]


def test_forward_two_microbatches_errors() -> None:
    stages = make_stages(1)
    with pytest.raises(ValueError, match="lag"):
        forward_two_microbatches(stages, torch.randn(4, HIDDEN), lag=-1)
    with pytest.raises(ValueError, match="size >= 2"):
        forward_two_microbatches(stages, torch.randn(1, HIDDEN))
    with pytest.raises(TypeError, match="declare"):
        forward_two_microbatches([nn.Linear(2, 2)], torch.randn(4, 2))


def test_forward_substeps_no_grad_keeps_no_record() -> None:
    s = make_stages(1)[0]
    x = torch.randn(4, HIDDEN)
    with torch.no_grad():
        y = forward_substeps(s, x)
    assert y.grad_fn is None and torch.equal(y, s.reference(x).detach())


# ----------------------------------------------------------------------------- MoE blocks


@pytest.mark.parametrize("layers", [1, 2])
def test_moe_stage_pair(layers: int) -> None:
    """MoE blocks (router, permute, experts, shared expert) on one process: the pair equals F
    then B and MoELayer's plain graph bit for bit; forward-only overlap equals A then B."""
    from _fused_helpers import SEQ, make_moe_stages

    g = torch.Generator().manual_seed(12)
    xi, xj = (torch.randn(2, SEQ, HIDDEN, generator=g) for _ in range(2))
    got, want, ref = (make_moe_stages(2, layers) for _ in range(3))
    a = fb_pair(FusedEngine(), got, xi, xj, fused=True)
    b = fb_pair(FusedEngine(), want, xi, xj, fused=False)
    _compare(got, want, a, b)
    xr = xj.clone().requires_grad_()
    crit(ref[1].reference(xr)).backward()
    assert torch.equal(xr.grad, a[2]) and torch.equal(ref[0].reference(xi), a[0])
    assert_bitwise(grads_of(ref[1]), grads_of(got[1]))
    with torch.no_grad():
        want_f = torch.cat([got[1](got[0](h)) for h in xi.chunk(2)])
        assert torch.equal(forward_two_microbatches(got, xi, lag=2), want_f)


def test_weight_gradient_paths(monkeypatch) -> None:
    """W from each deferred module's own output gradient (modules called once), and from the
    sub-step's outputs again when a deferred module runs twice: both equal F then B."""
    from _fused_helpers import MixLayer as Base

    class Twice(Base):
        def attn_fn(self, x):
            h = x + torch.tanh(self.attn(self.norm(x))) + 0.5 * self.attn(x)
            return h, self.gate(h)

    class TwiceStage(MixStage):
        def __init__(self, layers: int = 2) -> None:
            super().__init__(layers)
            self.layers = nn.ModuleList(Twice() for _ in range(layers))

    paths: list[bool] = []
    real = fused._weight_grad_fn
    monkeypatch.setattr(fused, "_weight_grad_fn", lambda o, g, later, mg: (
        paths.append(mg is not None), real(o, g, later, mg))[1])
    for cls, fast in ((MixStage, [True, True]), (TwiceStage, [True, False])):
        torch.manual_seed(0)
        got = [cls(1), cls(1)]
        torch.manual_seed(0)
        want = [cls(1), cls(1)]
        xi, xj = _data(13)
        paths.clear()
        a = fb_pair(FusedEngine(), got, xi, xj, fused=True)
        assert sorted(paths) == sorted(fast)
        b = fb_pair(FusedEngine(), want, xi, xj, fused=False)
        _compare(got, want, a, b)


# ----------------------------------------------------------------------------- CUDA ordering


class _FakeStream:
    """Stands in for a CUDA stream: a vector clock of what its next work has to follow."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.clock: dict[str, int] = {}

    def wait_event(self, event: _FakeEvent) -> None:
        for s, n in event.clock.items():
            self.clock[s] = max(self.clock.get(s, 0), n)

    def tick(self) -> dict[str, int]:
        self.clock[self.name] = self.clock.get(self.name, 0) + 1
        return dict(self.clock)


class _FakeEvent:
    def __init__(self) -> None:
        self.clock: dict[str, int] = {}

    def record(self, stream: _FakeStream) -> None:
        self.clock = stream.tick()


def test_cuda_event_chains_order_each_microbatch(monkeypatch) -> None:
    """The CUDA path's streams and events, with stand-ins that track what each sub-step must
    follow (no GPU): every sub-step of a micro-batch happens after the previous one of the same
    chain, whichever stream each ran on; communication runs on the communication stream."""
    import contextlib

    compute, comm = _FakeStream("compute"), _FakeStream("comm")
    current: list[_FakeStream] = [compute]
    ran: list[tuple[int, str, str, dict[str, int]]] = []

    @contextlib.contextmanager
    def fake_stream(s: _FakeStream):
        current.append(s)
        yield
        current.pop()

    def bind(self, tensors, modules) -> None:
        self._cuda, self._compute, self._comm = True, compute, comm

    real_on = FusedEngine._on

    @contextlib.contextmanager
    def on(self, chain, stream, label, layer, microbatch):
        with real_on(self, chain, stream, label, layer, microbatch):
            if label and chain is not None:
                s = current[-1]
                assert s is (comm if stream == "comm" else compute)
                ran.append((chain.microbatch, label, stream, s.tick()))
            yield

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", fake_stream)
    monkeypatch.setattr(FusedEngine, "_bind_device", bind)
    monkeypatch.setattr(FusedEngine, "_on", on)
    stages = make_stages(2, layers=2)
    xi, xj = _data(14)
    loss_j = crit(stages[1](xj.clone().requires_grad_()))
    ran.clear()
    FusedEngine().forward_backward(stages[0], [xi], crit, [], stages[1], loss_j, [], [],
                                   microbatches=(3, 4))
    for mb in (3, 4):
        chain = [(label, stream, clock) for m, label, stream, clock in ran if m == mb]
        assert len(chain) > 10
        for (la, sa, ca), (lb, _, cb) in zip(chain, chain[1:]):
            assert ca[sa] <= cb.get(sa, 0), f"mb {mb}: {lb} is not ordered after {la}"
        assert {s for label, s, _ in chain if label.startswith("comm.")} == {"comm"}
        assert {s for label, s, _ in chain if not label.startswith("comm.")} == {"compute"}
