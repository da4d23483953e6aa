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


class SwiGLU(nn.Module):
    """One expert (routed or shared): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inner, bias=False)
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Attention, then the MoE feed-forward: ``h + shared(norm(h)) + routed(norm(h))``."""

    def __init__(self, cfg: TrainConfig, routed: nn.Module | None) -> None:
        super().__init__()
        self.attn = Attention(cfg.hidden, cfg.heads)
        self.ffn_norm = RMSNorm(cfg.hidden)
        self.shared = nn.ModuleList(SwiGLU(cfg.hidden, cfg.expert_hidden)
                                    for _ in range(cfg.shared_experts))
        self.routed = routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attn(x)
        y = self.ffn_norm(h)
        out = h
        for expert in self.shared:
            out = out + expert(y)
        if self.routed is not None:
            b, t, d = y.shape
            out = out + self.routed(y.reshape(b * t, d)).view(b, t, d)
        return out


class Stage(nn.Module):
    """Model stage ``index`` of ``cfg.pp``: token ids in (first stage) or hidden states in,
    hidden states out, or logits out (last stage)."""

    def __init__(self, cfg: TrainConfig, index: int, blocks: list[Block]) -> None:
        super().__init__()
        self.index = index
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden) if index == 0 else None
        self.blocks = nn.ModuleList(blocks)
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


class MoEParts:
    """How the routed experts are built and named on this process (filled in with
    :mod:`deeppar.moe`)."""

    def __init__(self, cfg: TrainConfig, layout: Any = None) -> None:
        self.cfg, self.layout = cfg, layout
        self.available = False

    @classmethod
    def build(cls, cfg: TrainConfig, layout: Any = None) -> MoEParts:
        return cls(cfg, layout)

    def routed(self, layer: int) -> nn.Module | None:
        return None

    def is_expert(self, name: str) -> bool:
        return False

    def global_name(self, stage: int, name: str) -> str:
        return f"S{stage}.{name}"

    def sync_dense_grads(self, stages: nn.Module, layout: Any) -> None:
        """Sum the gradients of the parameters every expert-parallel rank holds (attention,
        shared experts, router, embeddings) over the group: they ran on different data."""
        if layout.ep == 1:
            return
        grads = [p.grad for n, p in stages.named_parameters()
                 if p.grad is not None and not self.is_expert(n)]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=layout.ep_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def build_stages(cfg: TrainConfig, moe: MoEParts) -> list[Stage]:
    """All ``cfg.pp`` stages, initialised from ``cfg.seed`` in one fixed order, so every
    process (and the one-process reference) starts from the same weights."""
    torch.manual_seed(cfg.seed)
    per_stage = cfg.layers // cfg.pp
    stages = []
    for k in range(cfg.pp):
        blocks = [Block(cfg, moe.routed(k * per_stage + i)) for i in range(per_stage)]
        stages.append(Stage(cfg, k, blocks))
    return stages


def global_grads(stage: nn.Module, index: int, moe: MoEParts, layout: Any
                 ) -> dict[str, torch.Tensor]:
    """Gradients of one stage keyed by model-wide names (experts by logical id)."""
    prefix = "_orig_mod."
    return {moe.global_name(index, n.removeprefix(prefix)): p.grad.detach().cpu().clone()
            for n, p in stage.named_parameters() if p.grad is not None}
