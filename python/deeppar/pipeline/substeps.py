"""How a pipeline stage declares the sub-steps of its layers for the fused F&B engine.

A stage that wants its ``Overlap(F, B)`` pairs run by :mod:`deeppar.pipeline.fused` defines
``substeps(self) -> StageSubSteps``: its layers in order, each cut into ``attn`` (computation),
``dispatch`` (communication), ``mlp`` (computation), ``combine`` (communication) and an optional
``post`` (computation right after the combine's wait, e.g. un-permute and residual add).

Sub-steps exchange named tensors: a stage's inputs get the names ``StageSubSteps.inputs``, every
sub-step reads the names in its ``inputs`` and (re)binds the names in its ``outputs``, and the
stage returns the tensors named ``StageSubSteps.outputs``. A name that no sub-step of a layer
touches passes through (a residual, routing weights), and its gradient is added at the boundary.

This module imports no other part of deeppar, so model code (``deeppar.moe``) can declare
sub-steps without importing the pipeline runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

ATTN, DISPATCH, MLP, COMBINE, POST = "attn", "dispatch", "mlp", "combine", "post"
#: the sub-steps of every layer, in forward order (``post`` may follow ``combine``)
LAYER_ORDER = (ATTN, DISPATCH, MLP, COMBINE)
COMPUTE_STEPS = (ATTN, MLP, POST)
COMM_STEPS = (DISPATCH, COMBINE)
#: name of the method a stage defines to declare its sub-steps
DECLARE = "substeps"


class Transfer(Protocol):
    """An asynchronous transfer started by a communication sub-step."""

    def wait(self) -> Sequence[torch.Tensor | None]:
        """Block (CPU) or order the current stream (CUDA) until done; return the received
        tensors."""
        ...


@dataclass(frozen=True)
class Compute:
    """A computation sub-step: ``fn(*inputs) -> outputs`` (a tensor or a tuple of tensors).

    ``modules`` are the modules whose parameters ``fn`` uses; ``deferred`` those (a subset)
    whose weight gradients the engine computes in a separate W part after the sub-step's input
    gradient (B). ``fn`` must be deterministic: the engine runs it once per micro-batch.
    """

    name: str
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    modules: tuple[nn.Module, ...] = ()
    deferred: tuple[nn.Module, ...] = ()

    kind = "compute"


@dataclass(frozen=True)
class Comm:
    """A communication sub-step. ``start(*inputs)`` starts the transfer and returns a
    :class:`Transfer` whose ``wait()`` gives the ``outputs``; ``start_backward(transfer,
    *output_grads)`` starts the transposed transfer (gradients travel back) and returns a
    :class:`Transfer` whose ``wait()`` gives one gradient per input (None for inputs without
    one). ``transfer`` is the forward transfer, so its split sizes can be reused."""

    name: str
    start: Callable[..., Transfer]
    start_backward: Callable[..., Transfer]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    kind = "comm"


SubStep = Compute | Comm


@dataclass(frozen=True)
class LayerSubSteps:
    """One layer (``layer``, the module holding its parameters) and its sub-steps in order."""

    layer: nn.Module
    steps: tuple[SubStep, ...]

    def step(self, name: str) -> SubStep | None:
        for s in self.steps:
            if s.name == name:
                return s
        return None


@dataclass(frozen=True)
class StageSubSteps:
    """A stage's declaration: names of its positional inputs, its layers, names of its
    outputs (in the order the stage's ``forward`` returns them)."""

    inputs: tuple[str, ...]
    layers: tuple[LayerSubSteps, ...]
    outputs: tuple[str, ...]


def declares_substeps(module: nn.Module) -> bool:
    """True when ``module``'s class defines the :data:`DECLARE` method."""
    return callable(getattr(type(module), DECLARE, None))


def _params(modules: Sequence[nn.Module]) -> set[int]:
    return {id(p) for m in modules for p in m.parameters()}


def check_layer(decl: LayerSubSteps, where: str = "layer") -> None:
    """Raise ValueError unless ``decl`` has exactly attn, dispatch, mlp, combine (then an
    optional post) in that order, of the right kinds, and its computation sub-steps cover
    every parameter-holding module of the layer."""
    if not isinstance(decl, LayerSubSteps):
        raise TypeError(f"{where}: expected LayerSubSteps, got {type(decl).__name__}")
    if not isinstance(decl.layer, nn.Module):
        raise TypeError(f"{where}: LayerSubSteps.layer must be an nn.Module, got "
                        f"{type(decl.layer).__name__}")
    names = [getattr(s, "name", None) for s in decl.steps]
    known = set(LAYER_ORDER) | {POST}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{where}: unknown sub-step(s) {unknown}; expected "
                         f"{list(LAYER_ORDER)} (then optionally {POST!r})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: sub-step(s) {dup} declared more than once")
    missing = [n for n in LAYER_ORDER if n not in names]
    if missing:
        raise ValueError(f"{where}: missing sub-step(s) {missing}; a layer declares "
                         f"{list(LAYER_ORDER)} in that order")
    expected = list(LAYER_ORDER) + ([POST] if POST in names else [])
    if names != expected:
        raise ValueError(f"{where}: sub-steps must come in the order {expected}, got {names}")
    for s in decl.steps:
        want = Comm if s.name in COMM_STEPS else Compute
        if not isinstance(s, want):
            raise ValueError(f"{where}: sub-step {s.name!r} must be a {want.__name__} "
                             f"(got {type(s).__name__})")
        if not isinstance(s.inputs, tuple) or not isinstance(s.outputs, tuple) \
                or not all(isinstance(n, str) for n in s.inputs + s.outputs):
            raise ValueError(f"{where}: sub-step {s.name!r}: inputs and outputs must be tuples "
                             "of names")
        if not s.outputs:
            raise ValueError(f"{where}: sub-step {s.name!r} declares no outputs")
        if isinstance(s, Compute):
            if not callable(s.fn):
                raise ValueError(f"{where}: sub-step {s.name!r}: fn is not callable")
            bad = [type(m).__name__ for m in s.modules + s.deferred
                   if not isinstance(m, nn.Module)]
            if bad:
                raise ValueError(f"{where}: sub-step {s.name!r}: modules must be nn.Module, "
                                 f"got {bad}")
            if not _params(s.deferred) <= _params(s.modules):
                raise ValueError(f"{where}: sub-step {s.name!r}: deferred modules must be "
                                 "among its modules")
            if any(type(m).__name__ == "DeferredLinear" for d in s.deferred
                   for m in d.modules()):
                raise ValueError(f"{where}: sub-step {s.name!r}: a deferred module contains "
                                 "a DeferredLinear, whose weight gradient already goes to the "
                                 "pipeline's store; declare it without deferral")
        elif not (callable(s.start) and callable(s.start_backward)):
            raise ValueError(f"{where}: sub-step {s.name!r}: start and start_backward must be "
                             "callable")
    covered = _params([m for s in decl.steps if isinstance(s, Compute) for m in s.modules])
    layer_params = _params([decl.layer])
    outside = covered - layer_params
    if outside:
        raise ValueError(f"{where}: sub-steps name modules whose parameters are not in the "
                         f"layer ({type(decl.layer).__name__})")
    for child_name, child in decl.layer.named_modules():
        own = {id(p) for p in child.parameters(recurse=False)}
        if own - covered:
            raise ValueError(f"{where}: module {child_name or '<layer>'!r} "
                             f"({type(child).__name__}) of the layer is not covered by any "
                             "computation sub-step's modules")


def check_stage(decl: StageSubSteps, where: str = "stage") -> None:
    """Raise ValueError unless every layer passes :func:`check_layer` and every name a
    sub-step reads (and every stage output) is bound before it."""
    if not isinstance(decl, StageSubSteps):
        raise TypeError(f"{where}: {DECLARE}() must return StageSubSteps, got "
                        f"{type(decl).__name__}")
    if not decl.layers:
        raise ValueError(f"{where}: declares no layers")
    bound = set(decl.inputs)
    for i, layer in enumerate(decl.layers):
        check_layer(layer, f"{where} layer {i}")
        for s in layer.steps:
            unbound = [n for n in s.inputs if n not in bound]
            if unbound:
                raise ValueError(f"{where} layer {i}: sub-step {s.name!r} reads {unbound}, "
                                 "which no stage input or earlier sub-step provides")
            bound |= set(s.outputs)
    unbound = [n for n in decl.outputs if n not in bound]
    if unbound or not decl.outputs:
        raise ValueError(f"{where}: stage outputs {list(decl.outputs)} are not all bound "
                         f"(missing {unbound})")


def stage_substeps(module: nn.Module) -> StageSubSteps:
    """Call ``module.substeps()`` and check the declaration (ValueError when it does not
    cover its layers)."""
    if not declares_substeps(module):
        raise TypeError(f"{type(module).__name__} does not declare sub-steps (no "
                        f"{DECLARE}() method)")
    decl = getattr(module, DECLARE)()
    check_stage(decl, type(module).__name__)
    return decl


__all__ = [
    "ATTN", "COMBINE", "COMM_STEPS", "COMPUTE_STEPS", "DECLARE", "DISPATCH", "LAYER_ORDER",
    "MLP", "POST", "Comm", "Compute", "LayerSubSteps", "StageSubSteps", "SubStep", "Transfer",
    "check_layer", "check_stage", "declares_substeps", "stage_substeps",
]
