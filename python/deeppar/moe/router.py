"""Top-k expert routing as in DeepSeek-V3: softmax or sigmoid scores, group-limited selection,
a per-expert bias used only to choose experts (auxiliary-loss-free balancing), routed scaling."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SCORE_FUNCS = ("softmax", "sigmoid")


class Router(nn.Module):
    """Gate ``x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] float32)``.

    Scores are computed in float32. With ``n_group > 1`` the experts form ``n_group`` equal
    groups; each token keeps its ``topk_group`` best groups (a group's score is the sum of its
    two best biased scores for sigmoid, as in V3, its best score for softmax, as in V2) and picks
    its ``top_k`` experts among them. ``bias`` (a buffer, zeros at first) shifts the scores used
    for selection only; the weights come from the unbiased scores. For sigmoid the top-k weights
    are normalised to sum to 1 (``norm_topk_prob``, default on for sigmoid only); finally they
    are multiplied by ``routed_scaling_factor``. Ids of one token are ordered by descending
    biased score (``torch.topk``), which fixes the top-k order that combine sums in.
    """

    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        norm_topk_prob: bool | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden", hidden), ("num_experts", num_experts), ("top_k", top_k),
                            ("n_group", n_group), ("topk_group", topk_group)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        if num_experts % n_group:
            raise ValueError(f"num_experts={num_experts} is not divisible by n_group={n_group}")
        if topk_group > n_group:
            raise ValueError(f"topk_group={topk_group} exceeds n_group={n_group}")
        if topk_group * (num_experts // n_group) < top_k:
            raise ValueError(
                f"top_k={top_k} exceeds the {topk_group * (num_experts // n_group)} experts of "
                f"the topk_group={topk_group} groups a token may use"
            )
        self.hidden, self.num_experts, self.top_k = hidden, num_experts, top_k
        self.score_func, self.n_group, self.topk_group = score_func, n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.norm_topk_prob = score_func == "sigmoid" if norm_topk_prob is None else norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=dtype, device=device))
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=hidden**-0.5)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"score_func={self.score_func}, n_group={self.n_group}, "
                f"topk_group={self.topk_group}")

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` float32 affinity of each token for each expert (no bias)."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()

    def _group_mask(self, choice: torch.Tensor) -> torch.Tensor:
        tokens = choice.shape[0]
        grouped = choice.view(tokens, self.n_group, self.num_experts // self.n_group)
        if self.score_func == "sigmoid" and grouped.shape[-1] >= 2:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(-1)
        keep = group_scores.topk(self.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, self.num_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [tokens, {self.hidden}], got {tuple(x.shape)}")
        scores = self.scores(x)
        choice = scores.detach() + self.bias
        if self.n_group > 1:
            choice = choice.masked_fill(~self._group_mask(choice), float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor
