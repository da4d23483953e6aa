"""One process of the MoE training run: DualPipe over the pipeline ranks, experts sharded over
the expert-parallel group, EPLB mid-training, one profiled step.

Every process runs :func:`train`; process 0 prints the progress and returns a
:class:`~deeppar.demo.report.RunResult` (the others return None).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from . import model as M
from .config import TrainConfig
from .layout import Layout, backend_and_device, init
from .report import Progress, RunResult
from .task import NextTokenTask

HELD_OUT = 1_000_000  # "step" of the held-out batch the move is checked on


class Trainer:
    """State of one process: its two DualPipe stages, optimizer, data and recorders."""

    def __init__(self, cfg: TrainConfig, layout: Layout, out: Path | None,
                 full: list[M.Stage], reference: Any = None) -> None:
        from deeppar.pipeline import DualPipe

        from .balance import ExpertBalancer

        self.cfg, self.layout, self.out = cfg, layout, out
        self.reference = reference
        self.task = NextTokenTask(cfg.vocab, cfg.seq, cfg.seed)
        p, P = layout.pp_rank, cfg.pp
        self.stage_ids = (p, P - 1 - p)  # DualPipe: rank r holds S_r and S_(P-1-r)
        local = [M.build_sharded(cfg, full, k, layout.ep_group, layout.ep_rank).to(layout.device)
                 for k in self.stage_ids]
        self.balancer = ExpertBalancer(
            cfg, [pair for m in local for pair in M.moe_layers(m, cfg)], layout.device)
        self.pipe = DualPipe(tuple(local), process_group=layout.pp_group,
                             p2p_shapes=[(cfg.micro_batch, cfg.seq, cfg.hidden)],
                             p2p_dtype=torch.float32, device=layout.device,
                             record_timeline=True)
        self.opt = torch.optim.Adam(self.pipe.module.parameters(), lr=cfg.lr)
        self.is_main = layout.rank == 0
        self.result = RunResult(config=cfg, layout=layout.describe())

    # ------------------------------------------------------------------ one step
    def batch(self, step: int) -> tuple[Any, Any]:
        """This process's inputs and labels: its expert-parallel rank is its data shard; the
        first half of the micro-batches enters at pipeline rank 0, the second at rank P-1,
        and each end holds the labels of the micro-batches the other one feeds."""
        cfg = self.cfg
        x, y = self.task.batch(step, self.layout.ep_rank, cfg.chunks * cfg.micro_batch)
        x, y = x.to(self.layout.device), y.to(self.layout.device)
        half = cfg.chunks // 2 * cfg.micro_batch
        p = self.layout.pp_rank
        if p == 0:
            return x[:half], y[half:]
        if p == cfg.pp - 1:
            return x[half:], y[:half]
        return None, None

    def loss_microbatches(self) -> list[int]:
        """Micro-batches whose loss this process computes, in the order step returns them."""
        n, p = self.cfg.chunks, self.layout.pp_rank
        if p == 0:
            return list(range(n // 2, n))
        if p == self.cfg.pp - 1:
            return list(range(n // 2))
        return []

    def forward_backward(self, step: int) -> torch.Tensor | None:
        """One DualPipe step; gradients summed over the stage copies and the data shards."""
        x, y = self.batch(step)
        self.opt.zero_grad(set_to_none=False)
        loss, _ = self.pipe.step(x, num_chunks=self.cfg.chunks, criterion=M.criterion,
                                 labels=(y,))
        self.pipe.sum_mirrored_grads()
        if self.cfg.ep > 1:
            M.sync_dense_grads(self.pipe.module, self.layout.ep_group)
        return loss

    def mean_loss(self, loss: torch.Tensor | None) -> float:
        """Mean loss over every micro-batch of every data shard (a collective)."""
        t = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        if loss is not None:
            t[0], t[1] = loss.double().sum(), loss.numel()
        dist.all_reduce(t)
        return float(t[0] / t[1])

    def optimizer_step(self) -> None:
        # the step's gradient is the mean over micro-batches and data shards
        scale = 1.0 / (self.cfg.chunks * self.cfg.ep)
        for p in self.pipe.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        self.opt.step()

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult | None:
        cfg, res = self.cfg, self.result
        progress = Progress(cfg.steps) if self.is_main else None
        profiled = cfg.steps - 1 if cfg.profile and cfg.steps > 1 else -1
        for step in range(cfg.steps):
            start = time.perf_counter()
            with self.capture(step == profiled):
                loss = self.forward_backward(step)
            if step == 0 and cfg.check:
                checked = time.perf_counter()
                self.check_first_step(loss)
                start += time.perf_counter() - checked  # the step's time leaves the check out
            self.optimizer_step()
            value = self.mean_loss(loss)
            res.losses.append(value)
            res.step_seconds.append(time.perf_counter() - start)
            if progress is not None:
                progress.update(step + 1, value, res.step_seconds[-1],
                                "(profiled)" if step == profiled else "")
            if step == (profiled - 1 if profiled > 0 else cfg.steps - 1):
                self.collect_timeline()  # an unprofiled step, for the simulator
            if step + 1 == cfg.rebalance_step:
                self.rebalance(step + 1)
        if progress is not None:
            progress.close()
        if cfg.rebalance_step:
            self.loads_after_move()
        if profiled >= 0:
            self.analyse_profile()
        return res if self.is_main else None

    # ------------------------------------------------------------------ pieces
    def check_first_step(self, loss: torch.Tensor | None) -> None:
        """Send this process's first-step losses and gradients to process 0, which compares
        them with the sequential one-process run (:mod:`.reference`)."""
        from .reference import compare_first_step

        local = self.cfg.experts // self.cfg.ep
        mine = {
            "losses": {(self.layout.ep_rank, m): loss[i].item()
                       for i, m in enumerate(self.loss_microbatches())} if loss is not None
            else {},
            "grads": M.named_grads(self.pipe.module[0], self.layout.ep_rank * local),
        }
        gathered: list[Any] = [None] * self.layout.world if self.is_main else None  # type: ignore
        dist.gather_object(mine, gathered, dst=0)
        if self.is_main:
            self.result.first_step = compare_first_step(self.reference, gathered)

    # ------------------------------------------------------------------ EPLB
    def eval_losses(self) -> dict[tuple[int, int], float]:
        """Forward-only losses of a held-out batch, all processes' (on process 0)."""
        self.balancer.recording = False
        try:
            x, y = self.batch(HELD_OUT)
            with torch.no_grad():
                loss, _ = self.pipe.step(x, num_chunks=self.cfg.chunks,
                                         criterion=M.criterion, labels=(y,))
        finally:
            self.balancer.recording = True
        mine = ({(self.layout.ep_rank, m): loss[i].item()
                 for i, m in enumerate(self.loss_microbatches())} if loss is not None else {})
        gathered: list[Any] = [None] * self.layout.world if self.is_main else None  # type: ignore
        dist.gather_object(mine, gathered, dst=0)
        return {k: v for g in gathered for k, v in g.items()} if self.is_main else {}

    def rebalance(self, steps_done: int) -> None:
        """Plan from the loads recorded so far and move the experts to the migration-aware
        plan; the held-out losses before and after the move must be bit-identical."""
        loads = self.balancer.loads()
        plans = self.balancer.plans(loads)
        mig = plans["migration"]
        before = self.eval_losses()
        stats = self.balancer.move_experts(mig.phy2log, mig.source_slot, self.opt,
                                           self.layout.ep_group)
        after = self.eval_losses()
        moved = torch.tensor([stats.received, stats.bytes_received], dtype=torch.long)
        dist.all_reduce(moved)  # every process's share (each EP group moves its copies)
        self.balancer.recorder.reset()  # from now on: loads under the new placement
        if not self.is_main:
            return
        from .report import eplb_outcome

        self.result.eplb = eplb_outcome(steps_done, loads, plans, before, after,
                                        int(moved[0]), int(moved[1]))
        self.result.missing += plans["missing"]
        self.result.eplb["plan"] = self.balancer.applied_plan(plans)  # drawn at the end

    def loads_after_move(self) -> None:
        """Balancedness of the loads recorded after the move, under the old and the new
        placement: what the move bought on real traffic."""
        loads = self.balancer.loads()
        if self.is_main and self.result.eplb is not None:
            identity = torch.arange(self.cfg.experts).repeat(self.cfg.layers, 1)
            self.result.eplb["after_move"] = {
                "old_placement": self.balancer.balancedness(loads, identity),
                "new_placement": self.balancer.balancedness(loads)}

    @contextlib.contextmanager
    def capture(self, on: bool) -> Iterator[None]:
        """Profile the step inside (every process writes its own trace) when ``on``."""
        if not on:
            yield
            return
        from deeppar.profiling import capture

        engine = getattr(self.pipe, "fused_engine", None)
        if engine is not None:
            engine.record_timeline = True
            engine.timeline.clear()
        path = self.trace_folder() / f"rank{self.layout.rank}.json"
        with warnings.catch_warnings():
            # one step, captured without a profiler warm-up step (it would be a training step)
            warnings.filterwarnings("ignore", message=".*warmup.*")
            with capture(path, steps=1, warmup=0, analyze=False) as prof:
                yield
                prof.step()
        if engine is not None:
            engine.record_timeline = False

    def trace_folder(self) -> Path:
        return (self.out or Path("out/train_moe")) / "traces"

    def analyse_profile(self) -> None:
        """Process 0 analyses every process's trace of the profiled step."""
        dist.barrier()  # every trace written
        if not self.is_main:
            return
        from .profile import analyse

        engine = getattr(self.pipe, "fused_engine", None)
        entries = list(engine.timeline) if engine is not None else []
        if engine is None:
            self.result.missing.append("fused F&B engine (deeppar.pipeline.fused): pairs ran as "
                                       "F then B")
        self.result.profile = analyse(self.trace_folder(), entries,
                                      self.out or Path("out/train_moe"))
        self.result.files += self.result.profile["files"]

    def collect_timeline(self) -> None:
        """The last step's measured timeline, of the pipeline through process 0."""
        steps = self.pipe.gather_timeline()
        if self.is_main:
            self.result.schedule = self.pipe.schedule(self.cfg.chunks)
            self.result.timeline = steps


def train(cfg: TrainConfig, out: str | None = None) -> RunResult | None:
    """Run one process of the training (the rank layout from the environment).

    The model with every expert is built first, before torch.distributed starts, so that each
    MoE layer holds all its experts: process 0 runs the one-process reference on a copy of
    it (on the device the run uses), and every process takes its stages and experts from it."""
    import copy
    import os

    torch.set_num_threads(cfg.threads)
    full = M.build_full(cfg)
    reference = None
    if cfg.check and int(os.environ.get("RANK", "0")) == 0:
        from .reference import sequential_first_step

        task = NextTokenTask(cfg.vocab, cfg.seq, cfg.seed)
        _, device = backend_and_device()
        model = [stage.to(device) for stage in copy.deepcopy(full)]
        reference = sequential_first_step(cfg, task, model, device)
    layout = init(cfg.pp, cfg.ep)
    try:
        return Trainer(cfg, layout, Path(out) if out else None, full, reference).run()
    finally:
        dist.destroy_process_group()


__all__ = ["Trainer", "train"]
