"""Argument checks of the EPLB planner: clear errors naming the argument and what was expected."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlannerLimits:
    """The planner's size limits, checked here for every backend (the C++ kernels check only
    what keeps their memory accesses safe).

    One reason for both: the spec's replication divides a load by a replica count in float32,
    exact for counts below 2^24 only, and the Triton kernel keys each expert by
    ``count << 24 | index``, so expert indices must fit in 24 bits.
    """

    experts_below: int = 1 << 24  # experts per layer
    replicas_below: int = 1 << 24  # physical slots per layer
    # Migration (deeppar.eplb.migration): num_gpus * max(experts, num_gpus). The native search
    # keeps dense [gpus, experts] and [gpus, gpus] int32 tables per thread; this keeps them
    # below 2^24 entries each (kMaxMigrationTableItems in csrc/op_checks.h).
    migration_table_below: int = 1 << 24

    def check_experts(self, experts: int, name: str = "weight") -> None:
        if experts >= self.experts_below:
            raise ValueError(
                f"{name} has too many experts ({experts}), at most {self.experts_below - 1}"
            )

    def check_replicas(self, replicas: int, name: str = "num_replicas") -> None:
        if replicas >= self.replicas_below:
            raise ValueError(f"{name} ({replicas}) must be below {self.replicas_below}")


    def check_migration(self, gpus: int, experts: int) -> None:
        size = gpus * max(experts, gpus)
        if size >= self.migration_table_below:
            raise ValueError(
                f"migration needs num_gpus * max(experts, num_gpus) below "
                f"{self.migration_table_below}, got num_gpus={gpus}, experts={experts} ({size})"
            )


LIMITS = PlannerLimits()


def as_count(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as a Python int >= ``minimum``; TypeError for non-integers, ValueError if small."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer, got a bool")
    try:
        number = operator.index(value)  # int, numpy integers, 0-d integer tensors
    except TypeError:
        got = f"{type(value).__name__} {value!r}"
        raise TypeError(f"{name} must be an integer, got {got}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def as_weight(weight: object, name: str = "weight") -> torch.Tensor:
    """``weight`` as a contiguous float32 2-D tensor on its own device (values not checked)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor [layers, experts], got {type(weight).__name__}"
        )
    if weight.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [layers, experts], got shape {tuple(weight.shape)}"
        )
    if weight.dtype == torch.bool or weight.is_complex():
        raise TypeError(f"{name} must hold real or integer loads, got dtype {weight.dtype}")
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least one layer and one expert, got shape {tuple(weight.shape)}"
        )
    LIMITS.check_experts(weight.shape[1], name)
    return weight.detach().to(torch.float32).contiguous()


def bad_values(weight: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether some load is negative, NaN or infinite (no host sync)."""
    return ~(torch.isfinite(weight) & (weight >= 0)).all()


def check_values(weight: torch.Tensor, name: str = "weight") -> None:
    """ValueError if ``weight`` (float32) holds a negative, NaN or infinite load (syncs)."""
    if bool(bad_values(weight)):
        if torch.isnan(weight).any():
            what = "a NaN value"
        elif torch.isinf(weight).any():
            what = "an infinite value (after conversion to float32)"
        else:
            what = "a negative value"
        raise ValueError(f"{name} must hold finite non-negative loads; found {what}")


@dataclass(frozen=True)
class Problem:
    """A checked planning problem: sizes and the policy that the spec picks for them."""

    layers: int
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int

    @property
    def hierarchical(self) -> bool:
        return self.groups % self.nodes == 0

    @property
    def policy(self) -> str:
        return "hierarchical" if self.hierarchical else "global"

    @property
    def kernel_args(self) -> tuple[int, int, int, int]:
        """(replicas, groups, nodes, gpus) of the hierarchical run that implements the policy."""
        if self.hierarchical:
            return self.replicas, self.groups, self.nodes, self.gpus
        return self.replicas, 1, 1, self.gpus


def check_problem(
    weight: torch.Tensor, num_replicas: object, num_groups: object, num_nodes: object,
    num_gpus: object,
) -> Problem:
    """Check the sizes against each other (spec "Signature": the rules of the policy that runs);
    ``weight`` is already 2-D."""
    layers, experts = weight.shape
    replicas = as_count(num_replicas, "num_replicas")
    groups = as_count(num_groups, "num_groups")
    nodes = as_count(num_nodes, "num_nodes")
    gpus = as_count(num_gpus, "num_gpus")
    # As in DeepSeek's planner, the group and node rules hold only for the hierarchical policy;
    # the global one ignores num_groups and num_nodes (it plans with one group and one node).
    if groups % nodes == 0:
        if experts % groups:
            raise ValueError(
                f"the number of experts ({experts}) must be a multiple of num_groups ({groups}) "
                "for the hierarchical policy (num_groups % num_nodes == 0)"
            )
        if gpus % nodes:
            raise ValueError(
                f"num_gpus ({gpus}) must be a multiple of num_nodes ({nodes}) "
                "for the hierarchical policy (num_groups % num_nodes == 0)"
            )
    if replicas % gpus:
        raise ValueError(f"num_replicas ({replicas}) must be a multiple of num_gpus ({gpus})")
    if replicas < experts:
        raise ValueError(
            f"num_replicas ({replicas}) must be at least the number of experts ({experts})"
        )
    LIMITS.check_replicas(replicas)
    return Problem(layers, experts, replicas, groups, nodes, gpus)
