"""Helpers of the EPLB tests: random problems and plan invariants."""

from __future__ import annotations

import random

import torch

# Shapes (layers, experts, replicas, groups, nodes, gpus) covering both policies, odd sizes,
# no redundancy, one expert per GPU and one node.
SHAPES = [
    (1, 4, 4, 1, 1, 1),
    (2, 12, 16, 4, 2, 8),
    (3, 6, 9, 3, 1, 3),
    (5, 16, 24, 4, 2, 4),
    (4, 16, 20, 4, 4, 4),
    (3, 16, 24, 8, 3, 6),  # 8 % 3 != 0: global policy
    (7, 32, 40, 8, 4, 8),
    (2, 10, 10, 5, 5, 5),
    (6, 24, 48, 6, 2, 12),
    (3, 64, 72, 8, 4, 8),
    (2, 32, 66, 4, 3, 66),  # global, one replica per GPU
    (4, 9, 27, 3, 1, 9),
]

# The spec's worked example: weight, (layers, experts, replicas, groups, nodes, gpus), phy2log.
WORKED_WEIGHT = torch.tensor([
    [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
    [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
])
WORKED_SHAPE = (2, 12, 16, 4, 2, 8)
WORKED_PHY2LOG = torch.tensor([
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
])


def random_weight(layers: int, experts: int, kind: str, seed: int) -> torch.Tensor:
    """Loads of one of several kinds: 'real' (skewed floats), 'int' (few distinct values: many
    ties), 'zero', 'sparse' (mostly zero) or 'half' (float16 values)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "real":
        return torch.rand(layers, experts, generator=g) ** 3 * 1000
    if kind == "int":
        return torch.randint(0, 4, (layers, experts), generator=g)
    if kind == "zero":
        return torch.zeros(layers, experts)
    if kind == "sparse":
        w = torch.randint(0, 50, (layers, experts), generator=g).float()
        return w * (torch.rand(layers, experts, generator=g) < 0.2)
    if kind == "half":
        return (torch.rand(layers, experts, generator=g) * 100).half()
    raise ValueError(kind)


def random_shape(rng: random.Random) -> tuple[int, int, int, int, int, int]:
    """A random valid (layers, experts, replicas, groups, nodes, gpus)."""
    nodes = rng.choice([1, 1, 2, 3, 4])
    gpus = nodes * rng.randint(1, 4)
    groups = nodes * rng.randint(1, 3) if rng.random() < 0.7 else rng.randint(1, 6)
    experts = groups * rng.randint(1, 6)
    per_gpu = -(-experts // gpus) + rng.randint(0, 2)
    return rng.randint(1, 4), experts, gpus * per_gpu, groups, nodes, gpus


def check_invariants(weight, phy2log, log2phy, logcnt, replicas, groups, nodes, gpus) -> None:
    """Consistency of the three maps, and the node constraint of the hierarchical policy."""
    layers, experts = weight.shape
    assert phy2log.shape == (layers, replicas) and phy2log.dtype == torch.int64
    assert logcnt.shape == (layers, experts) and logcnt.dtype == torch.int64
    assert log2phy.shape[:2] == (layers, experts) and log2phy.dtype == torch.int64
    assert (logcnt >= 1).all() and (logcnt.sum(1) == replicas).all()
    counted = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    assert torch.equal((log2phy >= 0).sum(-1), logcnt)
    for layer in range(layers):
        for e in range(experts):
            slots = log2phy[layer, e]
            slots = slots[slots >= 0]
            assert (phy2log[layer, slots] == e).all()
            # Valid entries first, then -1 padding.
            assert (log2phy[layer, e, : int(logcnt[layer, e])] >= 0).all()
    if groups % nodes == 0:
        slots_per_node = replicas // nodes
        group_size = experts // groups
        node_of_slot = torch.arange(replicas) // slots_per_node
        for layer in range(layers):
            group_node = {}
            for s in range(replicas):
                g = int(phy2log[layer, s]) // group_size
                assert group_node.setdefault(g, int(node_of_slot[s])) == int(node_of_slot[s])
