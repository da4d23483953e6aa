"""Deferred weight gradients ("zero bubble"): a per-pipeline store of closures and a ``Linear``
whose backward computes only the input gradient and queues its weight-gradient work there.

A backward that runs with its store *enabled* (an ``I`` action of the schedule) puts the
weight-gradient closures it meets into the store's cache; the runtime then ``flush``-es the cache
as one group, and a later ``W`` action ``pop``-s and runs the oldest group (FIFO). With the store
disabled (a full ``B``), the same code computes the weight gradient at once.

:func:`defer_weight_grads` swaps every ``nn.Linear`` of a model for :class:`DeferredLinear`
(sharing its parameters), so ordinary models need no custom autograd function for W slots of a
schedule to do real work. The pipeline binds its own store to the swapped layers, so two
pipelines in one process never share one.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightGradStore:
    """FIFO of groups of weight-gradient closures, owned by one pipeline instance.

    ``put`` adds a closure to the current group (or runs it at once when disabled), ``flush``
    closes the group, ``pop`` runs the oldest group. Counters let tests check that deferred work
    really happened: ``deferred`` closures queued, ``executed`` closures run from the queue.

    ``capture`` says whether forwards now record the deferrable graph (:class:`DeferredLinear`
    through its autograd function); otherwise they run the plain op, whose backward computes
    the weight gradient at once. True by default; the runtime turns it on only for the forwards
    whose backward a schedule runs as an ``I`` (see :meth:`capturing`), so the other backwards
    run the native kernels without Python closures.
    """

    def __init__(self) -> None:
        self.enabled: bool = False
        self.capture: bool = True
        self.cache: list[Callable[[], None]] = []
        self.queue: deque[tuple[Hashable, list[Callable[[], None]]]] = deque()
        self.deferred: int = 0
        self.executed: int = 0

    def put(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` in the current group if enabled, otherwise run it now."""
        if not callable(fn):
            raise TypeError(f"WeightGradStore.put expects a callable, got {type(fn).__name__}")
        if self.enabled:
            self.cache.append(fn)
            self.deferred += 1
        else:
            fn()

    def flush(self, key: Hashable = None) -> None:
        """Close the current group (possibly empty) so that one later ``pop`` runs it; ``key``
        names the group (the runtime uses the (stage, micro-batch) of the backward)."""
        self.queue.append((key, self.cache))
        self.cache = []

    def pop(self, key: Hashable = None) -> None:
        """Run the group named ``key``, or the oldest group (FIFO) when ``key`` is None."""
        if not self.queue:
            raise RuntimeError("WeightGradStore.pop: no deferred weight-gradient group is queued")
        if key is None:
            _, funcs = self.queue.popleft()
        else:
            for i, (k, group) in enumerate(self.queue):
                if k == key:
                    funcs = group
                    del self.queue[i]
                    break
            else:
                raise RuntimeError(f"WeightGradStore.pop: no group queued for {key!r}")
        for fn in funcs:
            fn()
            self.executed += 1

    @contextlib.contextmanager
    def capturing(self, flag: bool) -> Iterator[None]:
        """Set :attr:`capture` to ``flag`` inside the block."""
        before, self.capture = self.capture, flag
        try:
            yield
        finally:
            self.capture = before

    def clear(self) -> None:
        """Drop everything queued (the counters stay)."""
        self.enabled = False
        self.cache = []
        self.queue.clear()

    def empty(self) -> bool:
        """True when no group waits and the current group is empty."""
        return not self.queue and not self.cache

    def __len__(self) -> int:
        return len(self.queue)


#: stores of the steps running in this thread / async context, innermost last. A context
#: variable, so pipelines stepping in different threads never see each other's store.
_ACTIVE: contextvars.ContextVar[tuple[WeightGradStore, ...]] = contextvars.ContextVar(
    "deeppar_active_weight_grad_stores", default=())


class _EngineThreadStores:
    """The stores inside a step, in any thread: the one piece of process-wide state, read only
    from threads Python did not start (the autograd engine's device threads run GPU backwards
    and do not inherit the caller's context variables, so a closure queued there by an unbound
    layer or by DeepSeek's class-level store has no other way to find its pipeline)."""

    def __init__(self) -> None:
        self._stores: list[WeightGradStore] = []
        self._lock = threading.Lock()

    def add(self, store: WeightGradStore) -> None:
        with self._lock:
            self._stores.append(store)

    def remove(self, store: WeightGradStore) -> None:
        with self._lock:
            self._stores.remove(store)

    def only(self) -> WeightGradStore | None:
        """The single store inside a step, None when there are none or several."""
        with self._lock:
            return self._stores[0] if len(self._stores) == 1 else None


_ENGINE_THREAD_STORES = _EngineThreadStores()


def _started_by_python() -> bool:
    # threading gives threads it did not start a placeholder object ("dummy" thread)
    return not isinstance(threading.current_thread(), threading._DummyThread)


def active_store() -> WeightGradStore | None:
    """The store of the pipeline inside ``step`` in this thread (innermost), if any. Used by
    layers not bound to a pipeline and by the drop-in class-level ``WeightGradStore``.

    The autograd engine runs the backward of GPU tensors on its own threads, which do not
    inherit the caller's context; there (threads not started by Python) the store is the one
    live store of the process, and None when several pipelines are inside a step at once, so
    that unbound layers then compute their weight gradients at once rather than risk queueing
    them in another pipeline's store.
    """
    stack = _ACTIVE.get()
    if stack:
        return stack[-1]
    if not _started_by_python():
        return _ENGINE_THREAD_STORES.only()
    return None


class activate:
    """Context manager making ``store`` the :func:`active_store` of this thread while a step
    runs."""

    def __init__(self, store: WeightGradStore) -> None:
        self.store = store
        self._token: contextvars.Token | None = None

    def __enter__(self) -> WeightGradStore:
        self._token = _ACTIVE.set(_ACTIVE.get() + (self.store,))
        _ENGINE_THREAD_STORES.add(self.store)
        return self.store

    def __exit__(self, *exc: object) -> None:
        _ENGINE_THREAD_STORES.remove(self.store)
        if self._token is not None:
            _ACTIVE.reset(self._token)
            self._token = None


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


class _DeferredLinearFn(torch.autograd.Function):
    """``y = x W^T + b`` whose backward returns dx and hands dW, db to the layer's store."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        layer: DeferredLinear = ctx.layer
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        w_param, b_param = layer.weight, layer.bias

        def weight_grad() -> None:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            if w_param.requires_grad:
                x2 = x.reshape(-1, x.shape[-1])
                if w_param.grad is None:
                    w_param.grad = g2.t() @ x2
                else:  # accumulate inside the GEMM: no temporary of the weight's size
                    w_param.grad.addmm_(g2.t(), x2)
            if b_param is not None and b_param.requires_grad:
                _accumulate(b_param, g2.sum(0))

        store = layer.weight_grad_store
        if store is None:
            store = active_store()
        if store is None:
            weight_grad()
        else:
            store.put(weight_grad)
        return grad_x, None, None, None


class DeferredLinear(nn.Linear):
    """``nn.Linear`` whose weight gradient can be deferred to a :class:`WeightGradStore`.

    The gradient of ``weight``/``bias`` is accumulated into ``.grad`` by the closure (when the
    store is enabled: later, at a ``W``; otherwise during the backward), never by autograd, so
    hooks on those parameters do not fire.
    """

    weight_grad_store: WeightGradStore | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.weight_grad_store
        if store is None:
            store = active_store()
        if not torch.is_grad_enabled() or (store is not None and not store.capture) or not (
            self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            # no W slot will run this backward: the native op computes dW in the backward
            return F.linear(x, self.weight, self.bias)
        # weight and bias are passed so that autograd reaches this node; the closure, not
        # autograd, accumulates their gradients (the function returns None for them).
        return _DeferredLinearFn.apply(x, self.weight, self.bias, self)


def defer_weight_grads(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``module`` (in place; ``module`` itself too when it is
    one) by a :class:`DeferredLinear` sharing the same parameters. Returns the module."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"defer_weight_grads expects an nn.Module, got {type(module).__name__}")
    if type(module) is nn.Linear:
        return _convert(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, _convert(child))
        else:
            defer_weight_grads(child)
    return module


def _convert(lin: nn.Linear) -> DeferredLinear:
    new = DeferredLinear.__new__(DeferredLinear)
    nn.Module.__init__(new)
    new.in_features, new.out_features = lin.in_features, lin.out_features
    new.weight = lin.weight
    new.bias = lin.bias
    for name, hook in lin._forward_hooks.items():
        new._forward_hooks[name] = hook
    new.train(lin.training)
    return new


def bind_store(modules: list[nn.Module], store: WeightGradStore) -> int:
    """Point every :class:`DeferredLinear` in ``modules`` at ``store``; returns how many."""
    n = 0
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, DeferredLinear):
                sub.weight_grad_store = store
                n += 1
    return n


__all__ = [
    "DeferredLinear",
    "WeightGradStore",
    "activate",
    "active_store",
    "bind_store",
    "defer_weight_grads",
]
