"""A synthetic next-token task whose loss visibly falls within a few dozen steps.

Sequences follow a fixed random successor table: each next token is ``successor[token]`` with
probability ``1 - noise``, else uniform. A random table (not a permutation) makes some tokens
much more frequent than others, so the router sends unequal loads to the experts and EPLB has
something to balance. The best possible loss is the noise's entropy, far below ``log(vocab)``.
"""

from __future__ import annotations

import math

import torch


class NextTokenTask:
    """Batches of ``(inputs, labels)``, ``[batch, seq]`` int64, labels = inputs shifted by one.
    A batch depends only on (seed, step, shard): every process can rebuild any other's."""

    def __init__(self, vocab: int, seq: int, seed: int = 0, noise: float = 0.1) -> None:
        self.vocab, self.seq, self.seed, self.noise = vocab, seq, seed, noise
        g = torch.Generator().manual_seed(seed)
        self.successor = torch.randint(0, vocab, (vocab,), generator=g)

    def batch(self, step: int, shard: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + shard + 1)
        tokens = torch.empty(size, self.seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (size,), generator=g)
        for t in range(self.seq):
            follow = self.successor[tokens[:, t]]
            random = torch.randint(0, self.vocab, (size,), generator=g)
            keep = torch.rand(size, generator=g) >= self.noise
            tokens[:, t + 1] = torch.where(keep, follow, random)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def best_loss(self) -> float:
        """Entropy of the next token given the current one (nats): the loss floor."""
        p_hit = 1 - self.noise + self.noise / self.vocab
        p_miss = self.noise / self.vocab
        return -(p_hit * math.log(p_hit) + (self.vocab - 1) * p_miss * math.log(p_miss))


__all__ = ["NextTokenTask"]
