"""Executes a pipeline schedule (the IR of :mod:`deeppar.pipeline.ir`) on real stages.

The runtime owns no step logic of its own: :func:`deeppar.pipeline.build` gives every rank its
program, and :meth:`~deeppar.pipeline.ir.Schedule.recvs_before` /
:meth:`~deeppar.pipeline.ir.Schedule.sends_after` say what each step receives and sends. A step
reads top to bottom:

1. *agree* (:mod:`.coordination`): every rank's program and messages must fit together (same
   schedule, rank mapping, p2p shapes; arguments that fit); checked in full only when something
   changed on some rank, and the same ``ValueError`` on every rank otherwise;
2. *prepare*: this rank's program (every step's receives, sends and comm-plan groups, computed
   once per schedule and mode), the step's state, the messages (:mod:`.comm`);
3. *loop*: receive what a step needs, compute it (``F`` forward, ``B`` full backward, ``I``
   backward with the weight gradient deferred to the pipeline's
   :class:`~.weight_grad.WeightGradStore`, ``W`` the deferred part, an ``Overlap`` through the
   stage class's ``overlapped_forward_backward`` hook when it has one, else on the fused engine
   (:mod:`.fused`) when the stages declare sub-steps), queue its sends; each
   step runs inside a ``record_function`` range named after its kind when a profiler records;
4. *collect*: losses and outputs.

A rank whose step raises posts a failure notice and finishes its communication with placeholder
tensors, so its peers fail at the end of their step (or at their next agreement) with an error
naming it, instead of waiting for the process group's timeout.

:class:`DualPipe` and :class:`DualPipeV` fix the method; :class:`PipelineRuntime` runs any method
the generators know (``1f1b`` for a baseline, for instance).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import P2PComm, TensorMeta
from .comm_plan import CommPlan, Group, build_plan, live_actions, step_transfers
from .coordination import PipelineFailure, StepCoordinator
from .fused import FusedEngine
from .ir import Action, Kind, Overlap, Schedule, Step, Transfer
from .overlap import can_overlap, run_backward, run_overlapped
from .simulate import TimedStep
from .timeline import TimelineRecorder
from .weight_grad import WeightGradStore, activate, bind_store

Tensors = list[torch.Tensor | None]


def check_p2p_shapes(shapes: Any, name: str = "p2p_shapes") -> list[tuple[int, ...]]:
    """``shapes`` as a list of int tuples; ``TypeError`` naming ``name`` unless it is a
    non-empty list of shapes (the one check of DeepSeek's ``set_p2p_tensor_shapes`` convention,
    used by the runtime and by :mod:`deeppar.dualpipe`)."""
    if not isinstance(shapes, (list, tuple)) or not shapes or not all(
            isinstance(s, (list, tuple, torch.Size)) for s in shapes):
        raise TypeError(f"{name} must be a non-empty list of shapes, e.g. [(mb, hidden)]")
    return [tuple(int(d) for d in s) for s in shapes]


@dataclass(frozen=True)
class PipelineConfig:
    """How a pipeline runs (everything but its stages).

    ``rank_mapping[i]`` is the pipeline rank of group rank ``i`` (identity by default).
    ``p2p_shapes``/``p2p_dtype`` fix the tensors every message carries (no headers); without
    them the first step sends a small header with each message's shapes, and with
    ``cache_shapes`` later steps whose inputs have the same shapes on every rank (and the same
    grad mode, autocast state and trainable parameters) reuse them without headers (a stage
    whose output shapes then change raises an error: set ``cache_shapes=False`` for
    data-dependent shapes). ``record_timeline`` keeps the per-step times of the last step in
    :attr:`PipelineRuntime.timeline`. ``max_tensors`` bounds the tensors of one message.
    """

    method: str = ""
    batch_dim: int = 0
    process_group: dist.ProcessGroup | None = None
    rank_mapping: tuple[int, ...] | None = None
    p2p_shapes: tuple[tuple[int, ...], ...] | None = None
    p2p_dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    record_timeline: bool = False
    max_tensors: int = 16
    cache_shapes: bool = True

    def __post_init__(self) -> None:
        if not self.method or not isinstance(self.method, str):
            raise ValueError("method: give the schedule method, e.g. '1f1b'")
        if not isinstance(self.batch_dim, int) or isinstance(self.batch_dim, bool):
            raise TypeError(f"batch_dim must be an int, got {type(self.batch_dim).__name__}")
        if self.p2p_shapes is None and self.p2p_dtype is not None:
            raise ValueError("p2p_dtype is given without p2p_shapes")
        if self.p2p_shapes is not None:
            object.__setattr__(self, "p2p_shapes", tuple(check_p2p_shapes(self.p2p_shapes)))
        if self.p2p_dtype is not None and not isinstance(self.p2p_dtype, torch.dtype):
            raise TypeError(f"p2p_dtype must be a torch.dtype, got "
                            f"{type(self.p2p_dtype).__name__}")
        if self.rank_mapping is not None:
            object.__setattr__(self, "rank_mapping", tuple(int(r) for r in self.rank_mapping))
        if not isinstance(self.max_tensors, int) or self.max_tensors < 1:
            raise ValueError(f"max_tensors must be an int >= 1, got {self.max_tensors!r}")


def _as_list(outputs: Any, what: str) -> list[torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in outputs):
        return list(outputs)
    raise TypeError(f"{what} must return a tensor or a tuple/list of tensors, got "
                    f"{type(outputs).__name__}")


def _split(tensors: Sequence[torch.Tensor | None], n: int, dim: int) -> list[list[Any]]:
    """Cut each tensor into ``n`` equal micro-batches along ``dim`` (the step has checked that
    the batch size divides): result[m] = tensors of mb m."""
    parts = [t.chunk(n, dim=dim) if t is not None else [None] * n for t in tensors]
    return [[p[m] for p in parts] for m in range(n)]


@dataclass(frozen=True)
class _ProgramStep:
    """One live step of this rank's program with what the loop needs, computed once."""

    index: int  # in the schedule's program of this rank
    step: Step
    live: tuple[Action, ...]
    timed: Step  # what the timeline records (the live forward of a forward-only pair)
    label: str  # the profiler range: "pipeline.F", ".B", ".I", ".W" or ".FB"
    groups: tuple[Group, ...]  # comm-plan groups issued before the step
    recvs: tuple[Transfer, ...]  # remote receives it waits for
    sends: tuple[Transfer, ...]  # sends and local hand-overs after it


@dataclass(frozen=True)
class _Program:
    """This rank's part of a schedule in one mode (training or forward-only)."""

    plan: CommPlan
    steps: tuple[_ProgramStep, ...]
    final_groups: tuple[Group, ...]
    slot_of: dict[int, int]  # stage id -> local slot
    in_mbs: tuple[int, ...]  # micro-batches whose input this rank gives
    entry: dict[int, int]  # micro-batch -> stage id where it enters
    loss_mbs: tuple[int, ...]  # micro-batches whose loss this rank computes
    local_sends: frozenset[tuple[int, int]]  # (stage, mb) activations handed over locally
    deferred: frozenset[tuple[int, int]]  # (stage, mb) whose backward is an I


def _build_program(sched: Schedule, me: int, forward_only: bool) -> _Program:
    plan = build_plan(sched, forward_only)
    groups_at: dict[int, list[Group]] = {}
    for g in plan.ranks[me].groups:
        groups_at.setdefault(g.before, []).append(g)
    steps = []
    for index, step in enumerate(sched.steps[me]):
        live = live_actions(step, forward_only)
        if not live:
            continue
        timed = step if len(live) == len(step.actions) else live[0]
        kind = "FB" if isinstance(timed, Overlap) else timed.kind.value
        recvs = tuple(t for t in step_transfers(sched, me, step, "recv", forward_only)
                      if not t.local)
        steps.append(_ProgramStep(index, step, live, timed, f"pipeline.{kind}",
                                  tuple(groups_at.get(index, ())), recvs,
                                  step_transfers(sched, me, step, "send", forward_only)))
    local_sends = frozenset((t.stage, t.microbatch) for ps in steps for t in ps.sends
                            if t.local and t.tensor == "activation")
    deferred = frozenset((a.stage, a.microbatch) for a in sched.rank_actions(me)
                         if a.kind is Kind.I and not forward_only)
    return _Program(plan, tuple(steps), tuple(groups_at.get(len(sched.steps[me]), ())),
                    {s: sched.stages[s].slot for s in sched.stages_of(me)},
                    tuple(m for m in range(sched.num_chunks) if sched.input_rank(m) == me),
                    dict(enumerate(sched.entry)),
                    tuple(m for m in range(sched.num_chunks) if sched.loss_rank(m) == me),
                    local_sends, deferred)


@dataclass(frozen=True)
class _Payload:
    """What one rank contributes to the pre-step agreement (see :mod:`.coordination`)."""

    rank: int  # pipeline rank
    problems: tuple[str, ...]  # its own argument problems
    program: tuple[tuple[str, Any], ...]  # what must be equal on every rank, by name
    shapes: tuple  # input shapes and message state: the shape-cache key
    info: tuple  # batch sizes per micro-batch, label count (cross-checked)


class PipelineRuntime(nn.Module):
    """Runs the schedule ``method`` over the ranks of ``process_group``.

    ``modules`` are this rank's stages in slot order (as the schedule's placement says); the
    other options are the fields of :class:`PipelineConfig` (given as keywords, or as
    ``config=``). Construction is local; the first :meth:`step` is collective.
    """

    method: str = ""

    def __init__(self, modules: Sequence[nn.Module] | nn.Module, batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None,
                 rank_mapping: Sequence[int] | None = None, *,
                 config: PipelineConfig | None = None, **options: Any) -> None:
        super().__init__()
        if config is None:
            options.setdefault("method", self.method)
            config = PipelineConfig(batch_dim=batch_dim, process_group=process_group,
                                    rank_mapping=rank_mapping, **options)
        elif options:
            raise TypeError(f"give either config or options, not both: {sorted(options)}")
        self.config = config
        self.method = config.method
        if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList,
                                                                       nn.Sequential)):
            modules = (modules,)
        modules = list(modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError("modules must be a tuple of nn.Module (this rank's stages)")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "dist.init_process_group first")
        self.module = nn.ModuleList(modules)
        self.batch_dim = config.batch_dim
        self.group = config.process_group
        self.num_ranks = dist.get_world_size(self.group)
        self.rank_mapping, self.group_ranks = self._resolve_ranks(config.rank_mapping)
        self.group_rank = dist.get_rank(self.group)
        self.rank = self.rank_mapping[self.group_rank]
        self.device = self._resolve_device(config.device)
        self.p2p_shapes = list(config.p2p_shapes) if config.p2p_shapes is not None else None
        self.p2p_dtype = config.p2p_dtype or torch.float32
        self.max_tensors = config.max_tensors
        self.cache_shapes = config.cache_shapes
        self.record_timeline = config.record_timeline
        try:
            overlap = can_overlap(modules)
            self._stage_problems: tuple[str, ...] = ()
        except ValueError as exc:  # a sub-step declaration that does not cover its layers
            overlap = False
            # reported by the first step's agreement, so that every rank raises it together
            self._stage_problems = (f"stages: {exc}",)
        self.use_overlap_hook = overlap and len(modules) > 1
        # runs Overlap pairs of stages that declare sub-steps (when no class hook wins)
        self.fused_engine = FusedEngine(record_timeline=False)
        self.weight_grad_store = WeightGradStore()
        bind_store(modules, self.weight_grad_store)
        self.timeline: list[TimedStep] = []
        self.last_step_headers = 0  # header messages sent + received in the last step
        self.full_agreements = 0  # steps whose agreement compared every rank's payload
        self._schedules: dict[int, tuple[Schedule, str]] = {}  # num_chunks -> (sched, hash)
        self._programs: dict[tuple[int, bool], _Program] = {}
        self._ends_cache: dict[int, tuple[list[int], list[int], list[int], list[int]]] = {}
        self._shape_cache: tuple[Any, dict] | None = None
        self._coord = StepCoordinator(self.group, self.group_rank, self.num_ranks,
                                      f"{type(self).__name__}.step")

    def _resolve_ranks(self, mapping: Sequence[int] | None) -> tuple[list[int], list[int]]:
        """(pipeline rank of each group rank, group rank of each pipeline rank)."""
        mapping = list(range(self.num_ranks)) if mapping is None else list(mapping)
        if sorted(mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1}, "
                             f"got {mapping}")
        group_ranks = [0] * self.num_ranks
        for g, p in enumerate(mapping):
            group_ranks[p] = g
        return mapping, group_ranks

    def _resolve_device(self, device: torch.device | str | None) -> torch.device:
        if device is None:
            param = next(self.module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        device = torch.device(device)
        if dist.get_backend(self.group) != "nccl":
            return device
        if device.type != "cuda":
            raise ValueError("device: the NCCL backend needs the stages on a CUDA device")
        # NCCL works on the current device: messages on another one would hang or fail
        current = torch.cuda.current_device()
        if device.index is None:
            return torch.device("cuda", current)
        if device.index != current:
            raise ValueError(f"device: with the NCCL backend the stages must be on the "
                             f"current CUDA device cuda:{current}, got {device}; call "
                             f"torch.cuda.set_device({device.index}) first")
        return device

    # ------------------------------------------------------------------ schedule
    def schedule(self, num_chunks: int) -> Schedule:
        """The schedule this runtime executes for ``num_chunks`` micro-batches (cached)."""
        return self._schedule_and_hash(num_chunks)[0]

    def _schedule_and_hash(self, num_chunks: int) -> tuple[Schedule, str]:
        if num_chunks not in self._schedules:
            from .schedules import build

            sched = build(self.method, self.num_ranks, num_chunks)
            mine = sched.stages_of(self.rank)
            if len(mine) != len(self.module):
                raise ValueError(f"modules: {self.method} places {len(mine)} stages on each "
                                 f"rank, got {len(self.module)} modules")
            digest = hashlib.sha1(sched.to_json().encode()).hexdigest()[:16]
            self._schedules[num_chunks] = (sched, digest)
        return self._schedules[num_chunks]

    def _program(self, sched: Schedule, forward_only: bool) -> _Program:
        key = (sched.num_chunks, forward_only)
        if key not in self._programs:
            self._programs[key] = _build_program(sched, self.rank, forward_only)
        return self._programs[key]

    def gather_timeline(self) -> list[TimedStep]:
        """All ranks' timelines of the last step (a collective: call it on every rank).
        Needs ``record_timeline=True``."""
        if not self.record_timeline:
            raise ValueError("gather_timeline needs the pipeline built with record_timeline=True")
        gathered: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(gathered, self.timeline, group=self.group)
        return [s for steps in gathered for s in steps]

    # ------------------------------------------------------------------ validation
    def _check(self, sched: Schedule | None, inputs: Sequence[Any], labels: Sequence[Any],
               criterion: Callable | None, forward_only: bool,
               labels_given: bool = True) -> list[str]:
        """This rank's problems with the step's arguments (shared by :meth:`_agree`)."""
        problems: list[str] = []
        if self.p2p_shapes is None and dist.get_backend(self.group) == "nccl":
            # headers need a host wait on a group that may hold payload sends: unsafe on NCCL
            problems.append("p2p_shapes: the NCCL backend needs fixed p2p_shapes (shape "
                            "headers are supported on gloo only)")
        given = [x for x in inputs if x is not None]
        given_labels = [x for x in labels if x is not None]
        for what, xs in (("inputs", given), ("labels", given_labels)):
            for x in xs:
                if not isinstance(x, torch.Tensor):
                    problems.append(f"{what} must be tensors (or None), got {type(x).__name__}")
        if sched is None:
            return problems
        in_mbs, loss_mbs, in_ranks, loss_ranks = self._ends(sched)
        if in_mbs and not given:
            problems.append(f"inputs: {self.method} takes inputs on rank(s) {in_ranks}; none "
                            "were given")
        if not in_mbs and given:
            problems.append(f"inputs: {self.method} takes inputs on rank(s) {in_ranks} only; "
                            f"pass no inputs (or None) on rank {self.rank}")
        if not loss_mbs and given_labels:
            problems.append(f"labels: {self.method} takes labels on rank(s) {loss_ranks} only")
        if loss_mbs and not forward_only and criterion is None:
            problems.append(f"criterion: rank {self.rank} computes the loss of "
                            f"{len(loss_mbs)} micro-batches and needs a criterion for training")
        if criterion is not None and not callable(criterion):
            problems.append(f"criterion must be callable, got {type(criterion).__name__}")
        if loss_mbs and criterion is not None:
            if not labels_given:
                problems.append(f"labels: rank {self.rank} computes the loss of "
                                f"{len(loss_mbs)} micro-batches and was given no labels; pass "
                                "labels=(...), or labels=() for a criterion that takes only "
                                "the outputs")
            elif len(given_labels) != len(labels):
                problems.append(f"labels: rank {self.rank} computes the loss of "
                                f"{len(loss_mbs)} micro-batches; its labels must be tensors, "
                                "got None")
        for what, xs, n in (("inputs", given, len(in_mbs)), ("labels", given_labels,
                                                             len(loss_mbs))):
            sizes = []
            for x in xs:
                if not isinstance(x, torch.Tensor) or not n:
                    continue
                if x.dim() <= self.batch_dim:
                    problems.append(f"{what}: a tensor of shape {tuple(x.shape)} has no batch "
                                    f"dim {self.batch_dim}")
                    continue
                b = x.shape[self.batch_dim]
                sizes.append(b)
                if b < n:
                    problems.append(f"{what}: batch size {b} is smaller than the {n} "
                                    "micro-batches this rank feeds")
                elif b % n:
                    problems.append(f"{what}: batch size {b} is not divisible by the {n} "
                                    f"micro-batches this rank feeds (micro-batches are equal "
                                    "slices of the batch)")
            if len(set(sizes)) > 1:
                problems.append(f"{what}: the tensors differ in batch size (dim "
                                f"{self.batch_dim}): {sizes}")
        return problems

    def _ends(self, sched: Schedule) -> tuple[list[int], list[int], list[int], list[int]]:
        """(micro-batches whose input this rank gives, those whose loss it computes, the
        ranks that give inputs, the ranks that compute losses), cached per schedule."""
        if sched.num_chunks not in self._ends_cache:
            n = range(sched.num_chunks)
            self._ends_cache[sched.num_chunks] = (
                [m for m in n if sched.input_rank(m) == self.rank],
                [m for m in n if sched.loss_rank(m) == self.rank],
                sorted({sched.input_rank(m) for m in n}), sorted({sched.loss_rank(m) for m in n}))
        return self._ends_cache[sched.num_chunks]

    def _batch_info(self, sched: Schedule | None, inputs: Sequence[Any],
                    labels: Sequence[Any]) -> tuple[int | None, int | None, int]:
        """(samples per input micro-batch, samples per label micro-batch, number of label
        tensors) of this rank, compared across ranks by :meth:`_agree`."""
        def per_mb(xs: Sequence[Any], n: int) -> int | None:
            ts = [x for x in xs if isinstance(x, torch.Tensor) and x.dim() > self.batch_dim]
            if not ts or not n:
                return None
            return ts[0].shape[self.batch_dim] // n
        if sched is None:
            return (None, None, 0)
        in_mbs, loss_mbs, _, _ = self._ends(sched)
        n_in, n_loss = len(in_mbs), len(loss_mbs)
        return (per_mb(inputs, n_in), per_mb(labels, n_loss),
                sum(1 for x in labels if x is not None))

    @staticmethod
    def _cross_check(sched: Schedule, info: dict[int, tuple]) -> list[str]:
        """Problems only visible across ranks: labels whose micro-batches do not match the
        inputs' in size, and loss ranks given different numbers of label tensors."""
        problems: list[str] = []
        pairs = sorted({(sched.input_rank(m), sched.loss_rank(m))
                        for m in range(sched.num_chunks)})
        for ir, lr in pairs:
            x_mb, y_mb = info[ir][0], info[lr][1]
            if x_mb is not None and y_mb is not None and x_mb != y_mb:
                problems.append(f"labels: the labels on rank {lr} have {y_mb} samples per "
                                f"micro-batch, the inputs on rank {ir} {x_mb} (labels of "
                                f"micro-batches that enter at rank {ir})")
        loss_ranks = sorted({lr for _, lr in pairs})
        counts = {r: info[r][2] for r in loss_ranks}
        if len(set(counts.values())) > 1:
            problems.append("labels: the ranks that compute losses were given different "
                            "numbers of label tensors: "
                            + ", ".join(f"rank {r}: {c}" for r, c in counts.items()))
        return problems

    # ------------------------------------------------------------------ agreement
    def _program_signature(self, sched_hash: str | None, num_chunks: Any,
                           forward_only: bool) -> tuple[tuple[str, Any], ...]:
        """Everything that makes the ranks' programs and messages consistent, by name."""
        return (("method", self.method), ("ranks", self.num_ranks),
                ("num_chunks", num_chunks),
                ("grad mode", "forward-only" if forward_only else "training"),
                ("rank_mapping", tuple(self.rank_mapping)),
                ("p2p_shapes", tuple(self.p2p_shapes) if self.p2p_shapes is not None else None),
                ("p2p_dtype", str(self.p2p_dtype) if self.p2p_shapes is not None else None),
                ("max_tensors", self.max_tensors), ("cache_shapes", self.cache_shapes),
                ("schedule hash", sched_hash))

    def _agree(self, payload: _Payload, sched: Schedule | None) -> tuple:
        """Share every rank's payload (:mod:`.coordination`; in full only when one changed)
        and raise the same ``ValueError`` on all ranks when any rank has a problem, the
        ranks' programs differ, or their batches do not fit together. Returns the step's
        shape-cache key: every rank's input shapes and :meth:`_message_state`."""
        payloads, unchanged = self._coord.exchange(payload)
        if not unchanged:
            self.full_agreements += 1
            msgs = [f"rank {p.rank}: {m}" for p in payloads for m in p.problems]
            msgs += self._disagreements(payloads)
            if not msgs and sched is not None:
                msgs = self._cross_check(sched, {p.rank: p.info for p in payloads})
            if msgs:
                raise ValueError(f"{type(self).__name__}.step: " + "; ".join(msgs))
            self._coord.accept(payloads)
        return tuple(p.shapes for p in payloads)

    @staticmethod
    def _disagreements(payloads: Sequence[_Payload]) -> list[str]:
        """One message per program field whose value differs between ranks (group order)."""
        msgs = []
        for i, (name, _) in enumerate(payloads[0].program):
            values = [p.program[i][1] for p in payloads]
            if len(set(map(repr, values))) > 1:
                msgs.append(f"ranks disagree on {name}: " + ", ".join(
                    f"group rank {g} (pipeline rank {p.rank}): {v!r}"
                    for g, (p, v) in enumerate(zip(payloads, values))))
        return msgs

    def _message_state(self) -> tuple:
        """What can change this rank's messages (their shapes, dtypes, ``requires_grad``)
        without changing the input shapes: grad mode, autocast, and which local parameters
        require grad. Part of the shape-cache key."""
        dev = self.device.type
        autocast = torch.is_autocast_enabled(dev)
        flags = bytes(p.requires_grad for p in self.module.parameters())
        return (torch.is_grad_enabled(), autocast,
                str(torch.get_autocast_dtype(dev)) if autocast else None,
                hashlib.sha1(flags).hexdigest())

    # ------------------------------------------------------------------ step
    def step(
        self,
        *inputs: torch.Tensor | None,
        num_chunks: int = 0,
        criterion: Callable | None = None,
        labels: Sequence[torch.Tensor | None] | torch.Tensor | None = None,
        return_outputs: bool = False,
    ) -> tuple[torch.Tensor | None, Any]:
        """Run one training step (or, under ``torch.no_grad()``, a forward-only step).

        ``inputs`` are the whole batch of this rank's input micro-batches, cut into
        micro-batches along ``batch_dim``; ``labels`` those of the micro-batches whose loss this
        rank computes (``criterion(*outputs, *labels)``). Returns ``(loss, outputs)`` on the
        ranks that compute losses: the per-micro-batch losses stacked in micro-batch order, and
        with ``return_outputs`` the last stage's outputs concatenated along ``batch_dim``
        (a tensor, or a tuple when the stage returns several); ``(None, None)`` elsewhere.

        Every micro-batch has the same size: a batch size that ``num_chunks`` (per input rank,
        its share of the micro-batches) does not divide is an error, as are labels whose
        micro-batches differ in size from the inputs' and, on a rank that computes losses with
        a criterion, missing labels (``labels=()`` says the criterion takes only the outputs).
        All such errors, and ranks whose programs differ (method, schedule, rank mapping, p2p
        shapes), are the same ``ValueError`` on every rank, raised before any send.

        If a rank's stage raises during the step, that rank raises its exception and every
        other rank raises :class:`~.coordination.PipelineFailure` naming it, at the end of its
        step or at its next step's start; the pipeline cannot step again.
        """
        forward_only = not torch.is_grad_enabled()
        labels_given = labels is not None
        labels = () if labels is None else (labels,) if isinstance(labels, torch.Tensor) \
            else tuple(labels)
        sched, payload = self._describe(num_chunks, inputs, labels, criterion, forward_only,
                                        labels_given)
        all_shapes = self._agree(payload, sched)
        if sched is None:  # _agree raised for a bad num_chunks; this guards the invariant
            raise RuntimeError(f"{type(self).__name__}.step: no schedule for num_chunks="
                               f"{num_chunks!r}")
        cache_key = (num_chunks, forward_only, all_shapes)
        prog = self._program(sched, forward_only)
        comm = self._open_comm(prog, forward_only, cache_key)
        try:
            st = self._prepare(prog, inputs, labels, criterion, return_outputs, forward_only)
            with activate(self.weight_grad_store):
                self._loop(sched, prog, st, comm)
            self._finish(comm, cache_key)
        except BaseException as exc:
            self._fail(comm, exc)
            raise  # _fail raises; this satisfies the type checker
        return self._collect(prog, st)

    def _describe(self, num_chunks: Any, inputs: Sequence[Any], labels: tuple,
                  criterion: Callable | None, forward_only: bool, labels_given: bool
                  ) -> tuple[Schedule | None, _Payload]:
        """The step's schedule (None for a bad ``num_chunks``) and this rank's agreement
        payload: its problems with the arguments, its program signature, its shapes."""
        problems: list[str] = list(self._stage_problems)
        sched = sched_hash = None
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
            problems.append(f"num_chunks must be an int, got {type(num_chunks).__name__}")
        else:
            try:
                sched, sched_hash = self._schedule_and_hash(num_chunks)
            except ValueError as e:
                problems.append(f"num_chunks: {e}")
        problems += self._check(sched, inputs, labels, criterion, forward_only, labels_given)
        shapes = tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else None
                       for x in inputs)
        return sched, _Payload(self.rank, tuple(problems),
                               self._program_signature(sched_hash, num_chunks, forward_only),
                               (shapes, self._message_state()),
                               self._batch_info(sched, inputs, labels))

    def _open_comm(self, prog: _Program, forward_only: bool, cache_key: Any) -> P2PComm:
        """The step's messages: fixed shapes, shapes agreed on an earlier step, or headers."""
        fixed = None
        if self.p2p_shapes is not None:
            fixed = {"activation": [TensorMeta(s, self.p2p_dtype, not forward_only)
                                    for s in self.p2p_shapes],
                     "gradient": [TensorMeta(s, self.p2p_dtype, False) for s in self.p2p_shapes]}
        known = None
        if self.cache_shapes and self._shape_cache is not None \
                and self._shape_cache[0] == cache_key:
            known = self._shape_cache[1]
        return P2PComm(self.group, self.group_ranks, self.rank, self.device, prog.plan.channels,
                       prog.plan.ranks[self.rank].groups, fixed, self.max_tensors, known)

    def _prepare(self, prog: _Program, inputs: Sequence[Any], labels: Sequence[Any],
                 criterion: Callable | None, return_outputs: bool,
                 forward_only: bool) -> _StepState:
        """The step's state: this rank's input and label micro-batches, keyed for the loop."""
        self.weight_grad_store.clear()
        first_inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        if prog.in_mbs:
            for m, xs in zip(prog.in_mbs, _split(list(inputs), len(prog.in_mbs),
                                                 self.batch_dim)):
                first_inputs[(prog.entry[m], m)] = [x for x in xs if x is not None]
        mb_labels: dict[int, list[torch.Tensor]] = {}
        if prog.loss_mbs:
            given = [x for x in labels if x is not None]
            for m, ls in zip(prog.loss_mbs, _split(given, len(prog.loss_mbs), self.batch_dim)):
                mb_labels[m] = ls
        # sent activations are freed once sent (their backward needs only the graph and the
        # gradient), except those handed over locally and when outputs are returned
        return _StepState(criterion=criterion, return_outputs=return_outputs,
                          forward_only=forward_only,
                          free_sent=not return_outputs and not forward_only,
                          local_sends=prog.local_sends, deferred=prog.deferred,
                          slot_of=prog.slot_of, labels=mb_labels, inputs=first_inputs)

    def _loop(self, sched: Schedule, prog: _Program, st: _StepState, comm: P2PComm) -> None:
        """Run this rank's program: issue the plan's groups due before each step, wait for the
        receives it needs, compute it, queue its sends."""
        rec = TimelineRecorder(self.rank, self.device) if self.record_timeline else None
        if rec is not None:
            rec.start()
        profiling = torch.autograd.profiler._is_profiler_enabled
        for ps in prog.steps:
            for group in ps.groups:
                comm.issue(group)
            if ps.recvs:
                for t, tensors in zip(ps.recvs, comm.wait([t.key for t in ps.recvs])):
                    st.put_received(t.tensor, t.stage, t.microbatch, tensors)
            began = rec.begin() if rec is not None else None
            with (torch.autograd.profiler.record_function(ps.label, str(ps.timed))
                  if profiling else contextlib.nullcontext()):
                self._compute(sched, ps, st)
            if rec is not None:
                rec.end(ps.index, ps.timed, began)
            for t in ps.sends:
                tensors = st.take_for_send(t.tensor, t.stage, t.microbatch)
                if t.local:
                    st.put_local(t.tensor, t.peer_stage, t.microbatch, tensors)
                else:
                    comm.send(t.key, t.peer, tensors)
        for group in prog.final_groups:
            comm.issue(group)
        if rec is not None:
            self.timeline = rec.finish()

    def _finish(self, comm: P2PComm, cache_key: Any) -> None:
        """Wait for the last sends; keep the shapes learnt from headers; make sure no rank
        failed during the step (its placeholders would have reached this one)."""
        comm.finish()
        self.last_step_headers = comm.headers
        if comm.fixed is None and comm.known is None and self.cache_shapes:
            self._shape_cache = (cache_key, comm.seen)
        if not self.weight_grad_store.empty():
            raise RuntimeError(f"rank {self.rank}: deferred weight gradients left after the "
                               "schedule")
        if self.device.type == "cuda":
            # NCCL: the host is ahead of the messages; a placeholder from a failed rank is
            # known to have arrived only once the step's kernels are done
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._coord.wait_until(event.query, self._abort_group)
        self._coord.raise_if_failed()

    def _abort_group(self) -> None:
        """A peer failed while this rank's kernels still wait for messages (a failure that
        could not finish its messages, e.g. a CUDA error): abort the communicator so they
        end; the process group is unusable afterwards."""
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort(self.group)

    def _fail(self, comm: P2PComm, exc: BaseException) -> None:
        """A step raised on this rank: publish it (the first failure wins), send placeholders
        for what this rank still owes its peers and receive what they send, then raise: this
        rank's own exception if it failed first, else the failure of the rank that did."""
        # deferred weight-gradient closures hold activations: drop them with the step
        self.weight_grad_store.clear()
        self._shape_cache = None
        notice = self._coord.post_failure(self.rank, exc)
        try:
            comm.drain()
        except Exception as drain_error:  # noqa: BLE001 - reported with the original error
            exc.add_note(f"rank {self.rank}: finishing the step's messages failed too: "
                         f"{type(drain_error).__name__}: {drain_error}")
        if isinstance(exc, PipelineFailure) or not notice.startswith(f"rank {self.rank}: "):
            raise PipelineFailure(f"{type(self).__name__}.step: the pipeline failed on "
                                  f"{notice}") from exc
        raise exc

    def _collect(self, prog: _Program, st: _StepState) -> tuple[torch.Tensor | None, Any]:
        """(losses stacked in micro-batch order, outputs concatenated) of this rank."""
        if not prog.loss_mbs:
            return None, None
        loss = outputs = None
        if st.criterion is not None:
            loss = torch.stack([st.losses[m].detach() for m in prog.loss_mbs])
        if st.return_outputs:
            per_mb = [st.final_outputs[m] for m in prog.loss_mbs]
            outputs = tuple(torch.cat([o[i] for o in per_mb], dim=self.batch_dim)
                            for i in range(len(per_mb[0])))
            if len(outputs) == 1:
                outputs = outputs[0]
        return loss, outputs

    # ------------------------------------------------------------------ compute
    def _compute(self, sched: Schedule, ps: _ProgramStep, st: _StepState) -> None:
        live = ps.live
        if len(live) == 2 and isinstance(ps.step, Overlap) and self.use_overlap_hook:
            self._overlapped(sched, live[0], live[1], st)
            return
        for a in live:
            if a.kind is Kind.F:
                self._forward(sched, a, st)
            elif a.kind is Kind.W:
                self.weight_grad_store.pop((a.stage, a.microbatch))
            else:
                self._backward(sched, a, st)

    def _forward(self, sched: Schedule, a: Action, st: _StepState) -> None:
        info = sched.stages[a.stage]
        module = self.module[st.slot_of[a.stage]]
        inputs = st.inputs[(a.stage, a.microbatch)]
        if st.forward_only:
            del st.inputs[(a.stage, a.microbatch)]
        with self.weight_grad_store.capturing((a.stage, a.microbatch) in st.deferred):
            outputs = _as_list(module(*inputs), f"stage {info.model_stage}")
            loss = None
            if info.is_last and st.criterion is not None:
                loss = st.criterion(*outputs, *st.labels.get(a.microbatch, []))
        st.after_forward(a, info.is_last, outputs, loss)

    def _backward(self, sched: Schedule, a: Action, st: _StepState) -> None:
        info = sched.stages[a.stage]
        store = self.weight_grad_store
        store.enabled = a.kind is Kind.I
        try:
            if info.is_last:
                st.losses[a.microbatch].backward()
            else:
                run_backward(*st.backward_pairs(a))
        finally:
            store.enabled = False
        if a.kind is Kind.I:
            store.flush((a.stage, a.microbatch))
        st.after_backward(a, info.is_last)

    def _overlapped(self, sched: Schedule, f: Action, b: Action, st: _StepState) -> None:
        """An overlapped pair through the stage class's ``overlapped_forward_backward``."""
        finfo, binfo = sched.stages[f.stage], sched.stages[b.stage]
        inputs0 = st.inputs[(f.stage, f.microbatch)]
        if finfo.is_last and st.criterion is not None:
            criterion0, labels0 = st.criterion, st.labels.get(f.microbatch, [])
        else:
            criterion0, labels0 = None, []
        if binfo.is_last:
            loss1, outs1, grads1 = st.losses[b.microbatch], [], []
        else:
            loss1 = None
            outs1, grads1 = st.backward_pairs(b)
        store = self.weight_grad_store
        store.enabled = b.kind is Kind.I
        try:
            with store.capturing((f.stage, f.microbatch) in st.deferred):
                outputs0, loss0 = run_overlapped(
                    self.module[st.slot_of[f.stage]], inputs0, criterion0, labels0,
                    self.module[st.slot_of[b.stage]], loss1, outs1, grads1,
                    engine=self.fused_engine, microbatches=(f.microbatch, b.microbatch))
        finally:
            store.enabled = False
        if b.kind is Kind.I:
            store.flush((b.stage, b.microbatch))
        st.after_forward(f, finfo.is_last, outputs0, loss0)
        st.after_backward(b, binfo.is_last)


@dataclass
class _StepState:
    """Tensors of one step, keyed by (stage id, micro-batch), and the step's settings."""

    criterion: Callable | None
    return_outputs: bool
    forward_only: bool
    free_sent: bool  # free the storage of sent activations (see take_for_send)
    local_sends: frozenset[tuple[int, int]]
    deferred: frozenset[tuple[int, int]]
    slot_of: dict[int, int]
    labels: dict[int, list[torch.Tensor]]
    inputs: dict[tuple[int, int], list[torch.Tensor]]
    outputs: dict[tuple[int, int], list[torch.Tensor]] = field(default_factory=dict)
    out_grads: dict[tuple[int, int], Tensors] = field(default_factory=dict)
    in_grads: dict[tuple[int, int], Tensors] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    final_outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)


    def put_received(self, tensor: str, stage: int, mb: int, tensors: Tensors) -> None:
        if tensor == "activation":
            self.inputs[(stage, mb)] = tensors  # type: ignore[assignment]
        else:
            self.out_grads[(stage, mb)] = tensors

    def put_local(self, tensor: str, stage: int, mb: int, tensors: Tensors) -> None:
        """In-rank hand-over (DualPipeV's turn): a detached copy that starts a new graph."""
        if tensor == "activation":
            self.inputs[(stage, mb)] = [
                t.detach().requires_grad_(t.requires_grad) for t in tensors  # type: ignore
            ]
        else:
            self.out_grads[(stage, mb)] = tensors

    def take_for_send(self, tensor: str, stage: int, mb: int) -> Tensors:
        if tensor == "activation":
            outs = self.outputs[(stage, mb)]
            if self.forward_only:
                del self.outputs[(stage, mb)]
            elif self.free_sent and (stage, mb) not in self.local_sends:
                # the message carries aliases of the storage (kept until the send completes);
                # the outputs kept for the backward drop theirs now
                sent = [o.detach().requires_grad_(o.requires_grad) for o in outs]
                for o in outs:
                    if o.grad_fn is not None and o._base is None:
                        o.data = torch.empty(0, dtype=o.dtype, device=o.device)
                return sent  # type: ignore[return-value]
            return outs  # type: ignore[return-value]
        return self.in_grads.pop((stage, mb))

    def after_forward(self, a: Action, is_last: bool, outputs: list[torch.Tensor],
                      loss: torch.Tensor | None) -> None:
        if is_last:
            if loss is not None:
                self.losses[a.microbatch] = loss
            if self.return_outputs:
                self.final_outputs[a.microbatch] = [o.detach() for o in outputs]
        else:
            self.outputs[(a.stage, a.microbatch)] = outputs

    def backward_pairs(self, a: Action) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        outs = self.outputs.pop((a.stage, a.microbatch))
        grads = self.out_grads.pop((a.stage, a.microbatch))
        if len(grads) != len(outs):
            raise RuntimeError(f"{a}: {len(grads)} gradients for {len(outs)} outputs")
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]  # type: ignore[misc]

    def after_backward(self, a: Action, is_last: bool) -> None:
        if is_last:
            self.losses[a.microbatch] = self.losses[a.microbatch].detach()
        inputs = self.inputs.pop((a.stage, a.microbatch))
        self.in_grads[(a.stage, a.microbatch)] = [
            t.grad if t.requires_grad else None for t in inputs
        ]


class DualPipe(PipelineRuntime):
    """DualPipe: rank ``r`` holds ``modules=(S_r, S_(P-1-r))``; inputs on ranks 0 and P-1
    (rank 0's are the first half of the micro-batches), labels on the opposite end; losses come
    back where they are computed (rank P-1 for rank 0's inputs and the other way round).
    After a training step call :meth:`sum_mirrored_grads` to add the two copies' gradients."""

    method = "dualpipe"

    def sum_mirrored_grads(self) -> None:
        """Add to each stage's gradients those of its other copy (on rank P-1-r); both copies
        end with the same sum. One exchange with the mirror rank."""
        sum_mirrored_grads(self)


class DualPipeV(PipelineRuntime):
    """DualPipeV: rank ``r`` holds ``modules=(S_r, S_(2P-1-r))``; inputs, labels and losses all
    on rank 0; the turn S_(P-1) -> S_P is a local hand-over on the last rank."""

    method = "dualpipev"


def sum_mirrored_grads(pipe: PipelineRuntime) -> None:
    """For DualPipe: ``modules[0]`` on rank r is the same stage as ``modules[1]`` on rank P-1-r.
    Exchange both slots' gradients with the mirror and add them (missing grads count as 0).
    Parameters shared by the two local stages (tied weights, shared the same way on the mirror)
    get the mirror's gradient once."""
    if len(pipe.module) != 2:
        raise ValueError("sum_mirrored_grads needs a pipeline with two stages per rank")
    mirror = pipe.num_ranks - 1 - pipe.rank
    if mirror == pipe.rank:
        raise ValueError("sum_mirrored_grads: the middle rank of an odd pipeline has no mirror")
    params = [[p for p in m.parameters() if p.requires_grad] for m in pipe.module]
    flat = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in ps]) if ps else torch.zeros(0, device=pipe.device)
            for ps in params]
    # the mirror's slot 0 is our slot 1's stage and the other way round
    mirror_slot0, mirror_slot1 = torch.empty_like(flat[1]), torch.empty_like(flat[0])
    peer = dist.get_global_rank(pipe.group, pipe.group_ranks[mirror]) \
        if pipe.group is not None else pipe.group_ranks[mirror]
    # both sides send slot 0 then slot 1 and receive in that same order
    ops = [dist.P2POp(dist.isend, flat[0], peer, pipe.group),
           dist.P2POp(dist.isend, flat[1], peer, pipe.group),
           dist.P2POp(dist.irecv, mirror_slot0, peer, pipe.group),
           dist.P2POp(dist.irecv, mirror_slot1, peer, pipe.group)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    other = {0: mirror_slot1, 1: mirror_slot0}
    # a parameter shared by the two local stages (tied weights) appears in both slots, here
    # and on the mirror (where it is one tensor too): add the mirror's gradient to it once
    done: set[int] = set()
    for slot, ps in enumerate(params):
        if len(other[slot]) != sum(p.numel() for p in ps):
            raise ValueError("sum_mirrored_grads: the two copies of a stage differ in size")
        offset = 0
        for p in ps:
            n = p.numel()
            g = other[slot][offset:offset + n].view_as(p)
            offset += n
            if id(p) in done:
                continue
            done.add(id(p))
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad += g


__all__ = ["DualPipe", "DualPipeV", "PipelineRuntime", "sum_mirrored_grads"]
