"""Drop-in ``dualpipe.utils``: a class-level ``WeightGradStore``, ``run_backward`` and the batch
helpers ``chunk_tensor``, ``cat_tensor``, ``scatter``, ``gather``.

DeepSeek's examples write their own autograd functions that test ``WeightGradStore.enabled`` and
call ``WeightGradStore.put(closure)`` on the class. Here the class holds no state: every access
is routed to the per-instance store of the pipeline currently running ``step`` (so two pipelines
in one process keep separate queues). Outside a step, ``enabled`` is False and ``put`` runs the
closure at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

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


def chunk_tensor(x: torch.Tensor | None, chunks: int, dim: int) -> Sequence[Any]:
    """``x`` cut into exactly ``chunks`` parts along ``dim`` (``tensor_split``: the first parts
    get one more row when ``chunks`` does not divide); ``None`` gives ``chunks`` Nones."""
    if x is None:
        return [None] * chunks
    return x.tensor_split(chunks, dim=dim)


def cat_tensor(x: Sequence[Any], dim: int) -> Any:
    """Concatenate micro-batch parts along ``dim``; one part is returned as is, all-None parts
    give None."""
    if isinstance(x, (tuple, list)):
        if len(x) == 1:
            return x[0]
        if x[0] is None:
            if any(y is not None for y in x):
                raise ValueError("cat_tensor: parts mix None and tensors")
            return None
    return torch.cat(list(x), dim=dim)


def scatter(inputs: Any, chunks: int, dim: int) -> list[tuple[Any, ...]]:
    """Cut a tensor or a sequence of tensors (or Nones) into ``chunks`` micro-batches; each
    micro-batch is a tuple with one part per input (``()`` for no inputs)."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)) or not all(
            x is None or isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("scatter: inputs must be a tensor or a sequence of tensors/None")
    parts = [chunk_tensor(x, chunks, dim) for x in inputs]
    micro = list(zip(*parts))
    return micro if micro else [() for _ in range(chunks)]


def gather(micro_outputs: Sequence[Any], dim: int) -> tuple[Any, ...]:
    """Inverse of :func:`scatter`: per-micro-batch outputs (tensors or tuples) concatenated
    along ``dim``, one entry per output."""
    if not micro_outputs or not isinstance(micro_outputs[0], (torch.Tensor, tuple, list)):
        raise TypeError("gather: expects per-micro-batch tensors or tuples of tensors")
    if isinstance(micro_outputs[0], torch.Tensor):
        micro_outputs = [(x,) for x in micro_outputs]
    return tuple(cat_tensor(list(parts), dim=dim) for parts in zip(*micro_outputs))


__all__ = ["WeightGradStore", "cat_tensor", "chunk_tensor", "gather", "run_backward", "scatter"]
