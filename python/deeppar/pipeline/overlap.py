"""The overlapped forward-backward hook (DualPipe's ``F&B``) and a backward helper.

A stage class may define ``overlapped_forward_backward`` as a classmethod with DeepSeek's
signature::

    outputs0, loss0 = cls.overlapped_forward_backward(
        module0, inputs0, criterion0, labels0,      # forward of one micro-batch
        module1, loss1, outputs1, output_grads1)    # backward of another

It must run ``module0(*inputs0)`` (and ``criterion0(*outputs0, *labels0)`` when ``criterion0`` is
not None), and the backward of ``loss1`` (when not None) or of ``outputs1`` with
``output_grads1``, interleaving the two as it likes. The runtime calls it for every overlapped
pair when both local stages are of the same class and that class defines the hook. Otherwise,
when every local stage declares its sub-steps (:mod:`.substeps`), the pair runs on the built-in
fused engine (:class:`~.fused.FusedEngine`); otherwise the runtime runs the forward, then the
backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.autograd import Variable

HOOK = "overlapped_forward_backward"


def has_overlap_hook(modules: Sequence[nn.Module]) -> bool:
    """True when all local stages share one class that defines the hook."""
    types = {type(m) for m in modules}
    return len(modules) >= 1 and len(types) == 1 and callable(getattr(types.pop(), HOOK, None))


def can_overlap(modules: Sequence[nn.Module]) -> bool:
    """True when the runtime can overlap a pair of these stages: they share a class with the
    hook, or every one declares sub-steps for the fused engine. Declarations are checked here
    (when the pipeline is built, before any step): one that does not cover its layers raises
    ValueError."""
    from .substeps import declares_substeps, stage_substeps

    if has_overlap_hook(modules):
        return True
    declaring = [m for m in modules if declares_substeps(m)]
    for m in declaring:
        stage_substeps(m)
    return len(modules) >= 1 and len(declaring) == len(modules)


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Backward of ``tensors`` with ``grad_tensors``, accumulating into leaves' ``.grad``.
    Calls the autograd engine directly (as DeepSeek's ``run_backward`` does), without
    ``torch.autograd.backward``'s shape check: the runtime frees the storage of sent outputs,
    so ``tensors`` may be empty placeholders whose graph is intact."""
    tensors, grad_tensors = list(tensors), list(grad_tensors)
    if len(tensors) != len(grad_tensors):
        raise ValueError(f"run_backward: {len(tensors)} tensors but {len(grad_tensors)} grads")
    if tensors:
        Variable._execution_engine.run_backward(  # type: ignore[attr-defined]
            tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
            allow_unreachable=True, accumulate_grad=True)


def run_overlapped(module0: nn.Module, inputs0: Sequence[torch.Tensor],
                   criterion0: Callable | None, labels0: Sequence[torch.Tensor],
                   module1: nn.Module, loss1: torch.Tensor | None,
                   outputs1: Sequence[torch.Tensor], output_grads1: Sequence[torch.Tensor],
                   engine: Any = None, microbatches: tuple[int, int] = (0, 1),
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Call the class hook when the stages share a class defining it (it wins), else run the
    pair on the fused ``engine`` (a :class:`~.fused.FusedEngine`; a fresh one when None);
    normalise the forward outputs to a list. ``microbatches`` label the engine's timeline."""
    if not has_overlap_hook([module0, module1]):
        from .fused import FusedEngine

        eng = engine if engine is not None else FusedEngine(record_timeline=False)
        return eng.forward_backward(module0, list(inputs0), criterion0, list(labels0),
                                    module1, loss1, list(outputs1), list(output_grads1),
                                    microbatches)
    hook = getattr(type(module0), HOOK)
    outputs0, loss0 = hook(module0, list(inputs0), criterion0, list(labels0),
                           module1, loss1, list(outputs1), list(output_grads1))
    if isinstance(outputs0, torch.Tensor):
        outputs0 = [outputs0]
    return list(outputs0), loss0


__all__ = ["HOOK", "can_overlap", "has_overlap_hook", "run_backward", "run_overlapped"]
