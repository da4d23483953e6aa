"""Drop-in ``dualpipe.utils``: a class-level ``WeightGradStore`` and ``run_backward``.

DeepSeek's examples write their own autograd functions that test ``WeightGradStore.enabled`` and
call ``WeightGradStore.put(closure)`` on the class. Here the class holds no state: every access
is routed to the per-instance store of the pipeline currently running ``step`` (so two pipelines
in one process keep separate queues). Outside a step, ``enabled`` is False and ``put`` runs the
closure at once.
"""

from __future__ import annotations

from collections.abc import Callable

from deeppar.pipeline.overlap import run_backward
from deeppar.pipeline.weight_grad import WeightGradStore as _Store
from deeppar.pipeline.weight_grad import active_store


class _QueueView:
    """What ``WeightGradStore.funcs_queue`` offers: ``empty()`` and ``qsize()``."""

    def __init__(self, store: _Store | None) -> None:
        self._store = store

    def empty(self) -> bool:
        return self._store is None or not self._store.queue

    def qsize(self) -> int:
        return 0 if self._store is None else len(self._store.queue)


class _Routed(type):
    @property
    def enabled(cls) -> bool:
        store = active_store()
        return bool(store is not None and store.enabled)

    @enabled.setter
    def enabled(cls, value: bool) -> None:
        store = active_store()
        if store is not None:
            store.enabled = bool(value)
        elif value:
            raise RuntimeError("WeightGradStore.enabled can only be set while a pipeline step "
                               "runs")

    @property
    def funcs_queue(cls) -> _QueueView:
        return _QueueView(active_store())

    @property
    def cache(cls) -> list[Callable[[], None]]:
        store = active_store()
        return [] if store is None else store.cache


class WeightGradStore(metaclass=_Routed):
    """Class-level facade over the running pipeline's :class:`deeppar.pipeline.weight_grad.
    WeightGradStore` (``put``, ``flush``, ``pop``, ``clear``, ``enabled``, ``funcs_queue``)."""

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        store = active_store()
        if store is None:
            func()
        else:
            store.put(func)

    @classmethod
    def flush(cls) -> None:
        store = active_store()
        if store is not None:
            store.flush()

    @classmethod
    def pop(cls) -> None:
        store = active_store()
        if store is None:
            raise RuntimeError("WeightGradStore.pop: no pipeline step is running")
        store.pop()

    @classmethod
    def clear(cls) -> None:
        store = active_store()
        if store is not None:
            store.clear()


__all__ = ["WeightGradStore", "run_backward"]
