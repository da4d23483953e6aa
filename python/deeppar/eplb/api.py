"""Public EPLB functions, drop-in for DeepSeek's ``eplb`` module (same names and signatures).

``rebalance_experts`` picks the policy (hierarchical when ``num_groups % num_nodes == 0``, else
global), runs the planner core of the chosen backend and builds ``log2phy``. With
``max_replicas`` the output shapes are fixed in advance and nothing is read back to the host.
"""

from __future__ import annotations

import torch

from deeppar import _native
from deeppar.eplb import _backends, reference
from deeppar.eplb._validate import (
    LIMITS,
    Problem,
    as_count,
    as_weight,
    bad_values,
    check_problem,
    check_values,
)


def _sync_free(weight: torch.Tensor, max_replicas: int | None) -> bool:
    if max_replicas is None:
        return False
    return weight.device.type != "cpu" or torch.compiler.is_compiling()


def build_log2phy(
    phy2log: torch.Tensor, phy_rank: torch.Tensor, num_experts: int, width: int
) -> torch.Tensor:
    """``log2phy [L, E, width]``: slot of each (expert, replica rank), padded with -1.

    Replicas whose rank is ``>= width``: ValueError from the C++ kernel; dropped by the torch
    path (its callers check for them).
    """
    if phy2log.device.type == "cpu" and _native.has_kernel("eplb_log2phy", "cpu"):
        # One pass, no thread-pool round trips (which cost milliseconds on a busy machine).
        return torch.ops.deeppar.eplb_log2phy(phy2log, phy_rank, num_experts, width)
    layers, replicas = phy2log.shape
    flat = num_experts * width
    index = torch.where(phy_rank < width, phy2log * width + phy_rank, flat)
    out = torch.full((layers, flat + 1), -1, dtype=torch.int64, device=phy2log.device)
    slots = torch.arange(replicas, dtype=torch.int64, device=phy2log.device)
    out.scatter_(1, index, slots.expand(layers, replicas))
    return out[:, :flat].reshape(layers, num_experts, width)


def plan_maps(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str | None = None,
    max_replicas: int | None = None,
    method: str = "deepseek",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Problem, str]:
    """``rebalance_experts`` plus the checked problem and the backend that ran."""
    w = as_weight(weight)
    problem = check_problem(w, num_replicas, num_groups, num_nodes, num_gpus)
    if max_replicas is not None:
        max_replicas = as_count(max_replicas, "max_replicas")
    if _backends.check_method(method) == "balanced":
        name = _backends.resolve_balanced(backend, w.device)
    else:
        name = _backends.resolve(backend, w.device, problem)
        if name == "cpu" and _backends.fused_cpu(w):
            # Eager CPU: one op plans, checks the loads and builds log2phy.
            phy2log, log2phy, logcnt = torch.ops.deeppar.eplb_rebalance_maps(
                w, *problem.kernel_args, -1 if max_replicas is None else max_replicas
            )
            return phy2log, log2phy, logcnt, problem, name
    sync_free = _sync_free(w, max_replicas)
    # On CPU the C++ planner checks the loads and eplb_log2phy the width (ValueError), so a
    # compiled plan is only those ops: no Inductor reductions, whose OpenMP regions cost
    # milliseconds on a busy machine.
    native_checks = name == "cpu" and w.device.type == "cpu" and _native.has_kernel(
        "eplb_log2phy", "cpu"
    )
    if sync_free and not native_checks:
        torch._assert_async(
            ~bad_values(w), "weight must hold finite non-negative loads (NaN, inf or negative)"
        )
    elif w.device.type == "cpu" and name != "cpu":
        check_values(w)  # the C++ kernel checks (ValueError) while it plans: no extra pass
    planned = w
    if name == "cuda" and not sync_free:
        # The CUDA kernel asserts on bad loads (a device-side error ends the CUDA context);
        # here a bad load must raise ValueError after the single read below instead.
        planned = torch.where(torch.isfinite(w) & (w >= 0), w, 0.0)
    phy2log, phy_rank, logcnt = _backends.core(name, method)(planned, *problem.kernel_args)
    if max_replicas is None:
        if w.device.type == "cpu":
            width = int(logcnt.max())
        else:  # one device-to-host read: the width and the input check together
            width, bad = torch.stack([logcnt.max(), bad_values(w).long()]).tolist()
            if bad:
                check_values(w)
    else:
        width = max_replicas
        if sync_free and native_checks:
            pass  # eplb_log2phy raises if an expert needs more than max_replicas
        elif sync_free:
            torch._assert_async(
                (logcnt <= width).all(), "an expert needs more replicas than max_replicas"
            )
        else:
            needed = int(logcnt.max())
            if needed > width:
                raise ValueError(
                    f"max_replicas ({width}) is too small: an expert needs {needed} replicas"
                )
    log2phy = build_log2phy(phy2log, phy_rank, problem.experts, width)
    return phy2log, log2phy, logcnt, problem, name


def rebalance_experts(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
    *,
    backend: str | None = None,
    max_replicas: int | None = None,
    method: str = "deepseek",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan expert replicas and their placement on GPUs (DeepSeek EPLB, exact tie rules).

    Args:
        weight: ``[layers, experts]`` non-negative loads (any real or integer dtype; float32 used).
        num_replicas: physical expert slots per layer, a multiple of ``num_gpus``, >= experts.
        num_groups: expert groups; experts must be a multiple of it when the hierarchical
            policy runs (``num_groups % num_nodes == 0``); the global policy ignores it.
        num_nodes: server nodes; ``num_gpus`` must be a multiple of it under the
            hierarchical policy; the global policy ignores it.
        num_gpus: GPUs; slot ``s`` lives on GPU ``s // (num_replicas // num_gpus)``.
        backend: None (best for the device), "reference", "cpu", "cuda" or "triton".
        max_replicas: fixed width of ``log2phy``: no host sync, static shapes (CUDA graphs,
            torch.compile); an error if some expert needs more replicas.
        method: "deepseek" (the spec's algorithm, exact) or "balanced": the same replication
            and node rules with a better placement (max GPU load per layer never above
            "deepseek"'s, no duplicate replicas on a GPU where avoidable); C++ kernels for CPU
            and CUDA tensors (``backend`` None, "native", "cpu" or "cuda"; bit-identical plans).
    Returns:
        ``phy2log [L, R]``, ``log2phy [L, E, X]`` (-1 padded), ``logcnt [L, E]``; int64, on the
        input's device. ``X`` is ``max_replicas`` or the largest replica count.
    """
    phy2log, log2phy, logcnt, _, _ = plan_maps(
        weight, num_replicas, num_groups, num_nodes, num_gpus,
        backend=backend, max_replicas=max_replicas, method=method,
    )
    return phy2log, log2phy, logcnt


def rebalance_experts_hierarchical(
    weight: torch.Tensor,
    num_physical_experts: int,
    num_groups: int,
    num_nodes: int,
    num_gpus: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical policy alone: (phy2log ``[L, R]``, replica rank ``[L, R]``,
    logcnt ``[L, E]``)."""
    w = as_weight(weight)
    problem = check_problem(w, num_physical_experts, num_groups, num_nodes, num_gpus)
    if not problem.hierarchical:
        raise ValueError(
            f"num_groups ({problem.groups}) must be a multiple of num_nodes ({problem.nodes}) "
            "for the hierarchical policy"
        )
    name = _backends.resolve(None, w.device)
    check_values(w)  # this form returns data-dependent results anyway, so one sync is fine
    return _backends.core(name)(
        w, problem.replicas, problem.groups, problem.nodes, problem.gpus
    )


def _row_native(op: str, weight: torch.Tensor) -> bool:
    return _native.has_kernel(op, "cpu")


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack the ``n`` items of each row of ``weight [X, n]`` into ``num_packs`` packs of
    ``n / num_packs`` items: (pack index ``[X, n]``, rank in pack ``[X, n]``)."""
    w = as_weight(weight)
    packs = as_count(num_packs, "num_packs")
    if w.shape[1] % packs:
        raise ValueError(f"the number of items ({w.shape[1]}) must be a multiple of num_packs")
    check_values(w)
    if _row_native("eplb_pack", w):
        out = torch.ops.deeppar.eplb_pack(w.cpu(), packs)
    else:
        out = reference.balanced_packing(w.cpu(), packs)
    return tuple(t.to(w.device) for t in out)  # type: ignore[return-value]


def replicate_experts(
    weight: torch.Tensor, num_phy: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replicate the ``n`` experts of each row of ``weight [X, n]`` into ``num_phy`` slots:
    (phy2log ``[X, num_phy]``, replica rank ``[X, num_phy]``, logcnt ``[X, n]``)."""
    w = as_weight(weight)
    slots = as_count(num_phy, "num_phy")
    if slots < w.shape[1]:
        raise ValueError(f"num_phy ({slots}) must be at least the number of items "
                         f"({w.shape[1]})")
    LIMITS.check_replicas(slots, "num_phy")
    check_values(w)
    if _row_native("eplb_replicate", w):
        out = torch.ops.deeppar.eplb_replicate(w.cpu(), slots)
    else:
        out = reference.replicate_experts(w.cpu(), slots)
    return tuple(t.to(w.device) for t in out)  # type: ignore[return-value]
