"""A small DeepSeek-style MoE transformer cut into pipeline stages.

Stage ``k`` of ``pp`` holds ``layers / pp`` blocks; the first also embeds the tokens, the last
also normalises and projects to the vocabulary. A block is attention then an MoE feed-forward
(a shared expert plus routed experts behind group-limited top-k routing); the routed experts
are sharded over the expert-parallel group.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig


def make_block(cfg: TrainConfig, group: Any = None) -> nn.Module:
    """One transformer block: causal attention, then the MoE feed-forward (routed experts
    behind group-limited top-k routing, plus the shared expert)."""
    from deeppar.moe.block import MoEBlock

    return MoEBlock(cfg.hidden, cfg.heads, cfg.expert_hidden, cfg.experts, cfg.top_k,
                    shared_intermediate=cfg.expert_hidden * cfg.shared_experts, group=group,
                    n_group=cfg.n_group, topk_group=cfg.topk_group)


class StageLayer(nn.Module):
    """A block, with the token embedding in front (first layer of the first stage) or the
    final norm and vocabulary projection behind (last layer of the last stage), declared as
    the block's sub-steps with those folded into its ``attn`` and ``post``."""

    def __init__(self, cfg: TrainConfig, group: Any = None, *, first: bool = False,
                 last: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden) if first else None
        self.block = make_block(cfg, group)
        self.norm = nn.RMSNorm(cfg.hidden) if last else None
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False) if last else None

    def attn_step(self, tokens: torch.Tensor) -> tuple:
        return self.block.attn_step(self.embed(tokens))

    def post_step(self, *args: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block.post_step(*args)))

    def declare(self) -> Any:
        from deeppar.pipeline.substeps import LayerSubSteps

        steps = []
        for step in self.block.declare().steps:
            if step.name == "attn" and self.embed is not None:
                step = replace(step, fn=self.attn_step, modules=(self.embed, *step.modules))
            elif step.name == "post" and self.head is not None:
                step = replace(step, fn=self.post_step,
                               modules=(*step.modules, self.norm, self.head))
            steps.append(step)
        return LayerSubSteps(self, tuple(steps))


class Stage(nn.Module):
    """Model stage ``index`` of ``cfg.pp``: token ids in (first stage) or hidden states in,
    hidden states out, or logits out (last stage). Declares its layers' sub-steps, so the
    pipeline runs its F&B pairs on the fused engine."""

    def __init__(self, cfg: TrainConfig, index: int, group: Any = None) -> None:
        super().__init__()
        self.index = index
        n = cfg.layers // cfg.pp
        self.layers = nn.ModuleList(
            StageLayer(cfg, group, first=index == 0 and i == 0,
                       last=index == cfg.pp - 1 and i == n - 1) for i in range(n))

    def substeps(self) -> Any:
        from deeppar.pipeline.substeps import StageSubSteps

        return StageSubSteps(("x",), tuple(layer.declare() for layer in self.layers), ("x",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deeppar.pipeline.fused import forward_substeps

        return forward_substeps(self, x)  # type: ignore[return-value]


def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of one micro-batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


EXPERT_BANKS = ("moe.experts.",)  # parameters stacked over the experts (dim 0)


def is_expert(name: str) -> bool:
    """True for the routed experts' stacked weights (sharded over the EP group)."""
    return any(key in name for key in EXPERT_BANKS)


def build_full(cfg: TrainConfig) -> list[Stage]:
    """All ``cfg.pp`` stages with every expert, initialised from ``cfg.seed``: the weights
    every process starts from (built before torch.distributed is initialised, so each MoE
    layer holds all its experts)."""
    torch.manual_seed(cfg.seed)
    return [Stage(cfg, k) for k in range(cfg.pp)]


def build_sharded(cfg: TrainConfig, full: list[Stage], index: int, group: Any,
                  ep_rank: int) -> Stage:
    """Stage ``index`` with only this expert-parallel rank's experts (slots ``ep_rank * E/ep``
    on), its weights copied from ``full``."""
    stage = Stage(cfg, index, group)
    local = cfg.experts // cfg.ep
    source = full[index].state_dict()
    with torch.no_grad():
        for name, t in stage.state_dict().items():
            src = source[name]
            if is_expert(name):
                src = src[ep_rank * local:(ep_rank + 1) * local]
            t.copy_(src)
    return stage


def moe_layers(stage: Stage, cfg: TrainConfig) -> list[tuple[int, nn.Module]]:
    """``(global layer index, MoE layer)`` of a stage."""
    per = cfg.layers // cfg.pp
    return [(stage.index * per + i, layer.block.moe) for i, layer in enumerate(stage.layers)]


def sync_dense_grads(stages: nn.Module, group: Any) -> None:
    """Sum over the expert-parallel group the gradients of the parameters every rank of it
    holds (attention, router, shared expert, embeddings): they ran on different data."""
    grads = [p.grad for n, p in stages.named_parameters()
             if p.grad is not None and not is_expert(n)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def named_grads(stage: Stage, first_slot: int = 0) -> dict[str, tuple[int, torch.Tensor]]:
    """``{"S<index>.<name>": (first expert, grad)}``: expert banks carry the logical id of
    their first row (slots = experts before any rebalance), other parameters 0."""
    return {f"S{stage.index}.{n}":
            (first_slot if is_expert(n) else 0, p.grad.detach().cpu().clone())
            for n, p in stage.named_parameters() if p.grad is not None}
