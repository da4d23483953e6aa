"""The ops layer: backend choice for every deeppar op, typed wrappers over the native ops
(``torch.ops.deeppar.*``) and their shape functions.

Backend names, the same for every op:

* ``"native"``: the op's own kernel for the tensor's device, compiled in ``deeppar._C``;
* ``"cpu"`` / ``"cuda"``: ``"native"`` spelled by device, as DeepSeek's ``eplb`` names its
  backends; the EPLB planner also accepts ``"cpu"`` for CUDA tensors (planned on a host copy);
* ``"triton"``: the Triton kernel (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
* ``"reference"``: plain PyTorch or Python, the oracle of the tests.

:func:`resolve` turns a requested name (or ``None``: the fastest that can run) into one of
:data:`BACKENDS`. ``register_fake`` gives every native op a shape function so that
``torch.compile`` can trace through it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deeppar import _native

# What resolve() returns: the native kernel of a device ("cpu", "cuda"), "triton", "reference".
BACKENDS = ("reference", "cpu", "cuda", "triton")
NATIVE = "native"  # the native kernel of the tensor's device
_TRITON_HOW = "Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"


class BackendUnavailable(ValueError):
    """The requested backend cannot run here (not compiled, no GPU, no triton, ...)."""


@dataclass(frozen=True)
class Op:
    """The backends one op has.

    ``kernel``: the ``torch.ops.deeppar`` op whose kernel registrations make ``"native"`` usable
    per device; ``None`` when the native path is plain PyTorch (any device; then Triton, a fused
    kernel, is preferred on CUDA). ``triton``: module of the Triton kernel (``None``: none).
    ``host_copy``: the CPU kernel also serves other devices through a host copy.
    """

    label: str
    kernel: str | None
    triton: str | None = None
    host_copy: bool = False


SLOT_LOADS = Op("slot_loads", "slot_loads", "deeppar.kernels.slot_loads")
EPLB_PLANNER = Op("EPLB", "eplb_rebalance", "deeppar.kernels.eplb_triton", host_copy=True)
EPLB_BALANCED = Op("EPLB method='balanced'", "eplb_rebalance_balanced", host_copy=True)
MOE_PERMUTE = Op("moe_permute", "moe_permute", "deeppar.kernels.moe_permute")
REPLICA_ROUTING = Op("replica routing", "route_replicas", "deeppar.kernels.replica_routing")


def _native_reason(op: Op, device: str) -> str | None:
    if op.kernel is None:
        return None
    if not _native.NATIVE_LOADED:
        return f"the native extension deeppar._C is not loaded ({_native.NATIVE_ERROR})"
    if not _native.has_kernel(op.kernel, device):
        if device == "cuda":
            return "deeppar._C was built without CUDA kernels (torch or toolkit without CUDA)"
        return f"deeppar._C has no CPU kernel for {op.kernel} (rebuild the extension)"
    return None


def unavailable_reason(op: Op, backend: str, device: torch.device) -> str | None:
    """Why ``op`` cannot run ``backend`` (one of :data:`BACKENDS`) for a tensor on ``device``;
    None when it can."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device.type != backend and not (backend == "cpu" and op.host_copy):
            return f"it runs on {backend.upper()} tensors and the input is on {device}"
        return _native_reason(op, backend)
    if backend == "triton":
        if op.triton is None or importlib.util.find_spec(op.triton) is None:
            return f"{op.label} has no Triton kernel in this build"
        ok, why = _native.triton_status()
        if not ok:
            return f"triton cannot be imported ({why})"
        if not _native.triton_usable(device):
            if device.type == "cuda":
                return "no CUDA device is available"
            return f"Triton cannot run here ({_TRITON_HOW}); the input is on {device}"
        return None
    raise ValueError(
        f"backend must be None, {NATIVE!r} or one of {', '.join(map(repr, BACKENDS))}; "
        f"got {backend!r}"
    )


def auto_order(op: Op, device: torch.device) -> tuple[str, ...]:
    """Backends tried, in order, when none is named: the device's compiled kernel, Triton
    where it is compiled (CUDA; the interpreter runs only when asked by name), a host copy on
    the CPU kernel, the reference. A plain-PyTorch native path comes after Triton."""
    here = device.type if device.type in ("cpu", "cuda") else "reference"
    order = [here] if op.kernel is not None else []
    if device.type == "cuda":
        order.append("triton")
    if op.kernel is None:
        order.append(here)
    if op.host_copy and here != "cpu":
        order.append("cpu")
    order.append("reference")
    return tuple(dict.fromkeys(order))


def resolve(
    op: Op,
    backend: str | None,
    device: torch.device | str,
    *,
    fits: Callable[[str], str | None] | None = None,
    aliases: dict[str, str] | None = None,
) -> str:
    """The backend (one of :data:`BACKENDS`) that runs ``op`` for a tensor on ``device``.

    ``backend`` names one (checked: :class:`BackendUnavailable` says why it cannot run; an
    unknown name is a ValueError); ``None`` picks the first usable of :func:`auto_order`.
    ``fits(name)`` gives why a kernel's size limits exclude the problem (None if they do not);
    under ``None`` such a kernel is skipped rather than failing. ``aliases`` maps an op's own
    earlier spellings to names here.
    """
    device = torch.device(device)
    if backend is None:
        for name in auto_order(op, device):
            if unavailable_reason(op, name, device) is None and (
                fits is None or fits(name) is None
            ):
                return name
        return "reference"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
    name = (aliases or {}).get(backend, backend)
    if name == NATIVE:
        name = device.type
    why = unavailable_reason(op, name, device)
    if why is None and fits is not None:
        why = fits(name)
    if why is not None:
        raise BackendUnavailable(f"{op.label} backend {backend!r} is not available: {why}")
    return name


# Shape functions of every native op (here, in one place), so torch.compile can trace them.
if _native.NATIVE_LOADED:

    @torch.library.register_fake("deeppar::slot_loads")
    def _slot_loads_fake(weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor):
        return weight.new_empty(phy2log.shape)

if _native.has_kernel("route_replicas", "cpu") or _native.has_kernel("route_replicas", "cuda"):

    @torch.library.register_fake("deeppar::route_replicas")
    def _route_replicas_fake(topk_ids, log2phy, logcnt, token_offset, local_gpu, slots_per_gpu,
                             gpus_per_node):
        return topk_ids.new_empty(topk_ids.shape, dtype=torch.int64)

if _native.has_kernel("expert_counts_add_", "cpu"):

    @torch.library.register_fake("deeppar::expert_counts_add_")
    def _expert_counts_add_fake(counts, topk_ids):
        return None

if _native.has_kernel("eplb_rebalance", "cpu") or _native.has_kernel("eplb_rebalance", "cuda"):

    @torch.library.register_fake("deeppar::eplb_rebalance")
    def _rebalance_fake(weight, num_replicas, num_groups, num_nodes, num_gpus):
        layers, experts = weight.shape
        slots = weight.new_empty((layers, num_replicas), dtype=torch.int64)
        counts = weight.new_empty((layers, experts), dtype=torch.int64)
        return slots, torch.empty_like(slots), counts

    @torch.library.register_fake("deeppar::eplb_rebalance_maps")
    def _rebalance_maps_fake(weight, num_replicas, num_groups, num_nodes, num_gpus,
                             max_replicas):
        slots, _, counts = _rebalance_fake(weight, num_replicas, num_groups, num_nodes, num_gpus)
        width = max_replicas if max_replicas >= 0 else torch.library.get_ctx().new_dynamic_size()
        return slots, weight.new_empty((*counts.shape, width), dtype=torch.int64), counts

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


if _native.has_kernel("eplb_migrate", "cpu"):

    @torch.library.register_fake("deeppar::eplb_migrate")
    def _migrate_fake(weight, current, fresh, target, cap, num_groups, num_nodes, num_gpus,
                      max_steps):
        return torch.empty_like(current), current.new_empty((current.shape[0],),
                                                            dtype=torch.bool)

    @torch.library.register_fake("deeppar::eplb_relabel")
    def _relabel_fake(current, plan, num_gpus, num_nodes):
        return torch.empty_like(plan)

    @torch.library.register_fake("deeppar::eplb_source_slots")
    def _source_slots_fake(current, plan, num_gpus, num_nodes):
        return torch.empty_like(plan)


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
        backend: ``None`` (see :func:`resolve`), ``"native"`` (or ``"cpu"``/``"cuda"``),
            ``"triton"`` or ``"reference"``.
    Returns:
        ``[layers, replicas]`` float32, ``weight[l, e] / logcnt[l, e]`` for the expert ``e`` of
        each slot.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError("weight must be a 2-D [layers, experts] tensor")
    if weight.dtype != torch.float32:
        raise TypeError(f"weight must be float32, got {weight.dtype}")
    if phy2log.dtype != torch.int64 or phy2log.dim() != 2 or phy2log.shape[0] != weight.shape[0]:
        raise ValueError("phy2log must be an int64 [layers, replicas] tensor matching weight")
    if logcnt.dtype != torch.int64 or logcnt.shape != weight.shape:
        raise ValueError("logcnt must be an int64 tensor shaped like weight")
    name = resolve(SLOT_LOADS, backend, weight.device)
    if name == "triton":
        from deeppar.kernels.slot_loads import slot_loads_triton

        return slot_loads_triton(weight, phy2log, logcnt)
    if name == "reference":
        return slot_loads_reference(weight, phy2log, logcnt)
    return torch.ops.deeppar.slot_loads(weight, phy2log, logcnt)
