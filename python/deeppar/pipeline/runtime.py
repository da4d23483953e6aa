"""Executes a pipeline schedule (the IR of :mod:`deeppar.pipeline.ir`) on real stages.

The runtime owns no step logic of its own: :func:`deeppar.pipeline.build` gives every rank its
program, and :meth:`~deeppar.pipeline.ir.Schedule.recvs_before` /
:meth:`~deeppar.pipeline.ir.Schedule.sends_after` say what each step receives and sends. The
runtime runs the program top to bottom: receive what the step needs (:mod:`.comm`), compute it
(``F`` forward, ``B`` full backward, ``I`` backward with the weight gradient deferred to the
pipeline's :class:`~.weight_grad.WeightGradStore`, ``W`` the deferred part, an ``Overlap`` through
the stage class's ``overlapped_forward_backward`` hook when it has one, else on the fused engine
(:mod:`.fused`) when the stages declare sub-steps), then queue its sends.

:class:`DualPipe` and :class:`DualPipeV` fix the method; :class:`PipelineRuntime` runs any method
the generators know (``1f1b`` for a baseline, for instance).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import P2PComm, TensorMeta
from .comm_plan import CommPlan, build_plan, live_actions, step_transfers
from .fused import FusedEngine
from .ir import Action, Kind, Overlap, Schedule, Step
from .overlap import can_overlap, run_backward, run_overlapped
from .simulate import TimedStep
from .timeline import TimelineRecorder
from .weight_grad import WeightGradStore, activate, bind_store

Tensors = list[torch.Tensor | None]


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


class PipelineRuntime(nn.Module):
    """Runs the schedule ``method`` over the ranks of ``process_group``.

    ``modules`` are this rank's stages in slot order (as the schedule's placement says).
    ``rank_mapping[i]`` is the pipeline rank of group rank ``i`` (identity by default).
    ``p2p_shapes``/``p2p_dtype`` fix the tensors every message carries (no headers); without
    them the first step sends a small header with each message's shapes, and with
    ``cache_shapes`` later steps whose inputs have the same shapes on every rank (and the same
    grad mode, autocast state and trainable parameters) reuse them without headers (a stage
    whose output shapes then change raises an error: set ``cache_shapes=False`` for
    data-dependent shapes). ``record_timeline`` keeps the per-step
    times of the last step in :attr:`timeline`.
    """

    method: str = ""

    def __init__(
        self,
        modules: Sequence[nn.Module],
        batch_dim: int = 0,
        process_group: dist.ProcessGroup | None = None,
        rank_mapping: Sequence[int] | None = None,
        *,
        method: str | None = None,
        p2p_shapes: Sequence[Sequence[int]] | None = None,
        p2p_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        record_timeline: bool = False,
        max_tensors: int = 16,
        cache_shapes: bool = True,
    ) -> None:
        super().__init__()
        if method is not None:
            self.method = method
        if not self.method:
            raise ValueError("method: give the schedule method, e.g. '1f1b'")
        if isinstance(modules, nn.Module) and not isinstance(modules, (nn.ModuleList,
                                                                       nn.Sequential)):
            modules = (modules,)
        modules = list(modules)
        if not modules or not all(isinstance(m, nn.Module) for m in modules):
            raise TypeError("modules must be a tuple of nn.Module (this rank's stages)")
        if not isinstance(batch_dim, int):
            raise TypeError(f"batch_dim must be an int, got {type(batch_dim).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "dist.init_process_group first")
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        self.group = process_group
        self.num_ranks = dist.get_world_size(process_group)
        group_rank = dist.get_rank(process_group)
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        rank_mapping = list(rank_mapping)
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1}, "
                             f"got {rank_mapping}")
        self.rank = rank_mapping[group_rank]
        self.group_ranks = [0] * self.num_ranks  # pipeline rank -> group rank
        for g, p in enumerate(rank_mapping):
            self.group_ranks[p] = g
        if device is None:
            param = next(self.module.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        self.device = torch.device(device)
        if dist.get_backend(process_group) == "nccl":
            if self.device.type != "cuda":
                raise ValueError("device: the NCCL backend needs the stages on a CUDA device")
            # NCCL works on the current device: messages on another one would hang or fail
            current = torch.cuda.current_device()
            if self.device.index is None:
                self.device = torch.device("cuda", current)
            elif self.device.index != current:
                raise ValueError(f"device: with the NCCL backend the stages must be on the "
                                 f"current CUDA device cuda:{current}, got {self.device}; call "
                                 f"torch.cuda.set_device({self.device.index}) first")
        if p2p_shapes is None and p2p_dtype is not None:
            raise ValueError("p2p_dtype is given without p2p_shapes")
        if p2p_shapes is not None and (
                not isinstance(p2p_shapes, (list, tuple)) or not p2p_shapes
                or not all(isinstance(s, (list, tuple, torch.Size)) for s in p2p_shapes)):
            raise TypeError("p2p_shapes must be a non-empty list of shapes, e.g. [(mb, hidden)]")
        self.p2p_shapes = ([tuple(int(d) for d in s) for s in p2p_shapes]
                           if p2p_shapes is not None else None)
        self.p2p_dtype = p2p_dtype or torch.float32
        self.max_tensors = max_tensors
        self.use_overlap_hook = can_overlap(modules) and len(modules) > 1
        # runs Overlap pairs of stages that declare sub-steps (when no class hook wins)
        self.fused_engine = FusedEngine(record_timeline=False)
        self.weight_grad_store = WeightGradStore()
        bind_store(modules, self.weight_grad_store)
        self.record_timeline = record_timeline
        self.timeline: list[TimedStep] = []
        self._schedules: dict[int, Schedule] = {}
        self._plans: dict[tuple[int, bool], CommPlan] = {}
        self.cache_shapes = cache_shapes
        self._shape_cache: tuple[Any, dict] | None = None
        self.last_step_headers = 0  # header messages sent + received in the last step

    # ------------------------------------------------------------------ schedule
    def schedule(self, num_chunks: int) -> Schedule:
        """The schedule this runtime executes for ``num_chunks`` micro-batches (cached)."""
        if num_chunks not in self._schedules:
            from .schedules import build

            sched = build(self.method, self.num_ranks, num_chunks)
            mine = sched.stages_of(self.rank)
            if len(mine) != len(self.module):
                raise ValueError(f"modules: {self.method} places {len(mine)} stages on each "
                                 f"rank, got {len(self.module)} modules")
            self._schedules[num_chunks] = sched
        return self._schedules[num_chunks]

    def _plan(self, sched: Schedule, forward_only: bool) -> CommPlan:
        """Where every rank posts its sends and receives (:mod:`.comm_plan`, cached)."""
        key = (sched.num_chunks, forward_only)
        if key not in self._plans:
            self._plans[key] = build_plan(sched, forward_only)
        return self._plans[key]

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
        in_mbs = [m for m in range(sched.num_chunks) if sched.input_rank(m) == self.rank]
        loss_mbs = [m for m in range(sched.num_chunks) if sched.loss_rank(m) == self.rank]
        in_ranks = sorted({sched.input_rank(m) for m in range(sched.num_chunks)})
        loss_ranks = sorted({sched.loss_rank(m) for m in range(sched.num_chunks)})
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
        n_in = sum(1 for m in range(sched.num_chunks) if sched.input_rank(m) == self.rank)
        n_loss = sum(1 for m in range(sched.num_chunks) if sched.loss_rank(m) == self.rank)
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

    def _agree(self, problems: list[str], signature: tuple, shapes: tuple,
               sched: Schedule | None = None, info: tuple = (None, None, 0)) -> tuple:
        """Share every rank's problems and batch sizes (one collective, before any send or
        receive) and raise the same error on all ranks when any rank has a problem or the
        ranks' batches do not fit together. Returns all ranks' ``shapes`` (the step's
        shape-cache key: input shapes and :meth:`_message_state`), so a change on any rank
        invalidates the cache on every rank."""
        gathered: list[Any] = [None] * self.num_ranks
        dist.all_gather_object(gathered, (self.rank, problems, signature, shapes, info),
                               group=self.group)
        gathered.sort(key=lambda g: g[0])
        sigs = {g[2] for g in gathered}
        msgs = [f"rank {r}: {p}" for r, ps, *_ in gathered for p in ps]
        if len(sigs) > 1:
            msgs.append("ranks disagree on (num_chunks, grad mode): "
                        + ", ".join(f"rank {g[0]}: {g[2]}" for g in gathered))
        if not msgs and sched is not None:
            msgs = self._cross_check(sched, {g[0]: g[4] for g in gathered})
        if msgs:
            raise ValueError(f"{type(self).__name__}.step: " + "; ".join(msgs))
        return tuple(g[3] for g in gathered)

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
        All such errors are the same ``ValueError`` on every rank, raised before any send.
        """
        forward_only = not torch.is_grad_enabled()
        labels_given = labels is not None
        if labels is None:
            labels = ()
        elif isinstance(labels, torch.Tensor):
            labels = (labels,)
        labels = tuple(labels)
        problems: list[str] = []
        sched = None
        if isinstance(num_chunks, bool) or not isinstance(num_chunks, int):
            problems.append(f"num_chunks must be an int, got {type(num_chunks).__name__}")
        else:
            try:
                sched = self.schedule(num_chunks)
            except ValueError as e:
                problems.append(f"num_chunks: {e}")
        problems += self._check(sched, inputs, labels, criterion, forward_only, labels_given)
        shapes = tuple((tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else None
                       for x in inputs)
        info = self._batch_info(sched, inputs, labels)
        all_shapes = self._agree(problems, (num_chunks, forward_only),
                                 (shapes, self._message_state()), sched, info)
        if sched is None:  # _agree raised for a bad num_chunks; this guards the invariant
            raise RuntimeError(f"{type(self).__name__}.step: no schedule for num_chunks="
                               f"{num_chunks!r}")
        cache_key = (num_chunks, forward_only, all_shapes)
        try:
            with activate(self.weight_grad_store):
                return self._run(sched, inputs, labels, criterion, return_outputs,
                                 forward_only, cache_key)
        except BaseException:
            # deferred weight-gradient closures hold activations: drop them with the step
            self.weight_grad_store.clear()
            raise

    def _run(self, sched: Schedule, inputs: Sequence[Any], labels: Sequence[Any],
             criterion: Callable | None, return_outputs: bool, forward_only: bool,
             cache_key: Any = None):
        me = self.rank
        store = self.weight_grad_store
        store.clear()
        in_mbs = [m for m in range(sched.num_chunks) if sched.input_rank(m) == me]
        loss_mbs = [m for m in range(sched.num_chunks) if sched.loss_rank(m) == me]
        st = _StepState()
        if in_mbs:
            for m, xs in zip(in_mbs, _split(list(inputs), len(in_mbs), self.batch_dim)):
                st.inputs[(sched.entry[m], m)] = [x for x in xs if x is not None]
        if loss_mbs:
            lab = [x for x in labels if x is not None]
            for m, ls in zip(loss_mbs, _split(lab, len(loss_mbs), self.batch_dim)):
                st.labels[m] = ls
        st.criterion = criterion
        st.return_outputs = return_outputs
        st.forward_only = forward_only
        # sent activations are freed once sent (their backward needs only the graph and the
        # gradient), except those handed over locally and when outputs are returned
        st.free_sent = not return_outputs and not forward_only
        if st.free_sent:
            st.local_sends = {(t.stage, t.microbatch) for step in sched.steps[me]
                              for t in step_transfers(sched, me, step, "send", forward_only)
                              if t.local and t.tensor == "activation"}
        slot_of = {s: sched.stages[s].slot for s in sched.stages_of(me)}

        fixed = None
        if self.p2p_shapes is not None:
            fixed = {
                "activation": [TensorMeta(s, self.p2p_dtype, not forward_only)
                               for s in self.p2p_shapes],
                "gradient": [TensorMeta(s, self.p2p_dtype, False) for s in self.p2p_shapes],
            }
        known = None
        if self.cache_shapes and self._shape_cache is not None \
                and self._shape_cache[0] == cache_key:
            known = self._shape_cache[1]
        plan = self._plan(sched, forward_only)
        rank_plan = plan.ranks[me]
        comm = P2PComm(self.group, self.group_ranks, me, self.device,
                       plan.channels, fixed, self.max_tensors, known)
        rec = TimelineRecorder(me, self.device) if self.record_timeline else None
        if rec is not None:
            rec.start()

        for index, step in enumerate(sched.steps[me]):
            live = live_actions(step, forward_only)
            if not live:
                continue
            # issue the plan's groups due before this step, then wait for what it needs
            for group in rank_plan.groups_before(index):
                comm.issue(group)
            remote = [t for t in step_transfers(sched, me, step, "recv", forward_only)
                      if not t.local]
            for t, tensors in zip(remote, comm.wait([t.key for t in remote])):
                st.put_received(t.tensor, t.stage, t.microbatch, tensors)
            began = rec.begin() if rec is not None else None
            self._compute(sched, live, step, st, slot_of, store)
            if rec is not None:
                rec.end(index, step if len(live) == len(step.actions) else live[0], began)
            for t in step_transfers(sched, me, step, "send", forward_only):
                tensors = st.take_for_send(t.tensor, t.stage, t.microbatch)
                if t.local:
                    st.put_local(t.tensor, t.peer_stage, t.microbatch, tensors)
                else:
                    comm.send(t.key, t.peer, tensors)
        for group in rank_plan.groups_before(len(sched.steps[me])):
            comm.issue(group)
        comm.finish()
        self.last_step_headers = comm.headers
        if fixed is None and known is None and self.cache_shapes:
            self._shape_cache = (cache_key, comm.seen)
        if not store.empty():
            raise RuntimeError(f"rank {me}: deferred weight gradients left after the schedule")
        if rec is not None:
            self.timeline = rec.finish()

        loss = outputs = None
        if loss_mbs:
            if criterion is not None:
                loss = torch.stack([st.losses[m].detach() for m in loss_mbs])
            if return_outputs:
                per_mb = [st.final_outputs[m] for m in loss_mbs]
                outputs = tuple(torch.cat([o[i] for o in per_mb], dim=self.batch_dim)
                                for i in range(len(per_mb[0])))
                if len(outputs) == 1:
                    outputs = outputs[0]
        return loss, outputs

    # ------------------------------------------------------------------ compute
    def _compute(self, sched: Schedule, live: tuple[Action, ...], step: Step,
                 st: _StepState, slot_of: dict[int, int], store: WeightGradStore) -> None:
        if len(live) == 2 and isinstance(step, Overlap):
            f, b = live
            if self.use_overlap_hook:
                self._overlapped(sched, f, b, st, slot_of, store)
                return
        for a in live:
            if a.kind is Kind.F:
                self._forward(sched, a, st, slot_of)
            elif a.kind is Kind.W:
                store.pop((a.stage, a.microbatch))
            else:
                self._backward(sched, a, st, store)

    def _forward(self, sched: Schedule, a: Action, st: _StepState,
                 slot_of: dict[int, int]) -> None:
        info = sched.stages[a.stage]
        module = self.module[slot_of[a.stage]]
        inputs = st.inputs[(a.stage, a.microbatch)]
        if st.forward_only:
            del st.inputs[(a.stage, a.microbatch)]
        outputs = _as_list(module(*inputs), f"stage {info.model_stage}")
        loss = None
        if info.is_last and st.criterion is not None:
            loss = st.criterion(*outputs, *st.labels.get(a.microbatch, []))
        st.after_forward(a, info.is_last, outputs, loss)

    def _backward(self, sched: Schedule, a: Action, st: _StepState,
                  store: WeightGradStore) -> None:
        info = sched.stages[a.stage]
        store.enabled = a.kind is Kind.I
        try:
            if info.is_last:
                loss = st.losses[a.microbatch]
                loss.backward()
            else:
                outs, grads = st.backward_pairs(a)
                run_backward(outs, grads)
        finally:
            store.enabled = False
        if a.kind is Kind.I:
            store.flush((a.stage, a.microbatch))
        st.after_backward(a, info.is_last)

    def _overlapped(self, sched: Schedule, f: Action, b: Action, st: _StepState,
                    slot_of: dict[int, int], store: WeightGradStore) -> None:
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
        store.enabled = b.kind is Kind.I
        try:
            outputs0, loss0 = run_overlapped(
                self.module[slot_of[f.stage]], inputs0, criterion0, labels0,
                self.module[slot_of[b.stage]], loss1, outs1, grads1,
                engine=self.fused_engine, microbatches=(f.microbatch, b.microbatch))
        finally:
            store.enabled = False
        if b.kind is Kind.I:
            store.flush((b.stage, b.microbatch))
        st.after_forward(f, finfo.is_last, outputs0, loss0)
        st.after_backward(b, binfo.is_last)


class _StepState:
    """Tensors of one step, keyed by (stage id, micro-batch)."""

    def __init__(self) -> None:
        self.inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.outputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.out_grads: dict[tuple[int, int], Tensors] = {}
        self.in_grads: dict[tuple[int, int], Tensors] = {}
        self.labels: dict[int, list[torch.Tensor]] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self.final_outputs: dict[int, list[torch.Tensor]] = {}
        self.criterion: Callable | None = None
        self.return_outputs = False
        self.forward_only = False
        self.free_sent = False
        self.local_sends: set[tuple[int, int]] = set()

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
