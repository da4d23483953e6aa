"""Drop-in replacement for DeepSeek's ``dualpipe`` package.

Change ``from dualpipe import ...`` to ``from deeppar.dualpipe import ...`` (and
``dualpipe.utils`` to ``deeppar.dualpipe.utils``) and the published examples run unchanged, on
NCCL or on gloo. Differences: ``set_p2p_tensor_shapes``/``set_p2p_tensor_dtype`` are optional
(without them each message carries its shapes) and apply to the pipelines of this compatibility
module only; ``deeppar.pipeline.DualPipe`` takes shapes per instance instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deeppar.pipeline import runtime as _runtime

from .utils import WeightGradStore, run_backward

_P2P: dict[str, Any] = {"shapes": None, "dtype": None}


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]]) -> None:
    """Shapes of the tensors every pipeline message carries (as in DeepSeek's ``dualpipe``)."""
    if not isinstance(shapes, (list, tuple)) or not all(
            isinstance(s, (list, tuple, torch.Size)) for s in shapes):
        raise TypeError("shapes must be a list of shapes, e.g. [(batch, seq, hidden)]")
    _P2P["shapes"] = [tuple(int(d) for d in s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Dtype of the tensors every pipeline message carries."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    _P2P["dtype"] = dtype


class _CompatMixin:
    def step(self, *inputs: Any, num_chunks: int = 0, criterion: Any = None,
             labels: Sequence[Any] = (), return_outputs: bool = False) -> Any:
        if _P2P["shapes"] is not None and not getattr(self, "_own_shapes", False):
            self.p2p_shapes = _P2P["shapes"]
            self.p2p_dtype = _P2P["dtype"] or torch.float32
        return super().step(*inputs, num_chunks=num_chunks,  # type: ignore[misc]
                            criterion=criterion, labels=labels, return_outputs=return_outputs)


class DualPipe(_CompatMixin, _runtime.DualPipe):
    """``dualpipe.DualPipe(modules, batch_dim=0, process_group=None, rank_mapping=None)``."""

    def __init__(self, modules: Any, batch_dim: int = 0, process_group: Any = None,
                 rank_mapping: Any = None, **kwargs: Any) -> None:
        super().__init__(modules, batch_dim, process_group, rank_mapping, **kwargs)
        self._own_shapes = kwargs.get("p2p_shapes") is not None


class DualPipeV(_CompatMixin, _runtime.DualPipeV):
    """``dualpipe.DualPipeV(modules, batch_dim=0, process_group=None, rank_mapping=None)``."""

    def __init__(self, modules: Any, batch_dim: int = 0, process_group: Any = None,
                 rank_mapping: Any = None, **kwargs: Any) -> None:
        super().__init__(modules, batch_dim, process_group, rank_mapping, **kwargs)
        self._own_shapes = kwargs.get("p2p_shapes") is not None


__all__ = [
    "DualPipe",
    "DualPipeV",
    "WeightGradStore",
    "run_backward",
    "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes",
]
