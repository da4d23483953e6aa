"""Replica routing: send each (token, logical expert) to one physical slot of that expert.

Rule (the same in every backend): token ``t`` (row of ``topk_ids``) goes to replica
``(t + token_offset) % n`` of its expert, counted among the candidate replicas in ``log2phy``
order, where the candidates are the expert's replicas on ``local_gpu`` if it has any there,
else those on ``local_gpu``'s node (when ``gpus_per_node`` is given) if any, else all ``n =
logcnt[e]`` of them. A stream of tokens is thus spread round-robin over an expert's replicas,
deterministically; ``token_offset`` (e.g. this rank's first global token index, or a step
counter) keeps ranks that each route a single token from all picking the first replica.

The locality tiers depend only on the expert: the CPU op and the torch path resolve them once
per expert per call (the CUDA kernel scans the expert's few replicas per pair).

Backends (names and choice of :func:`deeppar.ops.resolve`): ``"native"`` (also
``"cpu"``/``"cuda"``): the compiled op ``deeppar::route_replicas``, one fused pass over the ids
(CPU: parallel over tokens; CUDA: one thread per pair); ``"triton"`` (the per-token part as one
fused kernel, a custom op; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``); ``"torch"``
(vectorised PyTorch over ``replica_candidates``, any device; what runs when no kernel can);
``"reference"`` (Python loops per token, the oracle).
"""

from __future__ import annotations

import torch

from deeppar import _native, ops

TORCH = "torch"  # the vectorised PyTorch path: any device, no compiled kernel
_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check(topk_ids, log2phy, logcnt, local_gpu, slots_per_gpu, gpus_per_node):
    """Types and shapes (cheap, every backend); the values are :func:`_check_values`'s."""
    for name, t in (("topk_ids", topk_ids), ("log2phy", log2phy), ("logcnt", logcnt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _ID_DTYPES:
            raise TypeError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, k], got shape {tuple(topk_ids.shape)}")
    if log2phy.dim() != 2 or log2phy.shape[1] < 1:
        raise ValueError(f"log2phy must be one layer's [experts, max_replicas], got shape "
                         f"{tuple(log2phy.shape)}")
    if tuple(logcnt.shape) != (log2phy.shape[0],):
        raise ValueError(f"logcnt must be [experts={log2phy.shape[0]}], got shape "
                         f"{tuple(logcnt.shape)}")
    if not (topk_ids.device == log2phy.device == logcnt.device):
        raise ValueError("topk_ids, log2phy and logcnt must be on one device")
    if local_gpu is not None:
        if isinstance(local_gpu, bool) or not isinstance(local_gpu, int) or local_gpu < 0:
            raise ValueError(f"local_gpu must be a GPU index >= 0 or None, got {local_gpu!r}")
        if isinstance(slots_per_gpu, bool) or not isinstance(slots_per_gpu, int) or (
            slots_per_gpu < 1
        ):
            raise ValueError("slots_per_gpu (a positive int) is required with local_gpu, "
                             f"got {slots_per_gpu!r}")
    if gpus_per_node is not None:
        if local_gpu is None:
            raise ValueError("gpus_per_node needs local_gpu")
        if isinstance(gpus_per_node, bool) or not isinstance(gpus_per_node, int) or (
            gpus_per_node < 1
        ):
            raise ValueError(f"gpus_per_node must be a positive int, got {gpus_per_node!r}")


def _check_values(topk_ids, log2phy, logcnt):
    """Ids in [0, experts) and counts in [1, width], for the backends whose kernels do not check
    them (the native CPU op checks them in its own pass over the ids)."""
    experts = log2phy.shape[0]
    if topk_ids.numel() == 0:
        return
    if topk_ids.device.type == "cpu":
        low, high = (int(v) for v in torch.aminmax(topk_ids))
        if low < 0 or high >= experts:
            bad = low if low < 0 else high
            raise ValueError(f"topk_ids holds expert id {bad}, outside [0, {experts})")
        width = log2phy.shape[1]
        if int(logcnt.min()) < 1 or int(logcnt.max()) > width:
            raise ValueError(f"logcnt must be in [1, {width}] (the width of log2phy)")
    else:  # no host read on devices: a device-side assert
        torch._assert_async(((topk_ids >= 0) & (topk_ids < experts)).all(),
                            "topk_ids holds an expert id outside [0, experts)")


def replica_candidates(log2phy: torch.Tensor, logcnt: torch.Tensor,
                       local_gpu: int | None = None, slots_per_gpu: int | None = None,
                       gpus_per_node: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's candidate replicas, compacted: (slots ``[E, X]`` int64 with the
    candidates first in ``log2phy`` order, their number ``[E]`` int64). The locality tiers
    depend on the expert only, so they are resolved here once, not per token (no host sync)."""
    log2phy, logcnt = log2phy.long(), logcnt.long()
    if local_gpu is None:
        return log2phy, logcnt
    valid = torch.arange(log2phy.shape[1], device=log2phy.device) < logcnt[:, None]
    gpu = torch.div(log2phy, slots_per_gpu, rounding_mode="floor")
    tier = valid
    if gpus_per_node is not None:
        near = valid & (gpu // gpus_per_node == local_gpu // gpus_per_node)
        tier = torch.where(near.any(1, keepdim=True), near, tier)
    here = valid & (gpu == local_gpu)
    tier = torch.where(here.any(1, keepdim=True), here, tier)
    order = torch.sort((~tier).to(torch.uint8), dim=1, stable=True).indices
    return log2phy.gather(1, order), tier.sum(1)


def route_torch(topk_ids: torch.Tensor, table: torch.Tensor, count: torch.Tensor,
                token_offset: int = 0) -> torch.Tensor:
    """Vectorised PyTorch routing over :func:`replica_candidates`; ``[tokens, k]`` int64."""
    ids = topk_ids.long()
    order = torch.arange(ids.shape[0], device=ids.device)[:, None] + token_offset
    return table[ids, torch.remainder(order, count[ids])]


def route_reference(topk_ids: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                    token_offset: int = 0, local_gpu: int | None = None,
                    slots_per_gpu: int | None = None,
                    gpus_per_node: int | None = None) -> torch.Tensor:
    """The routing rule with Python loops (the oracle of the tests)."""
    table, counts = log2phy.tolist(), logcnt.tolist()
    out = []
    for t, row in enumerate(topk_ids.tolist()):
        chosen = []
        for e in row:
            slots = table[e][: counts[e]]
            if local_gpu is not None:
                here = [s for s in slots if s // slots_per_gpu == local_gpu]
                near = []
                if gpus_per_node is not None:
                    node = local_gpu // gpus_per_node
                    near = [s for s in slots if s // slots_per_gpu // gpus_per_node == node]
                slots = here or near or slots
            chosen.append(slots[(t + token_offset) % len(slots)])
        out.append(chosen)
    return torch.tensor(out, dtype=torch.int64).view(topk_ids.shape)


def _int64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 else t.long()


def _backend(backend: str | None, device: torch.device) -> str:
    """The path that runs: one of :data:`deeppar.ops.BACKENDS` or :data:`TORCH`."""
    if backend is None and device.type == "cpu" and _native.has_kernel("route_replicas", "cpu"):
        return "cpu"  # the common case, without resolve's bookkeeping (decode sizes take ~us)
    if backend == TORCH:
        return TORCH
    name = ops.resolve(ops.REPLICA_ROUTING, backend, device)
    # With no kernel for the device (or the extension not built), vectorised PyTorch, not the
    # Python loops of the reference.
    return TORCH if backend is None and name == "reference" else name


def route_to_replicas(
    topk_ids: torch.Tensor,
    log2phy: torch.Tensor,
    logcnt: torch.Tensor,
    *,
    token_offset: int = 0,
    local_gpu: int | None = None,
    slots_per_gpu: int | None = None,
    gpus_per_node: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Physical slot of each (token, logical expert).

    Args:
        topk_ids: ``[tokens, k]`` logical expert ids from the router (any integer dtype).
        log2phy: ``[experts, X]`` one layer's slots per expert (valid first, -1 padded), as
            ``rebalance_experts`` returns them (``log2phy[layer]``).
        logcnt: ``[experts]`` replicas of each expert (``logcnt[layer]``).
        token_offset: added to the token index before the round-robin (see module doc).
        local_gpu: the GPU these tokens are on: prefer replicas there (needs
            ``slots_per_gpu``), then on its node if ``gpus_per_node`` is given.
        backend: None (the device's native op, else Triton on CUDA when usable, else
            "torch"), "native" (also "cpu"/"cuda"), "triton", "torch" or "reference".
    Returns:
        ``[tokens, k]`` int64 physical slots, on the input's device.
    """
    _check(topk_ids, log2phy, logcnt, local_gpu, slots_per_gpu, gpus_per_node)
    offset = int(token_offset)
    device = topk_ids.device
    name = _backend(backend, device)
    if name in ("cpu", "cuda"):  # the kernels check the values (CUDA: device-side assert)
        return torch.ops.deeppar.route_replicas.default(
            topk_ids, _int64(log2phy), _int64(logcnt), offset,
            -1 if local_gpu is None else local_gpu, slots_per_gpu or 0, gpus_per_node or 0)
    _check_values(topk_ids, log2phy, logcnt)
    if name == "reference":
        out = route_reference(topk_ids.cpu(), log2phy.cpu(), logcnt.cpu(), offset, local_gpu,
                              slots_per_gpu, gpus_per_node)
        return out.to(device)
    table, count = replica_candidates(log2phy, logcnt, local_gpu, slots_per_gpu, gpus_per_node)
    if name == "triton":
        from deeppar.kernels.replica_routing import route_replicas_triton

        tokens, k = topk_ids.shape
        return route_replicas_triton(topk_ids.reshape(-1), table, count, k, offset).view(
            tokens, k)
    return route_torch(topk_ids, table, count, offset)
