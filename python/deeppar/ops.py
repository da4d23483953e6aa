"""Typed Python wrappers over the native ops (``torch.ops.deeppar.*``).

Each wrapper routes to the native kernel of the input's device when one is registered and to a
plain PyTorch reference otherwise. ``register_fake`` gives every op a shape function so that
``torch.compile`` can trace through it.
"""

from __future__ import annotations

import torch

from deeppar import _native

# Shape functions of every native op (here, in one place), so torch.compile can trace them.
if _native.NATIVE_LOADED:

    @torch.library.register_fake("deeppar::slot_loads")
    def _slot_loads_fake(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor):
        return weight.new_empty(phy2log.shape)

if _native.has_kernel("eplb_rebalance", "cpu") or _native.has_kernel("eplb_rebalance", "cuda"):

    @torch.library.register_fake("deeppar::eplb_rebalance")
    def _rebalance_fake(weight, num_replicas, num_groups, num_nodes, num_gpus):
        layers, experts = weight.shape
        slots = weight.new_empty((layers, num_replicas), dtype=torch.int64)
        counts = weight.new_empty((layers, experts), dtype=torch.int64)
        return slots, torch.empty_like(slots), counts

    @torch.library.register_fake("deeppar::eplb_rebalance_balanced")
    def _rebalance_balanced_fake(weight, num_replicas, num_groups, num_nodes, num_gpus):
        return _rebalance_fake(weight, num_replicas, num_groups, num_nodes, num_gpus)

    @torch.library.register_fake("deeppar::eplb_pack")
    def _pack_fake(weight, num_packs):
        out = weight.new_empty(weight.shape, dtype=torch.int64)
        return out, torch.empty_like(out)

    @torch.library.register_fake("deeppar::eplb_log2phy")
    def _log2phy_fake(phy2log, phy_rank, num_experts, width):
        return phy2log.new_empty((phy2log.shape[0], num_experts, width))

    @torch.library.register_fake("deeppar::eplb_replicate")
    def _replicate_fake(weight, num_phy):
        slots = weight.new_empty((weight.shape[0], num_phy), dtype=torch.int64)
        return slots, torch.empty_like(slots), weight.new_empty(weight.shape, dtype=torch.int64)


def slot_loads_reference(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor
) -> torch.Tensor:
    """Plain PyTorch ``slot_loads``: each physical slot's load, ``weight/logcnt`` of its expert."""
    return torch.gather(weight, 1, phy2log) / torch.gather(logcnt, 1, phy2log).to(weight.dtype)


def slot_loads(
    weight: torch.Tensor,
    phy2log: torch.Tensor,
    logcnt: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Load carried by each physical expert slot.

    Args:
        weight: ``[layers, experts]`` float32 expert loads.
        phy2log: ``[layers, replicas]`` int64, logical expert of each slot.
        logcnt: ``[layers, experts]`` int64, replica count of each expert.
    Returns:
        ``[layers, replicas]`` float32, ``weight[l, e] / logcnt[l, e]`` for the expert ``e`` of
        each slot.
        backend: ``None`` (native kernel of the device, else Triton, else reference),
            ``"native"``, ``"triton"`` or ``"reference"``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("weight must be a 2-D [layers, experts] tensor")
    if weight.dtype != torch.float32:
        raise TypeError(f"weight must be float32, got {weight.dtype}")
    if phy2log.dtype != torch.int64 or phy2log.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError("phy2log must be an int64 [layers, replicas] tensor matching weight")
    if logcnt.dtype != torch.int64 or logcnt.shape != weight.shape:
        raise ValueError("logcnt must be an int64 tensor shaped like weight")
    device = weight.device.type
    if backend is None:
        if _native.has_kernel("slot_loads", device):
            backend = "native"
        elif _native.triton_usable(weight.device):
            backend = "triton"
        else:
            backend = "reference"
    if backend == "native":
        if not _native.has_kernel("slot_loads", device):
            raise ValueError(
                f"backend='native': no native slot_loads kernel for {device} tensors "
                f"(native extension: {_native.NATIVE_ERROR or 'loaded without this kernel'})"
            )
        return torch.ops.deeppar.slot_loads(weight, phy2log, logcnt)
    if backend == "triton":
        if not _native.triton_usable(weight.device):
            raise ValueError(
                "backend='triton': Triton cannot run here (needs a CUDA tensor, or "
                "TRITON_INTERPRET=1 for CPU tensors)"
            )
        from deeppar.kernels.slot_loads import slot_loads_triton

        return slot_loads_triton(weight, phy2log, logcnt)
    if backend == "reference":
        return slot_loads_reference(weight, phy2log, logcnt)
    raise ValueError(
        f"backend must be None, 'native', 'triton' or 'reference', got {backend!r}"
    )
