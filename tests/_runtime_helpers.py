"""Helpers for the runtime tests: one spawned gloo group per world size runs many cases in a row
and reports each case's outcome per rank through a queue; plus the models and the sequential
reference the pipeline results are compared with."""

from __future__ import annotations

import copy
import importlib
import os
import queue as _queue
import socket
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 8
MB = 2  # micro-batch size

# ----------------------------------------------------------------------------- process groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cases: list[str], q) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
    except Exception:  # noqa: BLE001
        q.put((rank, "<init>", traceback.format_exc()))
        return
    for name in cases:
        try:
            _case(name)(rank, world)
            q.put((rank, name, None))
        except Exception:  # noqa: BLE001
            q.put((rank, name, traceback.format_exc()))
        # keep ranks together between cases, so one case's messages never meet the next's
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            q.put((rank, "<barrier>", traceback.format_exc()))
            break
    dist.destroy_process_group()


def _case(name: str) -> Callable[[int, int], None]:
    """A case function: ``name`` in this module, or ``"module:name"`` in another test module."""
    module, _, func = name.rpartition(":")
    return getattr(importlib.import_module(module) if module else sys.modules[__name__], func)


def run_cases(world: int, cases: list[str], timeout: float) -> dict[str, dict[int, str | None]]:
    """Run ``cases`` (names of functions ``case(rank, world)`` in this module, or
    ``"module:name"``) on one spawned
    gloo group of ``world`` processes. Returns ``{case: {rank: traceback or None}}``; a case
    that did not report on some rank before ``timeout`` seconds gets ``"timeout"`` there."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[str, dict[int, str | None]] = {c: {} for c in cases}
    expected = world * len(cases)
    got = 0
    import time

    deadline = time.monotonic() + timeout
    try:
        while got < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, name, err = q.get(timeout=min(left, 5.0))
            except _queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break
                continue
            results.setdefault(name, {})[rank] = err
            if name in cases:
                got += 1
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for c in cases:
        for r in range(world):
            results[c].setdefault(r, "timeout (no report)")
    return results


def failures(results: dict[str, dict[int, str | None]]) -> str:
    lines = []
    for case, per_rank in results.items():
        for r, err in sorted(per_rank.items()):
            if err is not None:
                lines.append(f"--- {case} rank {r}:\n{err}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- models


class MLPStage(nn.Module):
    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class GatedStage(nn.Module):
    """A different stage type (for mixed-type pipelines)."""

    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.gate = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * torch.sigmoid(self.gate(x))


class MultiStage(nn.Module):
    """Returns (h, unused, idx): ``unused`` requires grad but the next stage ignores it (its
    gradient is None), ``idx`` is an integer tensor without gradient."""

    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.side = nn.Linear(d, d)
        self.emb = nn.Parameter(torch.randn(4, d) * 0.1)

    def forward(self, x: torch.Tensor, unused: torch.Tensor | None = None,
                idx: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        h = torch.tanh(self.fc(x))
        if idx is not None:
            h = h + self.emb[idx]
        new_idx = (x.detach().abs().sum(-1) * 10).long() % 4
        return h, self.side(x), new_idx


class HookStage(MLPStage):
    """MLPStage with DeepSeek's overlapped_forward_backward hook (counts its calls)."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0,
                                    module1, loss1, outputs1, output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            # the engine directly: sent outputs have had their storage freed
            from deeppar.pipeline.overlap import run_backward

            run_backward(list(outputs1), list(output_grads1))
        return outputs0, loss0


class Recording(nn.Module):
    """Wraps a stage and keeps every output it returns (to inspect their storage later)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.outputs: list[torch.Tensor] = []

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = self.inner(*xs)
        self.outputs.append(out)
        return out


def assert_sent_freed(pipe, last_slot: set[int], kept_slot: set[int]) -> None:
    """After a training step without returned outputs, the outputs of the stages in slots
    other than ``last_slot`` (last stages) and ``kept_slot`` (local hand-over) hold no storage;
    the kept ones are full size."""
    for slot, m in enumerate(pipe.module):
        if slot in last_slot:
            continue
        assert m.outputs, f"slot {slot} recorded no outputs"
        sizes = [o.untyped_storage().nbytes() for o in m.outputs]
        if slot in kept_slot:
            assert all(n > 0 for n in sizes), f"slot {slot}: a locally handed-over output freed"
        else:
            assert all(n == 0 for n in sizes), f"slot {slot}: sent outputs still hold {sizes}"


def criterion(y: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(y, label)


def multi_criterion(h: torch.Tensor, unused: torch.Tensor, idx: torch.Tensor,
                    label: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(h, label) + 0.01 * idx.float().mean()


def make_model(n: int, kind: str = "mlp", seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    stages: list[nn.Module] = []
    for k in range(n):
        if kind == "mlp":
            stages.append(MLPStage())
        elif kind == "mixed":
            stages.append(MLPStage() if k % 2 == 0 else GatedStage())
        elif kind == "multi":
            stages.append(MultiStage())
        elif kind == "hook":
            stages.append(HookStage())
        else:
            raise ValueError(kind)
    return stages


def make_data(n_chunks: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_chunks * MB, HIDDEN, generator=g)
    y = torch.randn(n_chunks * MB, HIDDEN, generator=g)
    return x, y


# ----------------------------------------------------------------------------- reference


def reference(stages: list[nn.Module], x: torch.Tensor, y: torch.Tensor, n_chunks: int,
              crit: Callable, train: bool = True):
    """Run the stages one after another per micro-batch; returns (losses, outputs) per mb and
    leaves the parameter gradients on ``stages``."""
    losses, outs = [], []
    for xm, ym in zip(x.chunk(n_chunks), y.chunk(n_chunks)):
        with torch.set_grad_enabled(train):
            h: tuple = (xm,)
            for s in stages:
                o = s(*h)
                h = (o,) if isinstance(o, torch.Tensor) else tuple(o)
            loss = crit(*h, ym)
        if train:
            loss.backward()
        losses.append(loss.detach())
        outs.append(tuple(t.detach() for t in h))
    return losses, outs


def cos_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    den = (a * a + b * b).sum().item()
    if den == 0.0:
        return 0.0
    return 1.0 - 2.0 * (a * b).sum().item() / den


def assert_grads_match(mine: nn.Module, ref: nn.Module, what: str) -> None:
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), f"{what}.{name}: expected no gradient"
            continue
        assert p.grad is not None, f"{what}.{name}: gradient missing"
        d = cos_diff(p.grad, q.grad)
        assert d < 1e-12, f"{what}.{name}: cosine distance {d}"


def cat_outputs(outs: list[tuple], mbs: list[int]):
    cat = tuple(torch.cat([outs[m][i] for m in mbs]) for i in range(len(outs[0])))
    return cat[0] if len(cat) == 1 else cat


def assert_outputs_equal(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), "outputs differ"
    else:
        assert isinstance(got, tuple) and len(got) == len(want), "outputs differ in count"
        for g, w in zip(got, want):
            assert torch.equal(g, w), "outputs differ"


# ----------------------------------------------------------------------------- checks


def check_dualpipe(rank: int, world: int, n_chunks: int, *, kind: str = "mlp",
                   crit: Callable = criterion, cls=None, transform: Callable | None = None,
                   train: bool = True, return_outputs: bool = True, tie: bool = False,
                   **pipe_kw):
    """One DualPipe step against the sequential reference; returns the pipeline. ``tie``: the
    first and last stages share ``fc1`` (tied weights, local to the two end ranks)."""
    if cls is None:
        from deeppar.pipeline import DualPipe as cls
    P = world
    stages = make_model(P, kind)
    if tie:
        stages[P - 1].fc1 = stages[0].fc1
    ref = copy.deepcopy(stages)
    x, y = make_data(n_chunks)
    losses, outs = reference(ref, x, y, n_chunks, crit, train)
    # one deepcopy of the pair keeps parameters the two stages share shared
    local = list(copy.deepcopy([stages[rank], stages[P - 1 - rank]]))
    if transform is not None:
        local = [transform(m) for m in local]
    pipe = cls(tuple(local), **pipe_kw)
    half = n_chunks // 2
    inp = x[:half * MB] if rank == 0 else x[half * MB:] if rank == P - 1 else None
    lab = y[half * MB:] if rank == 0 else y[:half * MB] if rank == P - 1 else None
    with torch.set_grad_enabled(train):
        loss, out = pipe.step(inp, num_chunks=n_chunks, criterion=crit, labels=(lab,),
                              return_outputs=return_outputs)
    mbs = (list(range(half, n_chunks)) if rank == 0 else list(range(half))
           if rank == P - 1 else None)
    if mbs is None:
        assert loss is None and out is None, "a middle rank returned a loss or outputs"
    else:
        want = torch.stack([losses[m] for m in mbs])
        assert torch.equal(loss, want), f"losses differ: {loss} vs {want}"
        if return_outputs:
            assert_outputs_equal(out, cat_outputs(outs, mbs))
        else:
            assert out is None
    if train:
        pipe.sum_mirrored_grads()
        assert_grads_match(local[0], ref[rank], f"rank{rank}.slot0")
        assert_grads_match(local[1], ref[P - 1 - rank], f"rank{rank}.slot1")
    else:
        assert all(p.grad is None for m in local for p in m.parameters())
    return pipe


def check_dualpipev(rank: int, world: int, n_chunks: int, *, kind: str = "mlp",
                    crit: Callable = criterion, cls=None, transform: Callable | None = None,
                    train: bool = True, return_outputs: bool = True, **pipe_kw):
    """One DualPipeV step against the sequential reference; returns the pipeline."""
    if cls is None:
        from deeppar.pipeline import DualPipeV as cls
    P = world
    stages = make_model(2 * P, kind)
    ref = copy.deepcopy(stages)
    x, y = make_data(n_chunks)
    losses, outs = reference(ref, x, y, n_chunks, crit, train)
    local = [copy.deepcopy(stages[rank]), copy.deepcopy(stages[2 * P - 1 - rank])]
    if transform is not None:
        local = [transform(m) for m in local]
    pipe = cls(tuple(local), **pipe_kw)
    inp, lab = (x, y) if rank == 0 else (None, None)
    with torch.set_grad_enabled(train):
        loss, out = pipe.step(inp, num_chunks=n_chunks, criterion=crit, labels=(lab,),
                              return_outputs=return_outputs)
    if rank != 0:
        assert loss is None and out is None, "a rank other than 0 returned a loss or outputs"
    else:
        assert torch.equal(loss, torch.stack(losses)), "losses differ"
        if return_outputs:
            assert_outputs_equal(out, cat_outputs(outs, list(range(n_chunks))))
    if train:
        assert_grads_match(local[0], ref[rank], f"rank{rank}.slot0")
        assert_grads_match(local[1], ref[2 * P - 1 - rank], f"rank{rank}.slot1")
    return pipe


def expect_error(fn: Callable, *words: str) -> None:
    try:
        fn()
    except ValueError as e:
        for w in words:
            assert w in str(e), f"error {e!r} does not mention {w!r}"
        return
    raise AssertionError("no ValueError raised")


# ----------------------------------------------------------------------------- cases: DualPipe


def case_dp_train(rank: int, world: int) -> None:
    for n in (2 * world, 2 * world + 2, 4 * world):
        check_dualpipe(rank, world, n)
    # sent activations are freed after their send; gradients stay exact
    pipe = check_dualpipe(rank, world, 2 * world + 2, transform=Recording,
                          return_outputs=False)
    last = {1} if rank == 0 else {0} if rank == world - 1 else set()
    assert_sent_freed(pipe, last, set())


def case_dp_infer(rank: int, world: int) -> None:
    check_dualpipe(rank, world, 2 * world, train=False)
    check_dualpipe(rank, world, 2 * world + 2, train=False, return_outputs=False)


# ----------------------------------------------------------------------------- cases: DualPipeV


def case_dpv_train(rank: int, world: int) -> None:
    for n in (2 * world, 2 * world + 1, 3 * world + 2):
        check_dualpipev(rank, world, n)
    pipe = check_dualpipev(rank, world, 2 * world + 1, transform=Recording,
                           return_outputs=False)
    assert_sent_freed(pipe, {1} if rank == 0 else set(), {0} if rank == world - 1 else set())


def case_dpv_infer(rank: int, world: int) -> None:
    check_dualpipev(rank, world, 2 * world + 1, train=False)


# ----------------------------------------------------------------------------- DeepSeek style


class _LinearFunc(torch.autograd.Function):
    """DeepSeek's example style: the weight gradient goes through the class-level store."""

    puts = 0

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        from deeppar.dualpipe.utils import WeightGradStore

        x, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

        def grad_weight_fn():
            weight.grad += grad_out.flatten(0, -2).T @ x.flatten(0, -2)

        if WeightGradStore.enabled:
            _LinearFunc.puts += 1
            WeightGradStore.put(grad_weight_fn)
        else:
            grad_weight_fn()
        return grad_out @ weight, None


class _MyLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFunc.apply(x, self.weight)


class DeepSeekStage(nn.Module):
    """The stage of DeepSeek's example (custom autograd function + overlap hook)."""

    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.linear1 = _MyLinear(d, 2 * d, bias=False)
        self.linear2 = _MyLinear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0,
                                    module1, loss1, outputs1, output_grads1):
        from deeppar.dualpipe.utils import run_backward

        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def _deepseek_style(rank: int, world: int, v: bool) -> None:
    """DeepSeek's published example, with only its imports changed (and gloo/CPU)."""
    import deeppar.dualpipe as dp
    from deeppar.dualpipe import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes

    num_chunks = 2 * world + 2
    early = (DualPipeV if v else DualPipe)((DeepSeekStage(), DeepSeekStage()))
    set_p2p_tensor_shapes([(MB, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    try:
        torch.manual_seed(233)
        n_stages = 2 * world if v else world
        full = nn.Sequential(*[DeepSeekStage() for _ in range(n_stages)])
        full_x = torch.randn(num_chunks * MB, HIDDEN)
        full_l = torch.randn(num_chunks * MB, HIDDEN)
        ref = copy.deepcopy(full)
        losses, outs = reference(list(ref), full_x, full_l, num_chunks, criterion)
        other = n_stages - 1 - rank
        local = nn.Sequential(DeepSeekStage(), DeepSeekStage())
        local[0].load_state_dict(full[rank].state_dict())
        local[1].load_state_dict(full[other].state_dict())
        model = (DualPipeV if v else DualPipe)(local)
        # the module-level shapes reach the compat pipelines created after they were set only
        assert model.p2p_shapes == [(MB, HIDDEN)] and model.p2p_dtype == torch.float32
        assert early.p2p_shapes is None
        from deeppar.pipeline import DualPipeV as Native

        assert Native((DeepSeekStage(), DeepSeekStage())).p2p_shapes is None
        if v:
            x, lab = (full_x, full_l) if rank == 0 else (None, None)
            mbs = list(range(num_chunks)) if rank == 0 else None
        elif rank == 0:
            x, lab, mbs = full_x.chunk(2)[0], full_l.chunk(2)[1], list(range(num_chunks // 2,
                                                                              num_chunks))
        elif rank == world - 1:
            x, lab, mbs = full_x.chunk(2)[1], full_l.chunk(2)[0], list(range(num_chunks // 2))
        else:
            x = lab = mbs = None
        hook_calls = _LinearFunc.puts
        loss, outputs = model.step(x, num_chunks=num_chunks, criterion=criterion, labels=(lab,),
                                   return_outputs=False)
        assert _LinearFunc.puts > hook_calls, "no weight gradient was deferred"
        if mbs is None:
            assert loss is None
        else:
            assert torch.equal(loss, torch.stack([losses[m] for m in mbs]))
        assert outputs is None
        if not v:
            model.sum_mirrored_grads()
        assert_grads_match(local[0], ref[rank], "slot0")
        assert_grads_match(local[1], ref[other], "slot1")
        model.zero_grad()
        with torch.no_grad():
            loss, outputs = model.step(x, num_chunks=num_chunks, criterion=criterion,
                                       labels=(lab,), return_outputs=True)
        if mbs is None:
            assert loss is None and outputs is None
        else:
            assert torch.equal(loss, torch.stack([losses[m] for m in mbs]))
            assert torch.equal(outputs, cat_outputs(outs, mbs))
    finally:
        set_p2p_tensor_shapes(None)
        set_p2p_tensor_dtype(None)
    assert dp._P2P == {"shapes": None, "dtype": None}
    assert (DualPipeV if v else DualPipe)((DeepSeekStage(), DeepSeekStage())).p2p_shapes is None


# ----------------------------------------------------------------------------- more cases


def case_dp_variants(rank: int, world: int) -> None:
    """Multi-tensor outputs with None gradients, mixed stage types, the overlap hook, fixed
    per-instance p2p shapes."""
    n = 2 * world + 2
    check_dualpipe(rank, world, n, kind="multi", crit=multi_criterion)
    check_dualpipe(rank, world, n, kind="multi", crit=multi_criterion, train=False)
    check_dualpipe(rank, world, n, kind="mixed")
    before = HookStage.calls
    check_dualpipe(rank, world, n, kind="hook")
    assert HookStage.calls > before, "the overlapped_forward_backward hook was never called"
    check_dualpipe(rank, world, n, p2p_shapes=[(MB, HIDDEN)], p2p_dtype=torch.float32)
    # tied weights between the two stages of the end ranks: sum_mirrored_grads adds the
    # mirror's gradient of the shared tensor once
    check_dualpipe(rank, world, n, tie=True)


def case_dpv_variants(rank: int, world: int) -> None:
    n = 2 * world + 1
    check_dualpipev(rank, world, n, kind="multi", crit=multi_criterion)
    check_dualpipev(rank, world, n, kind="mixed")
    before = HookStage.calls
    check_dualpipev(rank, world, n, kind="hook")
    assert HookStage.calls > before, "the overlapped_forward_backward hook was never called"
    check_dualpipev(rank, world, n, p2p_shapes=[(MB, HIDDEN)], p2p_dtype=torch.float32)


def _count_deferrable(pipe, n: int) -> int:
    """Closures a step must defer: 2 Linear layers per stage per I action of this rank."""
    from deeppar.pipeline import Kind

    sched = pipe.schedule(n)
    return 2 * sum(1 for a in sched.rank_actions(pipe.rank) if a.kind is Kind.I)


def case_zero_bubble(rank: int, world: int, v: bool = False) -> None:
    """Plain nn.Linear stages made deferrable: W slots do the weight-gradient work."""
    from deeppar.pipeline import defer_weight_grads, weight_grad

    check = check_dualpipev if v else check_dualpipe
    n = 2 * world + 2
    # only the forwards whose backward is an I record the deferrable graph
    fn = weight_grad._DeferredLinearFn
    plain_forward, recorded = fn.forward, [0]

    def counting_forward(ctx, *args):
        recorded[0] += 1
        return plain_forward(ctx, *args)

    fn.forward = staticmethod(counting_forward)
    try:
        p1 = check(rank, world, n, transform=defer_weight_grads)
    finally:
        fn.forward = staticmethod(plain_forward)
    expected = _count_deferrable(p1, n)
    assert expected > 0
    assert recorded[0] == expected, f"{recorded[0]} deferrable forwards, {expected} needed"
    st = p1.weight_grad_store
    assert st.deferred == expected, f"deferred {st.deferred}, expected {expected}"
    assert st.executed == st.deferred, "deferred work not run"
    # a second pipeline in the same process has its own store
    p2 = check(rank, world, n, kind="mixed", transform=defer_weight_grads)
    assert p1.weight_grad_store.deferred == expected, "the first pipeline's store was touched"
    assert p2.weight_grad_store is not p1.weight_grad_store
    assert p2.weight_grad_store.executed == p2.weight_grad_store.deferred > 0


def case_dpv_zero_bubble(rank: int, world: int) -> None:
    case_zero_bubble(rank, world, v=True)


def case_deepseek_dp(rank: int, world: int) -> None:
    _deepseek_style(rank, world, v=False)


def case_deepseek_dpv(rank: int, world: int) -> None:
    _deepseek_style(rank, world, v=True)


def case_timeline(rank: int, world: int, v: bool = False) -> None:
    import json
    import tempfile

    from deeppar.pipeline.simulate import simulate
    from deeppar.pipeline.timeline import measured_costs, to_measured_costs, write_chrome_trace

    n = 2 * world + 2
    check = check_dualpipev if v else check_dualpipe
    pipe = check(rank, world, n, record_timeline=True)
    sched = pipe.schedule(n)
    assert len(pipe.timeline) == len(sched.steps[rank])
    assert [t.step for t in pipe.timeline] == list(sched.steps[rank])
    assert all(t.end >= t.start >= 0 for t in pipe.timeline)
    steps = pipe.gather_timeline()
    assert len(steps) == sum(len(p) for p in sched.steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        trace = write_chrome_trace(sched, steps, path)
        with open(path) as f:
            assert json.load(f) == trace
        assert len([e for e in trace["traceEvents"] if e["ph"] == "X"]) == len(steps)
        assert set(measured_costs(steps)) <= {"F", "B", "I", "W", "FB"}
        sim = simulate(sched, to_measured_costs(steps))
        assert sim.makespan > 0
        # `deeppar schedule simulate --measured` reads the timeline file as written
        if rank == 0:
            import contextlib
            import io

            from deeppar.cli import main

            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(["schedule", "simulate", "--method", sched.method, "--ranks",
                             str(world), "--chunks", str(n), "--measured", path, "--json"])
            assert code == 0
            got = json.loads(out.getvalue())
            assert abs(got["makespan"] - sim.makespan) <= 1e-6 * sim.makespan, got


def case_dpv_timeline(rank: int, world: int) -> None:
    case_timeline(rank, world, v=True)


def _valid_dp_args(rank: int, world: int, n: int):
    x, y = make_data(n)
    half = n // 2
    inp = x[:half * MB] if rank == 0 else x[half * MB:] if rank == world - 1 else None
    lab = y[half * MB:] if rank == 0 else y[:half * MB] if rank == world - 1 else None
    return inp, lab


def case_dp_errors(rank: int, world: int) -> None:
    """Bad arguments raise the same ValueError on every rank before any send or receive."""
    from deeppar.pipeline import DualPipe

    stages = make_model(world)
    pipe = DualPipe((stages[rank], stages[world - 1 - rank]))
    n = 2 * world
    inp, lab = _valid_dp_args(rank, world, n)
    expect_error(lambda: pipe.step(inp, num_chunks=n + 1, criterion=criterion, labels=(lab,)),
                 "num_chunks", "even")
    expect_error(lambda: pipe.step(inp, num_chunks=n - 2, criterion=criterion, labels=(lab,)),
                 "num_chunks")
    expect_error(lambda: pipe.step(inp, num_chunks=n, labels=(lab,)), "criterion",
                 f"rank {world - 1}")
    if world > 2:  # inputs on a middle rank
        bad = make_data(n)[0] if rank == 1 else inp
        expect_error(lambda: pipe.step(bad, num_chunks=n, criterion=criterion, labels=(lab,)),
                     "inputs", "rank 1")
    missing = None if rank == 0 else inp
    expect_error(lambda: pipe.step(missing, num_chunks=n, criterion=criterion, labels=(lab,)),
                 "inputs", "rank 0")
    _label_errors(pipe, rank, world, n, inp, lab, ends=(0, world - 1))
    # still in step: a valid step afterwards works
    pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))


def _label_errors(pipe, rank: int, world: int, n: int, inp, lab, ends: tuple[int, ...]) -> None:
    """Missing, None, mis-sized and uneven labels or inputs: the same ValueError on every
    rank, raised before any message (the next case would hang or fail otherwise)."""
    first = ends[0]
    # no labels at all on a loss rank (labels=() is the deliberate "criterion takes none")
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion),
                 f"rank {first}: labels", "given no labels")
    none_lab = (None,) if rank == first else (lab,)
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=none_lab),
                 f"rank {first}: labels", "got None")
    # labels with 3 samples per micro-batch against the inputs' 2
    big = torch.cat([lab, lab[: lab.shape[0] // 2]]) if rank == first else lab
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=(big,)),
                 f"labels on rank {first} have 3 samples per micro-batch", "inputs on rank")
    # labels whose rows are not a multiple of the micro-batches
    odd = lab[:-1] if rank == first else lab
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=(odd,)),
                 f"rank {first}: labels: batch size", "not divisible")
    # inputs the micro-batches do not divide evenly (tensor_split would cut them unevenly)
    uneven = inp[:-1] if rank == first else inp
    expect_error(lambda: pipe.step(uneven, num_chunks=n, criterion=criterion, labels=(lab,)),
                 f"rank {first}: inputs: batch size", "not divisible")
    # two label tensors on one loss rank, one on the other (DualPipe) / labels of
    # different batch sizes on one rank
    two = (lab, lab) if rank == first else (lab,)
    words = (("different numbers of label tensors",) if len(ends) > 1
             else ("rank 0: labels: the tensors differ in batch size",))
    if len(ends) == 1:
        two = (lab, lab[:MB * 2]) if rank == first else (lab,)
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=two), *words)


def case_dpv_errors(rank: int, world: int) -> None:
    from deeppar.pipeline import DualPipe, DualPipeV

    stages = make_model(2 * world)
    pipe = DualPipeV((stages[rank], stages[2 * world - 1 - rank]))
    n = 2 * world
    x, y = make_data(n)
    inp, lab = (x, y) if rank == 0 else (None, None)
    expect_error(lambda: pipe.step(inp, num_chunks=n - 1, criterion=criterion, labels=(lab,)),
                 "num_chunks")
    bad = x if rank == 1 else inp
    expect_error(lambda: pipe.step(bad, num_chunks=n, criterion=criterion, labels=(lab,)),
                 "inputs", "rank 1")
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=None, labels=(lab,)),
                 "criterion", "rank 0")
    _label_errors(pipe, rank, world, n, inp, lab, ends=(0,))
    # labels=() says the criterion takes only the outputs: accepted
    loss, _ = pipe.step(inp, num_chunks=n, criterion=lambda y: y.square().mean(), labels=())
    assert (loss is not None) == (rank == 0)
    pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))
    if world % 2 == 1:  # DualPipe needs an even number of ranks
        dp = DualPipe((stages[rank], stages[world - 1 - rank]))
        expect_error(lambda: dp.step(None, num_chunks=2 * world, criterion=criterion),
                     "even")


def case_generic_methods(rank: int, world: int) -> None:
    """The same runtime runs other generated schedules (1F1B, ZB1P, ZBV) correctly."""
    from deeppar.pipeline import PipelineRuntime, defer_weight_grads

    n = 2 * world
    x, y = make_data(n)
    for method in ("1f1b", "zb1p", "zbv"):
        n_stages = 2 * world if method == "zbv" else world
        stages = make_model(n_stages)
        ref = copy.deepcopy(stages)
        losses, _ = reference(ref, x, y, n, criterion)
        mine = [rank, 2 * world - 1 - rank] if method == "zbv" else [rank]
        local = [defer_weight_grads(copy.deepcopy(stages[k])) for k in mine]
        pipe = PipelineRuntime(local, method=method)
        first, last = 0, (0 if method == "zbv" else world - 1)
        loss, _ = pipe.step(x if rank == first else None, num_chunks=n, criterion=criterion,
                            labels=(y if rank == last else None,))
        if rank == last:
            assert torch.equal(loss, torch.stack(losses)), f"{method}: losses differ"
        else:
            assert loss is None
        for m, k in zip(local, mine):
            assert_grads_match(m, ref[k], f"{method}.stage{k}")


def case_shape_cache(rank: int, world: int) -> None:
    """Shapes travel in headers on the first step only; later steps with the same input shapes
    send none, and a new batch size brings the headers back. Results stay exact."""
    from deeppar.pipeline import DualPipeV

    P = world
    stages = make_model(2 * P)
    local = [copy.deepcopy(stages[rank]), copy.deepcopy(stages[2 * P - 1 - rank])]
    pipe = DualPipeV(tuple(local))
    n = 2 * P
    for rows, expect_headers in ((n * MB, True), (n * MB, False), (n * MB * 2, True)):
        x, y = make_data(rows // MB)
        ref = copy.deepcopy(stages)
        losses, _ = reference(ref, x, y, n, criterion)
        for m in local:
            m.zero_grad(set_to_none=True)
        loss, _ = pipe.step(x if rank == 0 else None, num_chunks=n, criterion=criterion,
                            labels=(y if rank == 0 else None,))
        assert (pipe.last_step_headers > 0) == expect_headers, pipe.last_step_headers
        if rank == 0:
            assert torch.equal(loss, torch.stack(losses))
        assert_grads_match(local[0], ref[rank], "slot0")
        assert_grads_match(local[1], ref[2 * P - 1 - rank], "slot1")
    # freezing a stage on one rank changes messages (an output that no longer requires grad)
    # without changing input shapes: every rank drops the cache for that step, then reuses it
    x, y = make_data(n)
    for frozen, expect_headers in ((True, True), (True, False), (False, True)):
        if rank == 0:
            local[0].requires_grad_(not frozen)
        ref = copy.deepcopy(stages)
        ref[0].requires_grad_(not frozen)
        losses, _ = reference(ref, x, y, n, criterion)
        for m in local:
            m.zero_grad(set_to_none=True)
        loss, _ = pipe.step(x if rank == 0 else None, num_chunks=n, criterion=criterion,
                            labels=(y if rank == 0 else None,))
        assert (pipe.last_step_headers > 0) == expect_headers, (frozen, pipe.last_step_headers)
        if rank == 0:
            assert torch.equal(loss, torch.stack(losses))
        assert_grads_match(local[0], ref[rank], "slot0")
        assert_grads_match(local[1], ref[2 * P - 1 - rank], "slot1")


# ----------------------------------------------------------------------------- agreement


def case_program_mismatch(rank: int, world: int) -> None:
    """Ranks whose programs differ (method, rank mapping, p2p shapes) get the same ValueError
    naming the difference, before any message; a consistent step afterwards works."""
    from deeppar.pipeline import PipelineRuntime

    stages = make_model(2 * world)
    local = [stages[rank], stages[2 * world - 1 - rank]]
    n = 2 * world
    x, y = make_data(n)
    inp, lab = (x, y) if rank == 0 else (None, None)
    method = "zbv" if rank == 0 else "dualpipev"
    pipe = PipelineRuntime(local, method=method)
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,)),
                 "ranks disagree on method", "'zbv'", "'dualpipev'", "schedule hash")
    # rank 1 maps itself to pipeline rank 0 too: both take the inputs of rank 0
    mapping = list(range(world)) if rank != 1 else [1, 0] + list(range(2, world))
    pipe = PipelineRuntime(local, method="dualpipev", rank_mapping=mapping)
    expect_error(lambda: pipe.step(x if pipe.rank == 0 else None, num_chunks=n,
                                   criterion=criterion, labels=(y if pipe.rank == 0 else None,)),
                 "ranks disagree on rank_mapping", "group rank 1 (pipeline rank 0)")
    shapes = [(MB, HIDDEN)] if rank == 0 else [(MB, 2 * HIDDEN)]
    pipe = PipelineRuntime(local, method="dualpipev", p2p_shapes=shapes)
    expect_error(lambda: pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,)),
                 "ranks disagree on p2p_shapes")
    # every argument agreed once is not re-gathered; a change on one rank is seen by all
    pipe = PipelineRuntime(local, method="dualpipev")
    checks = []
    for n_step, rows in ((n, n * MB), (n, n * MB), (n, 2 * n * MB), (n, 2 * n * MB)):
        xs, ys = make_data(rows // MB)
        before = pipe.full_agreements
        pipe.step(xs if rank == 0 else None, num_chunks=n_step, criterion=criterion,
                  labels=(ys if rank == 0 else None,))
        checks.append(pipe.full_agreements - before)
    assert checks == [1, 0, 1, 0], checks
    # after the cached agreement, a bad argument on one rank still fails on every rank
    expect_error(lambda: pipe.step(x if rank == 0 else x[:1], num_chunks=n,
                                   criterion=criterion, labels=(lab,)), "inputs")
    expect_error(lambda: pipe.step(inp, num_chunks=n + (rank == world - 1),
                                   criterion=criterion, labels=(lab,)),
                 "ranks disagree on num_chunks")
    pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))


# ----------------------------------------------------------------------------- failures


class FailAt(nn.Module):
    """Wraps a stage; on ``rank`` its ``at``-th forward (or backward) call raises."""

    def __init__(self, inner: nn.Module, fail: bool, at: int, backward: bool) -> None:
        super().__init__()
        self.inner, self.fail, self.at, self.backward = inner, fail, at, backward
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail and self.calls == self.at:
            if not self.backward:
                raise RuntimeError(f"stage failed at forward call {self.at}")
            x = _RaiseInBackward.apply(x)
        return self.inner(x)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        raise RuntimeError("stage failed in backward")


FAIL_BOUND_S = 10.0


def _one_failure(rank: int, world: int, failing: int, at: int, backward: bool,
                 good_steps: int, **pipe_kw) -> None:
    import time

    from deeppar.pipeline import DualPipeV
    from deeppar.pipeline.coordination import PipelineFailure

    stages = make_model(2 * world)
    local = [FailAt(stages[rank], False, 0, False),
             FailAt(stages[2 * world - 1 - rank], False, 0, False)]
    pipe = DualPipeV(tuple(local), **pipe_kw)
    n = 2 * world + 1
    x, y = make_data(n)
    inp, lab = (x, y) if rank == 0 else (None, None)
    for _ in range(good_steps):
        pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))
    if rank == failing:
        local[1].fail, local[1].at, local[1].backward = True, local[1].calls + at, backward
    t0 = time.monotonic()
    err: BaseException | None = None
    for _ in range(2):  # a rank whose step ended before the failure fails on the next one
        try:
            pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))
        except Exception as e:  # noqa: BLE001
            err = e
            break
    elapsed = time.monotonic() - t0
    assert err is not None, "no rank error after a failing step"
    assert elapsed < FAIL_BOUND_S, f"failed after {elapsed:.1f}s"
    what = "in backward" if backward else "at forward call"
    if rank == failing:
        assert type(err) is RuntimeError and f"stage failed {what}" in str(err), repr(err)
    else:
        assert isinstance(err, PipelineFailure), repr(err)
        assert f"on rank {failing}: RuntimeError: stage failed {what}" in str(err), str(err)
    # the pipeline stays failed; the process group stays usable
    try:
        pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))
    except PipelineFailure as e:
        assert f"rank {failing}" in str(e)
    else:
        raise AssertionError("a failed pipeline stepped again")
    dist.barrier()


def case_failure_headers(rank: int, world: int) -> None:
    """First step (shapes in headers): the last rank's second stage raises in a forward."""
    _one_failure(rank, world, world - 1, 2, False, good_steps=0)


def case_failure_cached_shapes(rank: int, world: int) -> None:
    """Shapes agreed on an earlier step (no headers): rank 0 raises in a backward."""
    _one_failure(rank, world, 0, 2, True, good_steps=1)


def case_failure_fixed_shapes(rank: int, world: int) -> None:
    """Fixed p2p shapes: a middle rank raises at its third forward."""
    _one_failure(rank, world, world // 2, 3, False, good_steps=0, p2p_shapes=[(MB, HIDDEN)])


# ----------------------------------------------------------------------------- profiling


def case_profiled_step(rank: int, world: int) -> None:
    """A pipeline step captured with deeppar.profiling shows its steps as named phases (the
    innermost annotation ranges the trace analysis reports): F, I, W and overlapped pairs."""
    import tempfile

    from deeppar.pipeline import DualPipeV, defer_weight_grads
    from deeppar.profiling import capture

    stages = make_model(2 * world)
    local = [defer_weight_grads(stages[rank]), defer_weight_grads(stages[2 * world - 1 - rank])]
    pipe = DualPipeV(tuple(local))
    n = 2 * world + 2
    x, y = make_data(n)
    inp, lab = (x, y) if rank == 0 else (None, None)
    sched = pipe.schedule(n)
    with tempfile.TemporaryDirectory() as tmp:
        with capture(os.path.join(tmp, f"rank{rank}.json"), steps=1, warmup=1) as cap:
            for _ in range(cap.total_steps):
                pipe.step(inp, num_chunks=n, criterion=criterion, labels=(lab,))
                cap.step()
        names = [p.name for r in cap.report.ranks for p in r.phases]
    kinds = ["FB" if len(s.actions) == 2 else s.kind.value for s in sched.steps[rank]]
    want = {f"pipeline.{k}": kinds.count(k) for k in set(kinds)}
    got = {k: names.count(k) for k in want}
    assert got == want, (got, want)
    assert {"pipeline.F", "pipeline.I", "pipeline.W", "pipeline.FB"} <= set(want)
