"""Drop-in replacement for DeepSeek's ``dualpipe`` package.

Change ``from dualpipe import ...`` to ``from deeppar.dualpipe import ...`` (and
``dualpipe.utils`` to ``deeppar.dualpipe.utils``) and the published examples run unchanged, on
NCCL or on gloo. Differences: ``set_p2p_tensor_shapes``/``set_p2p_tensor_dtype`` are optional
(without them each message carries its shapes), ``None`` resets them, and they are read when a
pipeline of this module is created: they apply to the ``DualPipe``/``DualPipeV`` of this
module created afterwards (DeepSeek's examples set them first), never to pipelines created
earlier nor to ``deeppar.pipeline.DualPipe``, which takes shapes per instance instead.
``step``'s ``labels`` defaults to none, as in DeepSeek (the criterion is then called as
``criterion(*outputs)``). Remaining difference: every micro-batch must have the same size (a
batch that ``num_chunks`` does not divide is a ``ValueError`` on every rank), where DeepSeek's
``scatter`` cuts uneven micro-batches with ``tensor_split``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deeppar.pipeline import runtime as _runtime

from .utils import WeightGradStore, run_backward

#: DeepSeek's module-level p2p settings (global by design of that API); read only when a
#: pipeline of this module is created
_P2P: dict[str, Any] = {"shapes": None, "dtype": None}


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]] | None) -> None:
    """Shapes of the tensors every pipeline message carries (as in DeepSeek's ``dualpipe``),
    for the pipelines of this module created from now on; ``None`` goes back to shapes sent
    in message headers."""
    if shapes is None:
        _P2P["shapes"] = None
        return
    _P2P["shapes"] = _runtime.check_p2p_shapes(shapes, "shapes")


def set_p2p_tensor_dtype(dtype: torch.dtype | None) -> None:
    """Dtype of the tensors every pipeline message carries (default float32), for the
    pipelines of this module created from now on; ``None`` resets it."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    _P2P["dtype"] = dtype


def _with_global_p2p(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` plus the module-level p2p settings, unless the caller gave shapes."""
    if kwargs.get("p2p_shapes") is None and _P2P["shapes"] is not None:
        kwargs = dict(kwargs, p2p_shapes=list(_P2P["shapes"]),
                      p2p_dtype=kwargs.get("p2p_dtype") or _P2P["dtype"] or torch.float32)
    return kwargs


class _DeepSeekSignatures:
    """DeepSeek's constructor and ``step`` signatures over a deeppar pipeline class."""

    def __init__(self, modules: Any, batch_dim: int = 0, process_group: Any = None,
                 rank_mapping: Any = None, **kwargs: Any) -> None:
        super().__init__(modules, batch_dim, process_group, rank_mapping,  # type: ignore[call-arg]
                         **_with_global_p2p(kwargs))

    def step(self, *inputs: Any, num_chunks: int = 0, criterion: Any = None,
             labels: Any = (), return_outputs: bool = False) -> Any:
        """As DeepSeek's: ``labels`` defaults to none (``criterion(*outputs)``)."""
        return super().step(*inputs, num_chunks=num_chunks,  # type: ignore[misc]
                            criterion=criterion, labels=labels, return_outputs=return_outputs)


class DualPipe(_DeepSeekSignatures, _runtime.DualPipe):
    """``dualpipe.DualPipe(modules, batch_dim=0, process_group=None, rank_mapping=None)``."""


class DualPipeV(_DeepSeekSignatures, _runtime.DualPipeV):
    """``dualpipe.DualPipeV(modules, batch_dim=0, process_group=None, rank_mapping=None)``."""


__all__ = [
    "DualPipe",
    "DualPipeV",
    "WeightGradStore",
    "run_backward",
    "set_p2p_tensor_dtype",
    "set_p2p_tensor_shapes",
]
