"""A bank of SwiGLU experts stored as stacked weights, run one expert's rows at a time."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SwiGLUExperts(nn.Module):
    """``num_experts`` SwiGLU MLPs: ``w2 @ (silu(w1 @ x) * (w3 @ x))`` with ``w13 = [w1; w3]``
    stacked as ``[E, 2I, H]`` and ``w2`` as ``[E, H, I]``."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("hidden", hidden),
                            ("intermediate", intermediate)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        kw = {"dtype": dtype, "device": device}
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, **kw))
        nn.init.normal_(self.w13, std=hidden**-0.5)
        nn.init.normal_(self.w2, std=max(intermediate, 1) ** -0.5)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``index`` on rows ``x [n, H]``."""
        gate, up = F.linear(x, self.w13[index]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.w2[index])

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x [sum(counts), H]`` grouped by expert (``counts[e]`` rows of expert ``e``, in
        order) -> ``[sum(counts), H]``. Every expert runs, even on zero rows, so each weight
        gets a gradient."""
        if len(counts) != self.num_experts or sum(counts) != x.shape[0]:
            raise ValueError(
                f"counts must give {self.num_experts} row counts summing to {x.shape[0]}"
            )
        outs = [self.expert(e, rows) for e, rows in enumerate(x.split(counts))]
        return torch.cat(outs) if outs else x.new_empty((0, self.hidden))


def expert_major_order(recv_expert_counts: torch.Tensor) -> torch.Tensor | None:
    """Rows received as (source rank, local expert) blocks, ``recv_expert_counts [R, L]``,
    reordered into (local expert, source rank) blocks: the row order, or ``None`` when the two
    orders coincide (one source rank)."""
    ranks, local = recv_expert_counts.shape
    if ranks == 1:
        return None
    counts = recv_expert_counts.tolist()
    starts, at = [], 0
    for row in counts:
        starts.append([])
        for n in row:
            starts[-1].append(at)
            at += n
    blocks = [torch.arange(starts[r][e], starts[r][e] + counts[r][e])
              for e in range(local) for r in range(ranks)]
    return torch.cat(blocks) if blocks else torch.empty(0, dtype=torch.int64)
