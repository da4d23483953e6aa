"""A small DeepSeek-style MoE transformer cut into pipeline stages.

Stage ``k`` of ``pp`` holds ``layers / pp`` blocks; the first also embeds the tokens, the last
also normalises and projects to the vocabulary. A block is attention then an MoE feed-forward
(a shared expert plus routed experts behind group-limited top-k routing); the routed experts
are sharded over the expert-parallel group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal multi-head self-attention (pre-norm, residual added by the block)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = RMSNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Attention, then the MoE feed-forward (routed experts and the shared expert):
    ``h = x + attn(x)``, ``out = h + moe(norm(h))``."""

    def __init__(self, cfg: TrainConfig, group: Any = None) -> None:
        from deeppar.moe import MoELayer

        super().__init__()
        self.attn = Attention(cfg.hidden, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.hidden)
        self.moe = MoELayer(cfg.hidden, cfg.expert_hidden, cfg.experts, cfg.top_k, group=group,
                            shared_intermediate=cfg.expert_hidden * cfg.shared_experts,
                            n_group=cfg.n_group, topk_group=cfg.topk_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x)
        return h + self.moe(self.ffn_norm(h))


class Stage(nn.Module):
    """Model stage ``index`` of ``cfg.pp``: token ids in (first stage) or hidden states in,
    hidden states out, or logits out (last stage)."""

    def __init__(self, cfg: TrainConfig, index: int, group: Any = None) -> None:
        super().__init__()
        self.index = index
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden) if index == 0 else None
        self.blocks = nn.ModuleList(Block(cfg, group) for _ in range(cfg.layers // cfg.pp))
        last = index == cfg.pp - 1
        self.norm = RMSNorm(cfg.hidden) if last else None
        self.head = nn.Linear(cfg.hidden, cfg.vocab, bias=False) if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        if self.head is not None:
            x = self.head(self.norm(x))
        return x


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
    return [(stage.index * per + i, b.moe) for i, b in enumerate(stage.blocks)]


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
    return {f"S{stage.index}.{n.removeprefix('_orig_mod.')}":
            (first_slot if is_expert(n) else 0, p.grad.detach().cpu().clone())
            for n, p in stage.named_parameters() if p.grad is not None}
