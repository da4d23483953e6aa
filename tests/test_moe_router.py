"""Router: scores, group-limited top-k, selection-only bias, normalisation, scaling, errors."""

from __future__ import annotations

import pytest
import torch

from deeppar.moe import Router


def _naive_route(router: Router, x: torch.Tensor):
    """Token by token, written out as DeepSeek-V3 describes the gate."""
    ids, weights = [], []
    per_group = router.num_experts // router.n_group
    for row in x.detach():
        logits = router.weight.detach().float() @ row.float()
        scores = logits.softmax(-1) if router.score_func == "softmax" else logits.sigmoid()
        choice = scores + router.bias
        groups = choice.view(router.n_group, per_group)
        if router.score_func == "sigmoid" and per_group >= 2:
            group_score = groups.topk(2, -1).values.sum(-1)
        else:
            group_score = groups.max(-1).values
        kept = set(group_score.topk(router.topk_group).indices.tolist())
        allowed = [e for e in range(router.num_experts) if e // per_group in kept]
        best = sorted(allowed, key=lambda e: -float(choice[e]))[: router.top_k]
        w = scores[best]
        if router.norm_topk_prob:
            w = w / (w.sum() + 1e-20)
        ids.append(best)
        weights.append(w * router.routed_scaling_factor)
    return torch.tensor(ids), torch.stack(weights)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(score_func="softmax"),
        dict(score_func="sigmoid"),
        dict(score_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5),
        dict(score_func="softmax", n_group=8, topk_group=3),
        dict(score_func="sigmoid", n_group=16, topk_group=4),  # one expert per group
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_router_matches_naive_gate(kwargs, seed):
    torch.manual_seed(seed)
    router = Router(12, 16, 4, **kwargs)
    router.bias.copy_(torch.randn(16) * 0.05)
    x = torch.randn(20, 12)
    ids, weights = router(x)
    want_ids, want_weights = _naive_route(router, x)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)


def test_bias_changes_selection_not_weights():
    torch.manual_seed(0)
    router = Router(8, 6, 2, score_func="sigmoid", norm_topk_prob=False)
    x = torch.randn(5, 8)
    ids0, _ = router(x)
    router.bias[3] = 100.0  # expert 3 always chosen, its weight still its own score
    ids1, w1 = router(x)
    assert bool((ids1[:, 0] == 3).all()) and not torch.equal(ids0, ids1)
    scores = router.scores(x)
    assert torch.equal(w1, scores.gather(1, ids1))


def test_sigmoid_weights_normalised_and_scaled():
    router = Router(8, 6, 3, score_func="sigmoid", routed_scaling_factor=2.5)
    _, w = router(torch.randn(7, 8))
    torch.testing.assert_close(w.sum(-1), torch.full((7,), 2.5))


def test_weights_carry_gradient_to_router():
    router = Router(8, 6, 2)
    _, w = router(torch.randn(4, 8))
    w.sum().backward()
    assert router.weight.grad is not None and router.bias.grad is None


def test_empty_batch():
    ids, w = Router(8, 8, 2, score_func="sigmoid", n_group=4, topk_group=2)(torch.randn(0, 8))
    assert ids.shape == (0, 2) and w.shape == (0, 2)


def test_errors():
    with pytest.raises(ValueError, match="top_k=7 exceeds num_experts=6"):
        Router(8, 6, 7)
    with pytest.raises(ValueError, match="topk_group=3 exceeds n_group=2"):
        Router(8, 6, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="not divisible by n_group=4"):
        Router(8, 6, 2, n_group=4)
    with pytest.raises(ValueError, match="top_k=4 exceeds the 3 experts"):
        Router(8, 6, 4, n_group=2, topk_group=1)
    with pytest.raises(ValueError, match="score_func"):
        Router(8, 6, 2, score_func="relu")
    with pytest.raises(ValueError, match="x must be"):
        Router(8, 6, 2)(torch.randn(3, 5))
