"""Single-process parts of the pipeline runtime: the weight-gradient store, the deferrable
Linear, message headers, the drop-in class-level store."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from deeppar.pipeline.comm import decode_header, encode_header
from deeppar.pipeline.overlap import has_overlap_hook
from deeppar.pipeline.weight_grad import (
    DeferredLinear,
    WeightGradStore,
    activate,
    bind_store,
    defer_weight_grads,
)


def test_store_fifo_and_keyed_pop() -> None:
    st = WeightGradStore()
    ran: list[str] = []
    st.enabled = True
    st.put(lambda: ran.append("a"))
    st.flush("ka")
    st.put(lambda: ran.append("b"))
    st.flush("kb")
    st.enabled = False
    assert ran == [] and st.deferred == 2 and len(st) == 2
    st.pop("kb")
    assert ran == ["b"]
    st.pop()
    assert ran == ["b", "a"] and st.executed == 2 and st.empty()
    with pytest.raises(RuntimeError, match="no deferred"):
        st.pop()
    st.put(lambda: ran.append("now"))  # disabled: runs at once
    assert ran[-1] == "now"
    with pytest.raises(TypeError):
        st.put(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("bias", [True, False])
def test_deferred_linear_matches_linear(bias: bool) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3, bias=bias))
    model = defer_weight_grads(copy.deepcopy(ref))
    assert all(isinstance(m, DeferredLinear) for m in (model[0], model[2]))
    x = torch.randn(4, 2, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    ref(x).square().sum().backward()
    st = WeightGradStore()
    assert bind_store([model], st) == 2
    out = model(x2)
    assert torch.equal(out, ref(x.detach()))  # the forward is the same F.linear
    st.enabled = True
    out.square().sum().backward()
    st.enabled = False
    st.flush()
    assert st.deferred == 2
    assert all(p.grad is None for p in model.parameters())  # deferred: nothing yet
    torch.testing.assert_close(x2.grad, x.grad)  # the input gradient is there already
    st.pop()
    assert st.executed == 2
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_defer_weight_grads_shares_parameters() -> None:
    lin = nn.Linear(3, 3)
    new = defer_weight_grads(lin)
    assert isinstance(new, DeferredLinear) and new.weight is lin.weight and new.bias is lin.bias
    with pytest.raises(TypeError):
        defer_weight_grads("not a module")  # type: ignore[arg-type]


def test_unbound_deferred_linear_uses_active_store() -> None:
    layer = defer_weight_grads(nn.Linear(3, 2))
    st = WeightGradStore()
    with activate(st):
        st.enabled = True
        layer(torch.randn(4, 3)).sum().backward()
        st.enabled = False
        st.flush()
    assert st.deferred == 1 and layer.weight.grad is None
    st.pop()
    assert layer.weight.grad is not None


def test_header_roundtrip() -> None:
    a = torch.randn(2, 3, requires_grad=True)
    b = torch.zeros(4, dtype=torch.int64)
    h = encode_header([a, None, b], max_tensors=4, device=torch.device("cpu"))
    metas = decode_header(h)
    assert metas[1] is None
    assert metas[0].shape == (2, 3) and metas[0].dtype == torch.float32 and metas[0].requires_grad
    assert metas[2].shape == (4,) and metas[2].dtype == torch.int64 and not metas[2].requires_grad
    with pytest.raises(ValueError, match="max_tensors"):
        encode_header([a] * 5, max_tensors=4, device=torch.device("cpu"))


def test_compat_store_outside_a_step() -> None:
    from deeppar.dualpipe.utils import WeightGradStore as Compat

    assert Compat.enabled is False
    ran = []
    Compat.put(lambda: ran.append(1))
    assert ran == [1] and Compat.funcs_queue.empty()
    st = WeightGradStore()
    with activate(st):
        Compat.enabled = True
        assert st.enabled and Compat.enabled
        Compat.put(lambda: ran.append(2))
        Compat.flush()
        Compat.enabled = False
        assert Compat.funcs_queue.qsize() == 1 and ran == [1]
        Compat.pop()
    assert ran == [1, 2]


def test_overlap_hook_detection() -> None:
    class A(nn.Module):
        @classmethod
        def overlapped_forward_backward(cls, *args):  # pragma: no cover - not called
            raise NotImplementedError

    assert has_overlap_hook([A(), A()])
    assert not has_overlap_hook([A(), nn.Linear(1, 1)])
    assert not has_overlap_hook([nn.Linear(1, 1), nn.Linear(1, 1)])


def test_runtime_needs_distributed() -> None:
    from deeppar.pipeline import DualPipe

    if torch.distributed.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        DualPipe((nn.Linear(2, 2), nn.Linear(2, 2)))


def test_active_store_is_per_thread() -> None:
    """Two pipelines stepping in different threads each see their own store; a thread outside
    any step sees none, even while the others are inside theirs."""
    import threading

    from deeppar.dualpipe.utils import WeightGradStore as Compat
    from deeppar.pipeline.weight_grad import active_store

    stores = [WeightGradStore(), WeightGradStore()]
    inside = threading.Barrier(3)
    done = threading.Barrier(3)
    seen: dict[str, object] = {}

    def pipeline(i: int) -> None:
        with activate(stores[i]):
            Compat.enabled = True
            inside.wait(timeout=10)
            Compat.put(lambda: None)  # queued in this thread's store only
            Compat.flush()
            seen[f"store{i}"] = active_store()
            seen[f"enabled{i}"] = Compat.enabled
            done.wait(timeout=10)
            Compat.enabled = False

    def outsider() -> None:
        inside.wait(timeout=10)
        seen["outsider"] = active_store()
        seen["outsider_enabled"] = Compat.enabled
        done.wait(timeout=10)

    threads = [threading.Thread(target=pipeline, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=outsider))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert seen["store0"] is stores[0] and seen["store1"] is stores[1]
    assert seen["enabled0"] is True and seen["enabled1"] is True
    assert seen["outsider"] is None and seen["outsider_enabled"] is False
    assert stores[0].deferred == 1 and stores[1].deferred == 1
    assert len(stores[0]) == 1 and len(stores[1]) == 1
    assert active_store() is None


def test_active_store_in_engine_threads() -> None:
    """Threads not started by Python (the autograd engine's, for GPU backwards) find the one
    live store; with two live stores they get none rather than a wrong one."""
    import _thread
    import threading

    from deeppar.pipeline.weight_grad import active_store

    def from_foreign_thread() -> object:
        out: list[object] = []
        ready = threading.Event()

        def run() -> None:
            out.append(active_store())
            ready.set()

        _thread.start_new_thread(run, ())
        assert ready.wait(timeout=10)
        return out[0]

    a, b = WeightGradStore(), WeightGradStore()
    with activate(a):
        assert from_foreign_thread() is a
        with activate(b):
            assert active_store() is b
            assert from_foreign_thread() is None
        assert active_store() is a
    assert from_foreign_thread() is None


class _FailingBackward(torch.autograd.Function):
    """Identity whose backward raises (after the layers behind it deferred their work)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        raise RuntimeError("backward failed")


class _FailStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(_FailingBackward.apply(x))


def _single_rank_group():
    """A one-process gloo group for runtime tests that need no peer."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, timeout=timedelta(seconds=30))
    return dist


def test_failed_step_drops_deferred_weight_grads() -> None:
    """A step that raises leaves no deferred closure (and the activations it holds) behind."""
    from deeppar.pipeline import PipelineRuntime

    dist = _single_rank_group()
    try:
        stage = defer_weight_grads(nn.Sequential(nn.Linear(4, 4), _FailStage()))
        pipe = PipelineRuntime([stage], method="zb1p")
        x, y = torch.randn(4, 4), torch.randn(4, 4)
        with pytest.raises(RuntimeError, match="backward failed"):
            pipe.step(x, num_chunks=2, criterion=nn.functional.mse_loss, labels=(y,))
        st = pipe.weight_grad_store
        assert st.deferred > st.executed, "the test needs a closure deferred before the error"
        assert st.empty() and not st.enabled
    finally:
        dist.destroy_process_group()


def test_nccl_needs_the_current_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With NCCL the stages' device must be the current CUDA device (checked at construction,
    here with the backend and the current device faked on a one-process gloo group)."""
    from deeppar.pipeline import DualPipeV

    dist = _single_rank_group()
    try:
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        stages = (nn.Linear(4, 4), nn.Linear(4, 4))
        with pytest.raises(ValueError, match="current CUDA device cuda:1"):
            DualPipeV(stages, device="cuda:0")
        with pytest.raises(ValueError, match="CUDA device"):
            DualPipeV(stages, device="cpu")
        assert DualPipeV(stages, device="cuda").device == torch.device("cuda", 1)
        assert DualPipeV(stages, device="cuda:1").device == torch.device("cuda", 1)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def test_compat_batch_helpers() -> None:
    """``dualpipe.utils`` batch helpers: exact chunk counts (uneven splits too), None inputs,
    and gather inverting scatter."""
    from deeppar.dualpipe.utils import cat_tensor, chunk_tensor, gather, scatter

    x, y = torch.arange(10.0).view(5, 2), torch.arange(5)
    mbs = scatter((x, None, y), 3, 0)
    assert len(mbs) == 3 and [m[0].shape[0] for m in mbs] == [2, 2, 1]
    assert all(m[1] is None for m in mbs)
    assert scatter([], 4, 0) == [(), (), (), ()]
    assert chunk_tensor(None, 2, 0) == [None, None]
    back = gather([(m[0], m[2]) for m in mbs], 0)
    assert torch.equal(back[0], x) and torch.equal(back[1], y)
    assert torch.equal(gather([m[0] for m in mbs], 0)[0], x)
    assert cat_tensor([None, None], 0) is None and cat_tensor([x], 0) is x


def test_batched_p2p_works_are_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    """One work per op, or one for the whole batch standing for each op; anything else (no
    work at all) is an error instead of a step that silently skips waiting."""
    import deeppar.pipeline.comm as comm_mod
    from deeppar.pipeline.comm import P2PComm

    comm = P2PComm(None, [0, 1], 0, torch.device("cpu"), {}, [])
    ops = [object(), object()]
    monkeypatch.setattr(comm_mod.dist, "batch_isend_irecv", lambda ops: ["a", "b"])
    assert comm._issue(ops) == ["a", "b"]
    monkeypatch.setattr(comm_mod.dist, "batch_isend_irecv", lambda ops: ["whole"])
    assert comm._issue(ops) == ["whole", "whole"]
    for works in ([], None, ["a", "b", "c"]):
        monkeypatch.setattr(comm_mod.dist, "batch_isend_irecv", lambda ops, w=works: w)
        with pytest.raises(RuntimeError, match="works for 2 operations"):
            comm._issue(ops)


def test_channel_cursor_and_walk() -> None:
    from deeppar.pipeline.walk import ChannelCursor, walk

    channels = {(0, 1): ["a", "b", "c"], (1, 0): ["x"], (2, 1): ["p"]}
    out = ChannelCursor(channels, 0, "send")
    assert out.take(1, "b") is None and out.take(1, "a") == 0 and out.take(1, "b") == 1
    inc = ChannelCursor(channels, 1, "recv")
    assert inc.through(0, "b", lambda k: False) == ["a", "b"]
    assert inc.through(0, "b", lambda k: True) == []
    assert inc.through(2, "p", lambda k: False) == ["p"]
    # rank 1 needs rank 0's second step; rank 0 moves one step per round
    pos = [0, 0]

    def advance(r: int) -> bool:
        if pos[r] >= 2 or (r == 1 and pos[0] < 2):
            return False
        pos[r] += 1
        return True

    rounds: list[list[int]] = []
    walk(2, advance, per_round=1, end_round=lambda: rounds.append(list(pos)) is not None)
    assert pos == [2, 2] and rounds[:3] == [[1, 0], [2, 1], [2, 2]]
