"""The fused F&B engine: runs the forward of one micro-batch and the backward of another, sub-step
by sub-step, so that each all-to-all hides behind the other micro-batch's computation.

A stage declares its layers' sub-steps (:mod:`.substeps`) and calls :func:`forward_substeps` in
its ``forward``. Every sub-step then runs on detached inputs that require grad and keeps its
outputs, so its backward can run alone later: ``autograd.backward(outputs, grads)`` gives its
inputs' gradients, which go to the sub-step before it (a name's gradients from several readers
are added at the boundary). The stage's outputs carry one autograd node holding this record, so
an ordinary ``loss.backward()`` runs the sub-steps' backward one after another (F then B), and
:meth:`FusedEngine.forward_backward` runs them interleaved with another micro-batch's forward
in the order of DeepSeek-V3's published trace, per layer::

    combine(B)  attn(F)  mlp(B)  dispatch(F)  dispatch(B)  mlp(W)  mlp(F)  attn(B)  attn(W)
    combine(F)

(:data:`ORDER_DEVICE`). Both ways run the same sub-step code, so results are bit-identical.

Streams. On CUDA, communication runs on one communication stream owned by the engine and
computation on the caller's stream; each micro-batch is one chain of sub-steps ordered by one
CUDA event (a sub-step waits on its chain's event on its own stream, runs, records it), and a
tensor made on one stream and used on the other is ``record_stream``-ed there. A transfer's
``wait`` is called on the communication stream just before its consumer. On CPU there are no
streams: a transfer is async work (gloo runs it on its own threads) started by its sub-step and
waited just before its consumer; since CPU computation blocks the caller, each transfer is
started right before the computation it hides behind (:data:`ORDER_HOST`: the same order with
dispatch(F) moved before mlp(B) and combine(F) before attn(B)).

W. A computation sub-step's ``deferred`` modules get their weight gradients in a separate W
part: B runs ``autograd.backward`` with ``inputs=`` everything but those parameters (keeping
the sub-step's graph), W runs it for those parameters and frees the graph. When the pipeline's
:class:`~.weight_grad.WeightGradStore` is enabled (an ``I`` backward), W goes there instead.

Forward only (:func:`forward_two_microbatches`): two micro-batches walk the same stages
(``attn -> dispatch start``, ``dispatch wait -> mlp -> combine start``, ``combine wait ->
post``), alternating, the second ``lag`` stages behind.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.autograd import Variable

from .substeps import (
    ATTN,
    COMBINE,
    DISPATCH,
    MLP,
    POST,
    Comm,
    Compute,
    StageSubSteps,
    Transfer,
    declares_substeps,
    stage_substeps,
)
from .weight_grad import WeightGradStore, active_store

F_SIDE, B_SIDE = "F", "B"
#: per layer, the spec's CPU issue order (what runs on the GPU at the same time is in the
#: table of the overlap spec); ``mlp.W`` / ``attn.W`` are the deferred weight gradients
ORDER_DEVICE: tuple[tuple[str, str], ...] = (
    (B_SIDE, COMBINE), (F_SIDE, ATTN), (B_SIDE, MLP), (F_SIDE, DISPATCH), (B_SIDE, DISPATCH),
    (B_SIDE, "mlp.W"), (F_SIDE, MLP), (B_SIDE, ATTN), (B_SIDE, "attn.W"), (F_SIDE, COMBINE),
)
#: the same order for CPU, where computation blocks the caller: every transfer is started
#: just before the computation it runs alongside (dispatch(F) before mlp(B), combine(F)
#: before attn(B)); each dependency of a chain is still respected
ORDER_HOST: tuple[tuple[str, str], ...] = (
    (B_SIDE, COMBINE), (F_SIDE, ATTN), (F_SIDE, DISPATCH), (B_SIDE, MLP), (B_SIDE, DISPATCH),
    (B_SIDE, "mlp.W"), (F_SIDE, MLP), (F_SIDE, COMBINE), (B_SIDE, ATTN), (B_SIDE, "attn.W"),
)


#: what each chain must have done before an action (within one layer)
_NEEDS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    (F_SIDE, DISPATCH): ((F_SIDE, ATTN),),
    (F_SIDE, MLP): ((F_SIDE, DISPATCH),),
    (F_SIDE, COMBINE): ((F_SIDE, MLP),),
    (B_SIDE, MLP): ((B_SIDE, COMBINE),),
    (B_SIDE, "mlp.W"): ((B_SIDE, MLP),),
    (B_SIDE, DISPATCH): ((B_SIDE, MLP),),
    (B_SIDE, ATTN): ((B_SIDE, DISPATCH),),
    (B_SIDE, "attn.W"): ((B_SIDE, ATTN),),
}


def check_order(order: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Check a per-layer order: each of the ten (side, action) pairs of :data:`ORDER_DEVICE`
    exactly once, every action after what its own chain needs first. ValueError otherwise."""
    order = tuple(tuple(a) for a in order)  # type: ignore[misc]
    if sorted(order) != sorted(ORDER_DEVICE):
        raise ValueError(f"order must hold each of {list(ORDER_DEVICE)} exactly once, got "
                         f"{list(order)}")
    at = {a: i for i, a in enumerate(order)}
    for a, needs in _NEEDS.items():
        for n in needs:
            if at[n] > at[a]:
                raise ValueError(f"order: {a[0]}.{a[1]} comes before {n[0]}.{n[1]}, which its "
                                 "chain needs first")
    return order  # type: ignore[return-value]


@dataclass(frozen=True)
class TimelineEntry:
    """One sub-step as the engine ran it. ``name`` is e.g. ``F.attn``, ``B.mlp``, ``W.attn``,
    ``comm.dispatch.F``; ``stream`` is ``compute`` or ``comm``; times are host seconds
    (``time.perf_counter``): for a transfer, from its start to the return of its wait, and
    ``waited`` the part spent in the wait (on CPU: the exposed communication)."""

    name: str
    layer: int
    microbatch: int
    stream: str
    start: float
    end: float
    waited: float = 0.0


# ----------------------------------------------------------------------------- streams


class _Chain:
    """One micro-batch's chain of sub-steps: its CUDA event (None on CPU)."""

    def __init__(self, microbatch: int, cuda: bool) -> None:
        self.microbatch = microbatch
        self.event = torch.cuda.Event() if cuda else None
        self.recorded = False


class FusedEngine:
    """Runs declared stages' sub-steps: F&B pairs (:meth:`forward_backward`), two forward
    micro-batches (:meth:`forward_two_microbatches`), or one stage in order. Owns its
    communication stream (CUDA) and its :attr:`timeline`; holds no other state between calls.
    ``order`` replaces the per-layer order (for experiments); by default CUDA uses
    :data:`ORDER_DEVICE` and CPU :data:`ORDER_HOST`."""

    def __init__(self, *, record_timeline: bool = True,
                 order: Sequence[tuple[str, str]] | None = None) -> None:
        self.record_timeline = record_timeline
        self.timeline: list[TimelineEntry] = []
        self.order = check_order(order) if order is not None else None
        self._comm_streams: dict[int, Any] = {}
        self._cuda = False
        self._compute: Any = None
        self._comm: Any = None

    # ---------------------------------------------------------------- streams and events
    def _bind_device(self, tensors: Sequence[Any], modules: Sequence[nn.Module]) -> None:
        """Pick CPU or CUDA mode from the first tensor / parameter seen."""
        dev = None
        for t in tensors:
            if isinstance(t, torch.Tensor):
                dev = t.device
                break
        if dev is None:
            for m in modules:
                p = next(m.parameters(), None)
                if p is not None:
                    dev = p.device
                    break
        self._cuda = dev is not None and dev.type == "cuda"
        if self._cuda:
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            self._compute = torch.cuda.current_stream(index)
            if index not in self._comm_streams:
                self._comm_streams[index] = torch.cuda.Stream(device=index)
            self._comm = self._comm_streams[index]

    def _chain(self, microbatch: int) -> _Chain:
        return _Chain(microbatch, self._cuda)

    @contextlib.contextmanager
    def _on(self, chain: _Chain | None, stream: str, label: str | None, layer: int,
            microbatch: int) -> Iterator[None]:
        """Run the body as a sub-step of ``chain`` on ``stream`` ("compute" or "comm"): on CUDA
        wait for the chain's event on that stream, run there, record the event; profile it
        under ``label`` and time it into the timeline (``label`` None: neither, for glue
        work such as adding received gradients)."""
        began = time.perf_counter()
        with torch.profiler.record_function(label) if label else contextlib.nullcontext():
            if self._cuda:
                s = self._comm if stream == "comm" else self._compute
                if chain is not None and chain.recorded:
                    s.wait_event(chain.event)
                with torch.cuda.stream(s):
                    yield
                if chain is not None:
                    chain.event.record(s)
                    chain.recorded = True
            else:
                yield
        if label and self.record_timeline and stream == "compute":
            self.timeline.append(TimelineEntry(label.split("[")[0], layer, microbatch,
                                               stream, began, time.perf_counter()))

    def _cross(self, tensors: Sequence[Any], stream: str) -> None:
        """Tensors made on one stream and used on ``stream``: keep the allocator from reusing
        their memory before ``stream`` is done with them."""
        if not self._cuda:
            return
        s = self._comm if stream == "comm" else self._compute
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(s)

    def _comm_entry(self, name: str, layer: int, microbatch: int, began: float,
                    wait_began: float) -> None:
        if self.record_timeline:
            now = time.perf_counter()
            self.timeline.append(TimelineEntry(name, layer, microbatch, "comm", began, now,
                                               now - wait_began))

    def _host_order(self) -> tuple[tuple[str, str], ...]:
        if self.order is not None:
            return self.order
        return ORDER_DEVICE if self._cuda else ORDER_HOST

    # ---------------------------------------------------------------- public entry points
    def forward_backward(
        self, module0: nn.Module, inputs0: Sequence[torch.Tensor],
        criterion0: Callable | None, labels0: Sequence[torch.Tensor],
        module1: nn.Module, loss1: torch.Tensor | None,
        outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor],
        microbatches: tuple[int, int] = (0, 1),
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """DeepSeek's ``overlapped_forward_backward``: the forward of ``module0`` on ``inputs0``
        (and ``criterion0(*outputs0, *labels0)`` when given) interleaved with the backward of
        ``loss1`` (when not None) or of ``outputs1`` with ``output_grads1``. Both modules must
        declare sub-steps, and ``loss1``/``outputs1`` must come from ``module1``'s
        :func:`forward_substeps`. Input gradients of ``module1``'s inputs are accumulated into
        their ``.grad`` (leaves) or passed on (non-leaves). ``microbatches`` label the
        timeline. Returns ``(outputs0, loss0)``."""
        decl0 = stage_substeps(module0)
        self._bind_device(list(inputs0), [module0, module1])
        fwd = _ForwardRun(self, decl0, list(inputs0), self._chain(microbatches[0]))
        bwd = _start_backward(self, module1, loss1, list(outputs1), list(output_grads1),
                              self._chain(microbatches[1]))
        lf, lb = len(decl0.layers), len(bwd.trace.decl.layers)
        for k in range(max(lf, lb)):
            for side, action in self._host_order():
                if side == F_SIDE and k < lf:
                    fwd.action(action, k)
                elif side == B_SIDE and k < lb:
                    bwd.action(action, lb - 1 - k)
        outputs0 = fwd.finish()
        bwd.finish(deliver=True)
        loss0 = None
        if criterion0 is not None:
            with torch.profiler.record_function("F.criterion"):
                loss0 = criterion0(*outputs0, *labels0)
        return outputs0, loss0

    def forward_two_microbatches(self, stages: nn.Module | Sequence[nn.Module],
                                 *inputs: torch.Tensor, lag: int = 0,
                                 dim: int = 0) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Forward of ``stages`` (declaring modules, run one after another) on ``inputs``,
        cut in two micro-batches A, B along ``dim`` whose stages alternate, B ``lag`` stages
        behind A (0: prefill, 2: decode). Bit-identical to running A then B; the outputs are
        concatenated back along ``dim`` in the original order."""
        mods = [stages] if isinstance(stages, nn.Module) else list(stages)
        if not mods or not all(isinstance(m, nn.Module) and declares_substeps(m)
                               for m in mods):
            raise TypeError("stages: give a module, or a sequence of modules, that declare "
                            "sub-steps")
        if isinstance(lag, bool) or not isinstance(lag, int) or lag < 0:
            raise ValueError(f"lag must be an int >= 0, got {lag!r}")
        if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
            raise TypeError("inputs: give one or more tensors")
        sizes = {x.shape[dim] if x.dim() > dim else None for x in inputs}
        if len(sizes) != 1 or None in sizes or sizes.pop() < 2:
            raise ValueError(f"inputs: every tensor needs the same size >= 2 along dim {dim}")
        halves = [x.chunk(2, dim=dim) for x in inputs]
        self._bind_device(list(inputs), mods)
        runs = [self._stage_walk(mods, [h[i] for h in halves], i) for i in range(2)]
        results: list[list[torch.Tensor] | None] = [None, None]

        def advance(i: int) -> None:
            if results[i] is None:
                try:
                    next(runs[i])
                except StopIteration as stop:
                    results[i] = stop.value

        tick = 0
        while results[0] is None or results[1] is None:
            # the executor behind goes first, so the one ahead hides its transfer behind it
            if lag == 0:
                advance(0)
                advance(1)
            else:
                if tick >= lag:
                    advance(1)
                advance(0)
            tick += 1
        a, b = results
        outs = tuple(torch.cat([x, y], dim=dim) for x, y in zip(a, b))  # type: ignore[arg-type]
        return outs[0] if len(outs) == 1 else outs

    def _stage_walk(self, mods: Sequence[nn.Module], inputs: list[torch.Tensor],
                    microbatch: int) -> Generator[None, None, list[torch.Tensor]]:
        """One forward executor: yields after each of ``attn -> dispatch start``, ``mlp ->
        combine start``, ``combine wait -> post`` of every layer."""
        xs = inputs
        chain = self._chain(microbatch)
        for m in mods:
            run = _ForwardRun(self, stage_substeps(m), xs, chain)
            for k in range(len(run.decl.layers)):
                run.action(ATTN, k, with_post=False)
                run.action(DISPATCH, k)
                yield
                run.action(MLP, k)
                run.action(COMBINE, k)
                yield
                run.post(k)
                yield
            xs = run.finish()
        return xs


def forward_substeps(module: nn.Module, *inputs: torch.Tensor,
                     engine: FusedEngine | None = None
                     ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run a declaring stage's sub-steps in order (each transfer waited by its consumer): what
    its ``forward`` should return. With autograd on, the outputs carry the record the fused
    engine needs, and their backward runs the sub-steps' backward in order (F then B)."""
    eng = engine if engine is not None else FusedEngine(record_timeline=False)
    decl = stage_substeps(module)
    eng._bind_device(list(inputs), [module])
    run = _ForwardRun(eng, decl, list(inputs), eng._chain(0))
    for k in range(len(decl.layers)):
        for action in (ATTN, DISPATCH, MLP, COMBINE):
            run.action(action, k)
    outs = run.finish()
    return outs[0] if len(outs) == 1 else tuple(outs)


def forward_two_microbatches(stages: nn.Module | Sequence[nn.Module], *inputs: torch.Tensor,
                             lag: int = 0, dim: int = 0, engine: FusedEngine | None = None
                             ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """:meth:`FusedEngine.forward_two_microbatches` with a fresh engine (or ``engine``)."""
    eng = engine if engine is not None else FusedEngine(record_timeline=False)
    return eng.forward_two_microbatches(stages, *inputs, lag=lag, dim=dim)


# ----------------------------------------------------------------------------- records


class _Record:
    """One executed sub-step of one micro-batch, kept for its backward."""

    __slots__ = ("step", "layer", "leaves", "outputs", "transfer", "requires", "out_meta",
                 "weight_grad", "module_outs")

    def __init__(self, step: Compute | Comm, layer: int) -> None:
        self.step = step
        self.layer = layer
        self.leaves: list[Any] | None = None
        self.outputs: list[torch.Tensor] | None = None
        self.transfer: Transfer | None = None
        self.requires: list[bool] = []
        self.out_meta: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self.weight_grad: Callable[[], None] | None = None
        #: (deferred module, its output tensors) when each was called exactly once
        self.module_outs: list[tuple[nn.Module, list[torch.Tensor]]] | None = None


class _Trace:
    """One micro-batch through one stage: the declaration, the stage's input tensors and the
    records of its sub-steps. Held by the stage outputs' autograd node."""

    def __init__(self, decl: StageSubSteps, inputs: list[torch.Tensor]) -> None:
        self.decl = decl
        self.inputs = inputs
        self.records: dict[tuple[int, str], _Record] = {}
        self.outputs: list[torch.Tensor] = []
        self.capture = False
        self.captured: tuple[torch.Tensor | None, ...] | None = None
        #: an empty leaf input of the outputs' node, so they require grad (and a target that
        #: stops a captured backward at the node)
        self.anchor: torch.Tensor | None = None


class _StageFunction(torch.autograd.Function):
    """The autograd node of a stage's outputs. Its backward runs the recorded sub-steps'
    backward in order, or, when the engine captures (``trace.capture``), only hands the
    output gradients to the engine."""

    @staticmethod
    def forward(ctx, trace: _Trace, anchor: torch.Tensor, *inputs: torch.Tensor):  # type: ignore[override]
        ctx.deeppar_trace = trace
        outs = tuple(o.detach() for o in trace.outputs)
        ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        trace: _Trace = ctx.deeppar_trace
        ctx.deeppar_trace = None
        trace.anchor = None
        nothing = (None, None) + (None,) * len(trace.inputs)
        if trace.capture:
            trace.captured = grads
            return nothing
        engine = FusedEngine(record_timeline=False)
        engine._bind_device(list(grads), [])
        run = _BackwardRun(engine, trace, list(grads), engine._chain(0))
        run.serial()
        return (None, None, *run.finish(deliver=False))


def _leaf(t: Any, grad: bool) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    if grad and t.requires_grad and t.is_floating_point():
        return t.detach().requires_grad_(True)
    return t.detach()


def _as_list(out: Any, what: str) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return list(out)
    raise TypeError(f"{what} must return a tensor or a tuple of tensors, got "
                    f"{type(out).__name__}")


class _ForwardRun:
    """The forward chain of one micro-batch through one stage."""

    def __init__(self, engine: FusedEngine, decl: StageSubSteps, inputs: list[torch.Tensor],
                 chain: _Chain) -> None:
        if len(inputs) != len(decl.inputs):
            raise ValueError(f"the stage declares {len(decl.inputs)} inputs "
                             f"{list(decl.inputs)}, got {len(inputs)} tensors")
        self.engine = engine
        self.decl = decl
        self.chain = chain
        self.grad = torch.is_grad_enabled()
        self.trace = _Trace(decl, inputs)
        self.bag: dict[str, Any] = dict(zip(decl.inputs, inputs))
        self.pending: list[tuple[_Record, float]] = []
        self.posted: set[int] = set()

    def action(self, name: str, k: int, with_post: bool = True) -> None:
        layer = self.decl.layers[k]
        if name == ATTN:
            if with_post and k > 0:
                self.post(k - 1)
            self._compute(layer.step(ATTN), k)  # type: ignore[arg-type]
        elif name == MLP:
            self._compute(layer.step(MLP), k)  # type: ignore[arg-type]
        elif name in (DISPATCH, COMBINE):
            self._start(layer.step(name), k)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown forward action {name!r}")

    def post(self, k: int) -> None:
        """Wait for layer ``k``'s combine and run its post sub-step (if declared), once."""
        if k in self.posted:
            return
        self.posted.add(k)
        step = self.decl.layers[k].step(POST)
        self._wait(set(self.decl.layers[k].step(COMBINE).outputs))  # type: ignore[union-attr]
        if step is not None:
            self._compute(step, k)  # type: ignore[arg-type]

    def _wait(self, names: set[str]) -> None:
        for rec, began in list(self.pending):
            if names & set(rec.step.outputs):
                self.pending.remove((rec, began))
                self._finish_transfer(rec, began)

    def _finish_transfer(self, rec: _Record, began: float) -> None:
        eng, step = self.engine, rec.step
        label = f"comm.{step.name}.F[{rec.layer}].wait"
        wait_began = time.perf_counter()
        with eng._on(self.chain, "comm", label, rec.layer, self.chain.microbatch):
            outs = _as_list(rec.transfer.wait(), f"{step.name} transfer")  # type: ignore[union-attr]
        eng._comm_entry(f"comm.{step.name}.F", rec.layer, self.chain.microbatch, began,
                        wait_began)
        if len(outs) != len(step.outputs):
            raise ValueError(f"sub-step {step.name!r} declares {len(step.outputs)} outputs, "
                             f"its transfer gave {len(outs)}")
        eng._cross(outs, "compute")
        needs = self.grad and any(rec.requires)
        outs = [o.detach().requires_grad_(needs and o.is_floating_point())
                if isinstance(o, torch.Tensor) else o for o in outs]
        rec.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        self.bag.update(zip(step.outputs, outs))

    def _compute(self, step: Compute, k: int) -> None:
        self._wait(set(step.inputs))
        eng = self.engine
        calls: dict[int, list[Any]] = {}
        mods = _outermost(step.deferred) if self.grad else []
        handles = [m.register_forward_hook(
            lambda mod, args, out: calls.setdefault(id(mod), []).append(out)) for m in mods]
        try:
            with eng._on(self.chain, "compute", f"F.{step.name}[{k}]", k,
                         self.chain.microbatch):
                leaves = [_leaf(self.bag[n], self.grad) for n in step.inputs]
                outs = _as_list(step.fn(*leaves), f"sub-step {step.name!r}")
        finally:
            for h in handles:
                h.remove()
        if len(outs) != len(step.outputs):
            raise ValueError(f"sub-step {step.name!r} declares {len(step.outputs)} outputs "
                             f"{list(step.outputs)}, its fn returned {len(outs)}")
        self.bag.update(zip(step.outputs, outs))
        if self.grad:
            rec = _Record(step, k)
            rec.leaves, rec.outputs = leaves, outs
            if mods and all(len(calls.get(id(m), [])) == 1 for m in mods):
                rec.module_outs = [(m, [t for t in _as_list(calls[id(m)][0], "module")
                                        if isinstance(t, torch.Tensor) and t.requires_grad])
                                   for m in mods]
            self.trace.records[(k, step.name)] = rec

    def _start(self, step: Comm, k: int) -> None:
        self._wait(set(step.inputs))
        eng = self.engine
        originals = [self.bag[n] for n in step.inputs]
        ins = [t.detach() if isinstance(t, torch.Tensor) else t for t in originals]
        rec = _Record(step, k)
        rec.requires = [isinstance(t, torch.Tensor) and t.requires_grad for t in originals]
        began = time.perf_counter()
        with eng._on(self.chain, "comm", f"comm.{step.name}.F[{k}]", k, self.chain.microbatch):
            eng._cross(ins, "comm")
            rec.transfer = step.start(*ins)
        self.pending.append((rec, began))
        if self.grad:
            self.trace.records[(k, step.name)] = rec

    def finish(self) -> list[torch.Tensor]:
        """Wait for what is still in flight, run the last post; return the stage outputs
        (carrying the trace when autograd is on)."""
        last = len(self.decl.layers) - 1
        self.post(last)
        for rec, began in list(self.pending):
            self.pending.remove((rec, began))
            self._finish_transfer(rec, began)
        # the caller's stream (compute) must see the chain's last sub-step
        with self.engine._on(self.chain, "compute", None, last, self.chain.microbatch):
            outs = [self.bag[n] for n in self.decl.outputs]
        if not self.grad or not any(isinstance(o, torch.Tensor) and o.requires_grad
                                    for o in outs):
            return outs
        self.trace.outputs = outs
        self.trace.anchor = torch.empty(0, requires_grad=True)
        return list(_StageFunction.apply(self.trace, self.trace.anchor, *self.trace.inputs))


def _outermost(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """``modules`` without those inside another of them (whose W the outer one covers)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    out, seen = [], set()
    for m in modules:
        if id(m) not in inner and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _weight_grad_fn(outs: list[torch.Tensor], grads: list[torch.Tensor],
                    later: list[torch.Tensor],
                    module_grads: list[tuple[list[torch.Tensor], list[torch.Tensor],
                                             list[torch.Tensor]]] | None
                    ) -> Callable[[], None]:
    """W of one sub-step: from each deferred module's output gradients (captured during B) to
    its parameters; without them, from the sub-step's outputs again."""
    def weight_grad() -> None:
        if module_grads is None:
            torch.autograd.backward(outs, grads, inputs=later)
            return
        for ts, gs, params in module_grads:
            if params:
                torch.autograd.backward(ts, gs, inputs=params)
    return weight_grad


def _reachable_leaves(outputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Tensors whose gradient a backward from ``outputs`` would accumulate (their
    AccumulateGrad nodes), in discovery order."""
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    leaves = [o for o in outputs if o.grad_fn is None and o.requires_grad]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            found.append(var)
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                stack.append(nxt)
    return leaves + found


def _graph_walk(roots: Sequence[torch.Tensor | None]
                ) -> tuple[list[_Trace], list[torch.Tensor]]:
    """From ``roots``' autograd nodes down to the first stage record on each path: the records
    met, and the leaves (parameters) met on the way (a criterion's own weights)."""
    seen: set[int] = set()
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    traces: dict[int, _Trace] = {}
    leaves: list[torch.Tensor] = []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        trace = getattr(node, "deeppar_trace", None)
        if isinstance(trace, _Trace):
            traces[id(trace)] = trace
            continue
        var = getattr(node, "variable", None)
        if isinstance(var, torch.Tensor):
            leaves.append(var)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                stack.append(nxt)
    return list(traces.values()), leaves


def _start_backward(engine: FusedEngine, module: nn.Module, loss: torch.Tensor | None,
                    outputs: list[torch.Tensor], grads: list[torch.Tensor],
                    chain: _Chain) -> _BackwardRun:
    """Find ``module``'s record behind ``loss`` / ``outputs``, run the part of the backward
    that comes after the stage (the criterion's) and capture the stage outputs' gradients. The
    backward is limited to the criterion's leaves and the record's anchor, so nothing before
    the stage runs (or is freed) yet."""
    if not declares_substeps(module):
        raise TypeError(f"module1 ({type(module).__name__}) does not declare sub-steps")
    roots = [loss] if loss is not None else outputs
    traces, leaves = _graph_walk(roots)
    if len(traces) != 1 or traces[0].anchor is None:
        raise ValueError(f"the backward of {type(module).__name__} needs outputs made by one "
                         "call of forward_substeps (the stage's forward must call it)")
    trace = traces[0]
    trace.capture = True
    try:
        with torch.profiler.record_function("B.head"):
            if loss is not None:
                _run_backward([loss], [torch.ones_like(loss)], [trace.anchor, *leaves])
            else:
                _run_backward(outputs, grads, [trace.anchor])
    finally:
        trace.capture = False
    if trace.captured is None:
        raise RuntimeError("the stage's output gradients were not captured")
    return _BackwardRun(engine, trace, list(trace.captured), chain)


def _run_backward(tensors: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  inputs: Sequence[torch.Tensor] = ()) -> None:
    """Backward without autograd's shape check (sent outputs may be emptied placeholders),
    optionally only towards ``inputs``."""
    if tensors:
        Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
            tuple(tensors), tuple(grads), keep_graph=False, create_graph=False,
            inputs=tuple(inputs), allow_unreachable=True, accumulate_grad=True)


class _BackwardRun:
    """The backward chain of one micro-batch through one stage, from its records."""

    def __init__(self, engine: FusedEngine, trace: _Trace,
                 out_grads: list[torch.Tensor | None], chain: _Chain) -> None:
        self.engine = engine
        #: True in an F&B pair (W of deferred modules in its own slot); False for F then B
        self.split = True
        self.trace = trace
        self.chain = chain
        self.grads: dict[str, torch.Tensor] = {}
        self.pending: list[tuple[_Record, Transfer, float]] = []
        sink = active_store()
        #: where W goes when the pipeline defers it (an ``I`` backward); None: run it here
        self.sink: WeightGradStore | None = sink if sink is not None and sink.enabled else None
        for n, g in zip(trace.decl.outputs, out_grads):
            if g is not None:
                self._add(n, g)

    def _add(self, name: str, g: torch.Tensor) -> None:
        self.grads[name] = self.grads[name] + g if name in self.grads else g

    def _take(self, k: int, name: str, keep: bool = False) -> _Record:
        recs = self.trace.records
        if (k, name) not in recs:
            raise RuntimeError(f"backward of {name}[{k}]: no record (its backward already ran, "
                               "or the order runs it before what it needs)")
        return recs[(k, name)] if keep else recs.pop((k, name))

    def action(self, name: str, k: int) -> None:
        if name == COMBINE:
            if (k, POST) in self.trace.records:
                self._backward(self._take(k, POST), k, split=False)
            self._start(self._take(k, COMBINE), k)
        elif name == DISPATCH:
            self._start(self._take(k, DISPATCH), k)
        elif name in (MLP, ATTN):
            self._backward(self._take(k, name, keep=True), k, split=self.split)
        elif name in ("mlp.W", "attn.W"):
            self._weight(self._take(k, name.split(".")[0]), k)
        else:
            raise ValueError(f"unknown backward action {name!r}")

    def serial(self) -> None:
        """The whole backward in order (F then B): per layer, last to first; weight
        gradients are computed with the input gradients unless the pipeline defers them."""
        self.split = False
        for k in reversed(range(len(self.trace.decl.layers))):
            for name in (COMBINE, MLP, "mlp.W", DISPATCH, ATTN, "attn.W"):
                self.action(name, k)

    def _wait(self, names: set[str]) -> None:
        for rec, tr, began in list(self.pending):
            if names & set(rec.step.inputs):
                self.pending.remove((rec, tr, began))
                self._finish_transfer(rec, tr, began)

    def _finish_transfer(self, rec: _Record, tr: Transfer, began: float) -> None:
        eng, step = self.engine, rec.step
        wait_began = time.perf_counter()
        with eng._on(self.chain, "comm", f"comm.{step.name}.B[{rec.layer}].wait", rec.layer,
                     self.chain.microbatch):
            grads = _as_list(tr.wait(), f"{step.name} backward transfer")
        eng._comm_entry(f"comm.{step.name}.B", rec.layer, self.chain.microbatch, began,
                        wait_began)
        eng._cross(grads, "compute")
        # the sums run on the compute stream, after the transfer (the chain's event)
        with eng._on(self.chain, "compute", None, rec.layer, self.chain.microbatch):
            for n, req, g in zip(step.inputs, rec.requires, grads):
                if req and isinstance(g, torch.Tensor):
                    self._add(n, g)

    def _start(self, rec: _Record, k: int) -> None:
        step: Comm = rec.step  # type: ignore[assignment]
        if not any(rec.requires):
            for n in step.outputs:
                self.grads.pop(n, None)
            return
        self._wait(set(step.outputs))
        eng = self.engine
        grads = []
        with eng._on(self.chain, "compute", None, k, self.chain.microbatch):
            for n, (shape, dtype, device) in zip(step.outputs, rec.out_meta):
                g = self.grads.pop(n, None)
                grads.append(g if g is not None
                             else torch.zeros(shape, dtype=dtype, device=device))
        began = time.perf_counter()
        with eng._on(self.chain, "comm", f"comm.{step.name}.B[{k}]", k, self.chain.microbatch):
            eng._cross(grads, "comm")
            tr = step.start_backward(rec.transfer, *grads)
        self.pending.append((rec, tr, began))
        rec.transfer = None

    def _backward(self, rec: _Record, k: int, split: bool) -> None:
        """B of a computation sub-step; with ``split`` and deferred modules, keep the graph
        for its W (:meth:`_weight`), else compute everything now."""
        step: Compute = rec.step  # type: ignore[assignment]
        self._wait(set(step.outputs))
        outs, grads = [], []
        for n, o in zip(step.outputs, rec.outputs or []):
            g = self.grads.pop(n, None)
            if g is not None and isinstance(o, torch.Tensor) and o.requires_grad:
                outs.append(o)
                grads.append(g)
        deferred = {id(p) for m in step.deferred for p in m.parameters() if p.requires_grad}
        defer = bool(deferred) and bool(outs) and (split or self.sink is not None)
        eng = self.engine
        with eng._on(self.chain, "compute", f"B.{step.name}[{k}]", k, self.chain.microbatch):
            if outs and defer:
                reach = _reachable_leaves(outs)
                later = [t for t in reach if id(t) in deferred]
                now = [t for t in reach if id(t) not in deferred]
                # catch each deferred module's output gradient on the way, so W needs only
                # the module's own part of the graph
                caught: dict[tuple[int, int], torch.Tensor] = {}
                hooks = []
                for i, (_, ts) in enumerate(rec.module_outs or []):
                    for j, t in enumerate(ts):
                        hooks.append(t.register_hook(
                            lambda g, key=(i, j): caught.__setitem__(key, g)))
                try:
                    if now:
                        torch.autograd.backward(outs, grads, inputs=now,
                                                retain_graph=bool(later))
                finally:
                    for h in hooks:
                        h.remove()
                module_grads = None
                if rec.module_outs is not None and all(
                        (i, j) in caught for i, (_, ts) in enumerate(rec.module_outs)
                        for j in range(len(ts))):
                    want = {id(t) for t in later}
                    module_grads = [
                        (ts, [caught[(i, j)] for j in range(len(ts))],
                         [p for p in m.parameters() if id(p) in want])
                        for i, (m, ts) in enumerate(rec.module_outs)]
                if later:
                    rec.weight_grad = _weight_grad_fn(outs, grads, later, module_grads)
                rec.module_outs = None
            elif outs:
                torch.autograd.backward(outs, grads)
        for n, leaf in zip(step.inputs, rec.leaves or []):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.grad is not None:
                self._add(n, leaf.grad)
        rec.leaves = rec.outputs = None
        if rec.weight_grad is not None and not split:
            self._weight(rec, k)

    def _weight(self, rec: _Record, k: int) -> None:
        """W of a computation sub-step: run it now, or queue it in the pipeline's store."""
        fn, rec.weight_grad = rec.weight_grad, None
        if fn is None:
            return
        if self.sink is not None:
            self.sink.put(fn)
            return
        with self.engine._on(None, "compute", f"W.{rec.step.name}[{k}]", k,
                             self.chain.microbatch):
            fn()

    def finish(self, deliver: bool) -> list[torch.Tensor | None]:
        """Wait for what is in flight; the stage inputs' gradients. With ``deliver``, also
        accumulate them into leaf inputs' ``.grad`` / pass them on for non-leaves."""
        for rec, tr, began in list(self.pending):
            self.pending.remove((rec, tr, began))
            self._finish_transfer(rec, tr, began)
        if self.trace.records:
            left = sorted(f"{n}[{k}]" for k, n in self.trace.records)
            raise RuntimeError(f"backward left sub-steps unrun: {left}")
        out: list[torch.Tensor | None] = []
        for n, x in zip(self.trace.decl.inputs, self.trace.inputs):
            g = self.grads.pop(n, None)
            out.append(g if isinstance(x, torch.Tensor) and x.requires_grad else None)
        if deliver:
            pending = [(x, g) for x, g in zip(self.trace.inputs, out) if g is not None]
            with self.engine._on(self.chain, "compute", None, 0, self.chain.microbatch):
                for x, g in pending:
                    if x.grad_fn is None:
                        x.grad = g if x.grad is None else x.grad + g
                nonleaf = [(x, g) for x, g in pending if x.grad_fn is not None]
                _run_backward([x for x, _ in nonleaf], [g for _, g in nonleaf])
        self.trace.inputs = []
        return out


__all__ = [
    "ORDER_DEVICE",
    "ORDER_HOST",
    "FusedEngine",
    "TimelineEntry",
    "check_order",
    "forward_substeps",
    "forward_two_microbatches",
]
