"""Small declaring stages for the fused engine's tests: token-mixing layers whose dispatch and
combine are plain ``all_to_all_single`` (async) over the default group, or a local copy when no
group is initialised; plus the bitwise comparisons the tests use."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from deeppar.pipeline.fused import forward_substeps
from deeppar.pipeline.substeps import Comm, Compute, LayerSubSteps, StageSubSteps

HIDDEN = 8


class AllToAll:
    """An async equal-split all-to-all over ``group`` (or a copy without a process group)."""

    def __init__(self, x: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        x = x.contiguous()
        self.out = torch.empty_like(x)
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            self.work = dist.all_to_all_single(self.out, x, group=group, async_op=True)
        else:
            self.out.copy_(x)
            self.work = None

    def wait(self) -> tuple[torch.Tensor]:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return (self.out,)


def a2a_start(x: torch.Tensor) -> AllToAll:
    return AllToAll(x)


def a2a_backward(transfer: AllToAll, g: torch.Tensor) -> AllToAll:
    # equal splits: the transposed all-to-all is the same all-to-all
    return AllToAll(g)


class MixLayer(nn.Module):
    """attn: RMS-normed token mixing; dispatch: all-to-all; mlp: a two-layer MLP on the
    received rows; combine: all-to-all back; post: residual add."""

    def __init__(self, d: int = HIDDEN) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.attn = nn.Linear(d, d)
        self.gate = nn.Linear(d, d, bias=False)
        self.w1 = nn.Linear(d, 2 * d)
        self.w2 = nn.Linear(2 * d, d)

    def attn_fn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x + torch.tanh(self.attn(self.norm(x)))
        return h, self.gate(h)

    def mlp_fn(self, r: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(r)))

    @staticmethod
    def post_fn(h: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        return h + back

    def declare(self) -> LayerSubSteps:
        return LayerSubSteps(self, (
            Compute("attn", self.attn_fn, ("x",), ("h", "send"),
                    modules=(self.norm, self.attn, self.gate), deferred=(self.attn, self.gate)),
            Comm("dispatch", a2a_start, a2a_backward, ("send",), ("recv",)),
            Compute("mlp", self.mlp_fn, ("recv",), ("out",), modules=(self.w1, self.w2),
                    deferred=(self.w1, self.w2)),
            Comm("combine", a2a_start, a2a_backward, ("out",), ("back",)),
            Compute("post", self.post_fn, ("h", "back"), ("x",)),
        ))

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same layer as one autograd graph (transfers through an autograd all-to-all)."""
        h, send = self.attn_fn(x)
        back = _A2AFn.apply(self.mlp_fn(_A2AFn.apply(send)))
        return self.post_fn(h, back)


class _A2AFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return AllToAll(x).wait()[0]

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return AllToAll(g).wait()[0]


class MixStage(nn.Module):
    """A stage of ``layers`` MixLayers that declares its sub-steps."""

    def __init__(self, layers: int = 2, d: int = HIDDEN) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MixLayer(d) for _ in range(layers))

    def substeps(self) -> StageSubSteps:
        return StageSubSteps(("x",), tuple(layer.declare() for layer in self.layers), ("x",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward_substeps(self, x)  # type: ignore[return-value]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer.reference(x)
        return x


class PlainMixStage(MixStage):
    """The same stage without the declaration: the runtime runs its pairs as F then B."""

    substeps = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference(x)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None)
            for n, p in module.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None],
                   what: str = "gradients") -> None:
    """Every entry equal bit for bit (None only where the other is None too)."""
    assert a.keys() == b.keys(), f"{what}: different names"
    for n in a:
        x, y = a[n], b[n]
        assert (x is None) == (y is None), f"{what} {n}: one is None"
        if x is not None:
            assert torch.equal(x, y), f"{what} {n}: differ (max {(x - y).abs().max()})"
