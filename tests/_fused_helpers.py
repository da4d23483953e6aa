"""Small declaring stages for the fused engine's tests: token-mixing layers whose dispatch and
combine are plain ``all_to_all_single`` (async) over the default group, or a local copy when no
group is initialised; plus the bitwise comparisons the tests use."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from deeppar.pipeline.fused import forward_substeps
from deeppar.pipeline.substeps import Comm, Compute, LayerSubSteps, StageSubSteps

HIDDEN = 8


class AllToAll:
    """An async equal-split all-to-all over ``group`` (or a copy without a process group)."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        x = x.contiguous()
        self.out = torch.empty_like(x)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            self.work = dist.all_to_all_single(self.out, x, group=group, async_op=True)
        else:
            self.out.copy_(x)
            self.work = None

    def wait(self) -> tuple[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return (self.out,)


class A2AComm:
    """``start`` / ``start_backward`` of an equal-split all-to-all over ``group`` (whose
    transposed transfer is the same all-to-all)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    def start(self, x: torch.Tensor) -> AllToAll:
        return AllToAll(x, self.group)

    def start_backward(self, transfer: AllToAll, g: torch.Tensor) -> AllToAll:
        return AllToAll(g, self.group)


class MixLayer(nn.Module):
    """attn: RMS-normed token mixing; dispatch: all-to-all; mlp: a two-layer MLP on the
    received rows; combine: all-to-all back; post: residual add."""

    def __init__(self, d: int = HIDDEN, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.comm = A2AComm(group)
        self.norm = nn.RMSNorm(d)
        self.attn = nn.Linear(d, d)
        self.gate = nn.Linear(d, d, bias=False)
        self.w1 = nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d)

    def attn_fn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + torch.tanh(self.attn(self.norm(x)))
        return h, self.gate(h)

    def mlp_fn(self, r: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(r)))

    @staticmethod
    def post_fn(h: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        return h + back

    def declare(self) -> LayerSubSteps:
        return LayerSubSteps(self, (
            Compute("attn", self.attn_fn, ("x",), ("h", "send"),
                    modules=(self.norm, self.attn, self.gate), deferred=(self.attn, self.gate)),
            Comm("dispatch", self.comm.start, self.comm.start_backward, ("send",), ("recv",)),
            Compute("mlp", self.mlp_fn, ("recv",), ("out",), modules=(self.w1, self.w2),
                    deferred=(self.w1, self.w2)),
            Comm("combine", self.comm.start, self.comm.start_backward, ("out",), ("back",)),
            Compute("post", self.post_fn, ("h", "back"), ("x",)),
        ))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as one autograd graph (transfers through an autograd all-to-all)."""
        h, send = self.attn_fn(x)
        back = _A2AFn.apply(self.mlp_fn(_A2AFn.apply(send, self.comm.group)), self.comm.group)
        return self.post_fn(h, back)


class _A2AFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return AllToAll(x, group).wait()[0]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return AllToAll(g, ctx.group).wait()[0], None


class MixStage(nn.Module):
    """A stage of ``layers`` MixLayers that declares its sub-steps."""

    def __init__(self, layers: int = 2, d: int = HIDDEN,
                 group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MixLayer(d, group) for _ in range(layers))

    def substeps(self) -> StageSubSteps:
        return StageSubSteps(("x",), tuple(layer.declare() for layer in self.layers), ("x",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_substeps(self, x)  # type: ignore[return-value]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.reference(x)
        return x


class PlainMixStage(MixStage):
    """The same stage without the declaration: the runtime runs its pairs as F then B."""

    substeps = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in module.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None],
                   what: str = "gradients") -> None:
    """Every entry equal bit for bit (None only where the other is None too)."""
    assert a.keys() == b.keys(), f"{what}: different names"
    for n in a:
        x, y = a[n], b[n]
        assert (x is None) == (y is None), f"{what} {n}: one is None"
        if x is not None:
            assert torch.equal(x, y), f"{what} {n}: differ (max {(x - y).abs().max()})"


# ----------------------------------------------------------------------------- distributed cases
# (run by tests/test_fused_dist.py through _runtime_helpers.run_cases)

MB = 2  # rows per micro-batch in the pipeline cases (divisible by the EP size 2)


def make_stages(n: int, layers: int = 2, group: dist.ProcessGroup | None = None,
                seed: int = 0, cls: type = MixStage) -> list[nn.Module]:
    """``n`` stages with the same weights on every rank (seeded)."""
    torch.manual_seed(seed)
    return [cls(layers, HIDDEN, group) for _ in range(n)]


SEQ = 3  # tokens per sample of the MoE stages ([batch, SEQ, HIDDEN] inputs)


def make_moe_stages(n: int, layers: int = 2, group: dist.ProcessGroup | None = None,
                    seed: int = 0) -> list[nn.Module]:
    """``n`` stages of MoE blocks (4 experts, top-2, a shared expert), seeded alike on every
    rank; the experts are split over ``group``."""
    from deeppar.moe.block import MoEBlock, MoEStage

    torch.manual_seed(seed)
    return [MoEStage([MoEBlock(HIDDEN, 2, 2 * HIDDEN, 4, 2, shared_intermediate=HIDDEN,
                               group=group) for _ in range(layers)]) for _ in range(n)]


def crit(y: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
    return (y if label is None else y - label).pow(2).mean()


def fb_pair(engine, stages: list[nn.Module], xi: torch.Tensor, xj: torch.Tensor,
            fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of ``xi`` through stage 0 paired with the backward of ``xj`` through stage 1
    (last stage, loss backward): fused, or F then B. Returns (output_i, loss_i, xj.grad)."""
    a, b = stages
    xj = xj.clone().requires_grad_()
    loss_j = crit(b(xj))
    if fused:
        outs, loss_i = engine.forward_backward(a, [xi], crit, [], b, loss_j, [], [])
        out_i = outs[0]
    else:
        out_i = a(xi)
        loss_i = crit(out_i)
        loss_j.backward()
    return out_i, loss_i, xj.grad


def _ep_data(rank: int, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(rows, HIDDEN, generator=g), torch.randn(rows, HIDDEN, generator=g)


def case_ep_fb(rank: int, world: int) -> None:
    """EP over every rank: one F&B pair equals F then B bit for bit (outputs, losses, input
    and parameter gradients), including a later backward of the forward's loss."""
    from deeppar.pipeline.fused import FusedEngine

    xi, xj = _ep_data(rank)
    got, want = make_stages(2), make_stages(2)
    eng = FusedEngine()
    o1, l1, g1 = fb_pair(eng, got, xi, xj, fused=True)
    o2, l2, g2 = fb_pair(eng, want, xi, xj, fused=False)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(g1, g2)
    for s, r in zip(got, want):
        assert_bitwise(grads_of(s), grads_of(r))
    l1.backward()
    l2.backward()
    assert_bitwise(grads_of(got[0]), grads_of(want[0]))
    # and the sub-step records agree with one plain autograd graph
    ref = make_stages(2)
    xr = xj.clone().requires_grad_()
    crit(ref[1].reference(xr)).backward()
    assert torch.equal(xr.grad, g1)
    assert_bitwise(grads_of(ref[1]), grads_of(got[1]))


def case_moe_ep_fb(rank: int, world: int) -> None:
    """MoE blocks with EP over every rank: one F&B pair equals F then B bit for bit, and the
    sub-step records equal MoELayer's plain autograd graph."""
    from deeppar.pipeline.fused import FusedEngine

    g = torch.Generator().manual_seed(200 + rank)
    xi, xj = (torch.randn(2, SEQ, HIDDEN, generator=g) for _ in range(2))
    got, want, ref = (make_moe_stages(2) for _ in range(3))
    o1, l1, g1 = fb_pair(FusedEngine(), got, xi, xj, fused=True)
    o2, l2, g2 = fb_pair(FusedEngine(), want, xi, xj, fused=False)
    assert torch.equal(o1, o2) and torch.equal(l1, l2) and torch.equal(g1, g2)
    for s, r in zip(got, want):
        assert_bitwise(grads_of(s), grads_of(r))
    xr = xj.clone().requires_grad_()
    crit(ref[1].reference(xr)).backward()
    assert torch.equal(xr.grad, g1)
    assert_bitwise(grads_of(ref[1]), grads_of(got[1]))
    with torch.no_grad():
        from deeppar.pipeline.fused import forward_two_microbatches

        want_f = torch.cat([got[1](got[0](h)) for h in xi.chunk(2)])
        for lag in (0, 2):
            assert torch.equal(forward_two_microbatches(got, xi, lag=lag), want_f)


#: (transfer, the computation it must be in flight across), per layer, on CPU
PARTNERS = (("comm.combine.B", "F.attn"), ("comm.dispatch.F", "B.mlp"),
            ("comm.dispatch.B", "W.mlp"), ("comm.dispatch.B", "F.mlp"),
            ("comm.combine.F", "B.attn"))


def check_in_flight(timeline: list, layers: int, fwd_mb: int, bwd_mb: int) -> int:
    """Assert that each transfer of the pair was started before its partner computation began
    and waited after it ended; returns how many pairs were checked."""
    def entry(name: str, layer: int, mb: int):
        found = [e for e in timeline if e.name == name and e.layer == layer
                 and e.microbatch == mb]
        assert len(found) == 1, f"{name}[{layer}] of mb {mb}: {len(found)} entries"
        return found[0]

    checked = 0
    for k in range(layers):
        kb = layers - 1 - k  # the backward layer paired with forward layer k
        for comm, comp in PARTNERS:
            c_layer = k if comm.endswith(".F") else kb
            p_layer = k if comp.startswith("F.") else kb
            c = entry(comm, c_layer, fwd_mb if comm.endswith(".F") else bwd_mb)
            p = entry(comp, p_layer, fwd_mb if comp.startswith("F.") else bwd_mb)
            assert c.stream == "comm" and p.stream == "compute"
            assert c.start <= p.start and p.end <= c.end, (
                f"{comm}[{c_layer}] ({c.start:.6f}..{c.end:.6f}) not in flight across "
                f"{comp}[{p_layer}] ({p.start:.6f}..{p.end:.6f})")
            checked += 1
    return checked


def case_timeline(rank: int, world: int) -> None:
    """On gloo every transfer is in flight while its partner computation runs."""
    from deeppar.pipeline.fused import FusedEngine

    xi, xj = _ep_data(rank)
    stages = make_stages(2, layers=3)
    eng = FusedEngine()
    a, b = stages
    loss_j = crit(b(xj.clone().requires_grad_()))
    eng.timeline.clear()
    eng.forward_backward(a, [xi], crit, [], b, loss_j, [], [], microbatches=(5, 2))
    assert check_in_flight(eng.timeline, 3, 5, 2) == 3 * len(PARTNERS)


def case_forward_two(rank: int, world: int) -> None:
    """Forward-only two-micro-batch overlap with EP: equals A then B, for lag 0 and 2."""
    from deeppar.pipeline.fused import FusedEngine

    x = _ep_data(rank, rows=6)[0]
    stages = make_stages(2)
    with torch.no_grad():
        want = torch.cat([stages[1](stages[0](h)) for h in x.chunk(2)])
        for lag in (0, 1, 2):
            eng = FusedEngine()
            got = eng.forward_two_microbatches(stages, x, lag=lag)
            assert torch.equal(got, want), f"lag {lag}: outputs differ"


def _grid(rank: int) -> tuple[int, int, dist.ProcessGroup, dist.ProcessGroup]:
    """PP x EP = 2 x 2: (pp rank, ep rank, pp group, ep group); every rank makes every group
    in the same order."""
    pp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    ep_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    p, e = rank % 2, rank // 2
    return p, e, pp_groups[e], ep_groups[p]


def _grid_case(rank: int, method: str) -> None:
    from deeppar.pipeline import DualPipe, DualPipeV

    p, e, pp, ep = _grid(rank)
    n_chunks = 6
    n_stages = 2 if method == "dualpipe" else 4
    g = torch.Generator().manual_seed(7 + e)
    x = torch.randn(n_chunks * MB, SEQ, HIDDEN, generator=g)
    y = torch.randn(n_chunks * MB, SEQ, HIDDEN, generator=g)
    if method == "dualpipe":
        slots = (p, 1 - p)
        half = n_chunks // 2
        inp = x[:half * MB] if p == 0 else x[half * MB:]
        lab = y[half * MB:] if p == 0 else y[:half * MB]
        cls = DualPipe
    else:
        slots = (p, 3 - p)
        inp, lab = (x, y) if p == 0 else (None, None)
        cls = DualPipeV
    results = []
    for fused in (True, False):
        stages = make_moe_stages(n_stages, layers=1, group=ep)
        pipe = cls(tuple(stages[s] for s in slots), process_group=pp)
        pipe.fused_engine.record_timeline = True
        if not fused:
            pipe.use_overlap_hook = False  # every Overlap pair as F then B
        loss, out = pipe.step(inp, num_chunks=n_chunks, criterion=crit, labels=(lab,),
                              return_outputs=True)
        if fused:
            assert pipe.fused_engine.timeline, "the fused engine ran no pair"
        else:
            assert not pipe.fused_engine.timeline
        results.append((loss, out, [grads_of(m) for m in pipe.module]))
    (l1, o1, g1), (l2, o2, g2) = results
    if l1 is not None or l2 is not None:
        assert torch.equal(l1, l2), "losses differ"
        assert torch.equal(o1, o2), "outputs differ"
    for a, b in zip(g1, g2):
        assert_bitwise(a, b)


def case_dualpipe_grid(rank: int, world: int) -> None:
    _grid_case(rank, "dualpipe")


def case_dualpipev_grid(rank: int, world: int) -> None:
    _grid_case(rank, "dualpipev")


class UncoveredMixStage(MixStage):
    """A declaration whose first layer stops after dispatch: it does not cover the layer."""

    def substeps(self) -> StageSubSteps:
        good = super().substeps()
        first = good.layers[0]
        return StageSubSteps(("x",), (LayerSubSteps(first.layer, first.steps[:2]),
                                      *good.layers[1:]), ("x",))


def case_bad_declaration_fails_every_rank(rank: int, world: int) -> None:
    """Rank 0 holds a stage whose declaration does not cover its layer: building the pipeline
    does not raise on that rank alone; the first step raises the same ValueError on every rank
    (naming rank 0 and the problem) before any message."""
    from deeppar.pipeline import DualPipeV

    stages = make_stages(2 * world, layers=1)
    slots = (rank, 2 * world - 1 - rank)
    local = [stages[s] for s in slots]
    if rank == 0:
        local[0] = UncoveredMixStage(1)
    pipe = DualPipeV(tuple(local))
    x = torch.randn(4 * MB, HIDDEN) if rank == 0 else None
    y = torch.randn(4 * MB, HIDDEN) if rank == 0 else None
    try:
        pipe.step(x, num_chunks=4, criterion=crit, labels=(y,))
    except ValueError as exc:
        message = str(exc)
        assert "rank 0" in message and "missing sub-step" in message, message
    else:
        raise AssertionError(f"rank {rank}: the step ran with an uncovered declaration")
