"""EPLB backends: which exist, which can run on a device, and the planner core of each.

Every backend computes the same thing, the hierarchical policy of the spec for every row, and
returns ``(phy2log [L, R], phy_rank [L, R], logcnt [L, E])`` (int64, on the input's device);
they agree bit for bit on every input.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from deeppar import _native, ops  # noqa: F401  (ops registers the fakes of the eplb ops)
from deeppar.eplb import reference
from deeppar.eplb._validate import Problem

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Planning methods: "deepseek" is the spec's algorithm (every backend); "balanced" improves its
# placement (C++ CPU kernel only; inputs on another device are planned on a host copy).
METHODS = ("deepseek", "balanced")

Core = Callable[[torch.Tensor, int, int, int, int], tuple[torch.Tensor, ...]]

class BackendUnavailable(ValueError):
    """The requested backend cannot run here (not compiled, no GPU, no triton, ...)."""


def _native_reason(device: str) -> str | None:
    if not _native.NATIVE_LOADED:
        return f"the native extension deeppar._C is not loaded ({_native.NATIVE_ERROR})"
    if not _native.has_kernel("eplb_rebalance", device):
        if device == "cuda":
            return "deeppar._C was built without CUDA kernels (torch or toolkit without CUDA)"
        return "deeppar._C has no CPU kernel for eplb_rebalance (rebuild the extension)"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot plan for a tensor on ``device``; None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return _native_reason("cpu")
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors and weight is on {device}"
        return _native_reason("cuda")
    if backend == "triton":
        if importlib.util.find_spec("deeppar.kernels.eplb_triton") is None:
            return "the Triton EPLB kernel is not part of this build"
        ok, why = _native.triton_status()
        if not ok:
            return f"triton cannot be imported ({why})"
        if not _native.triton_usable(device):
            if device.type == "cuda":
                return "no CUDA device is available"
            return (
                "triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1); "
                f"weight is on {device}"
            )
        return None
    raise ValueError(f"backend must be None or one of {', '.join(BACKENDS)}; got {backend!r}")


def cuda_smem_bytes(experts: int, replicas: int, groups: int, gpus: int) -> int:
    """Shared memory one block of the CUDA kernel needs (``Layout`` in
    csrc/cuda/eplb_kernel.cuh): 4-byte words for 5 per-expert, 3 per-group, 6 per-slot and
    2 per-GPU arrays."""
    return 4 * (5 * experts + 3 * groups + 6 * replicas + 2 * gpus)


def _cuda_smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 48 * 1024))


def shape_reason(
    backend: str, problem: Problem, device: torch.device, smem_limit: int | None = None
) -> str | None:
    """Why ``backend`` cannot plan ``problem`` (a size limit of its kernel); None when it can.
    ``smem_limit`` overrides the CUDA device's shared memory per block (tests)."""
    replicas, groups, nodes, gpus = problem.kernel_args
    if backend == "cuda":
        need = cuda_smem_bytes(problem.experts, replicas, groups, gpus)
        limit = _cuda_smem_limit(device) if smem_limit is None else smem_limit
        if need > limit:
            return (
                f"this problem needs {need} bytes of shared memory per layer, the GPU offers "
                f"{limit} per block"
            )
    if backend == "triton":  # only asked once triton imports (unavailable_reason is None)
        from deeppar.kernels.eplb_triton import MAX_BLOCK

        if max(groups, replicas // nodes) > MAX_BLOCK:
            return f"the Triton kernel handles at most {MAX_BLOCK} items per row and node"
    return None


def resolve(
    backend: str | None, device: torch.device, problem: Problem | None = None
) -> str:
    """The backend to run: ``backend`` itself (checked), or the best one for ``device`` that
    can take ``problem``'s sizes (a kernel's size limit skips it rather than failing)."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
        why = unavailable_reason(backend, device)
        if why is None and problem is not None:
            why = shape_reason(backend, problem, device)
        if why is not None:
            raise BackendUnavailable(f"EPLB backend {backend!r} is not available: {why}")
        return backend
    if device.type == "cuda":
        order: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
    else:
        order = ("cpu", "reference")
    for name in order:
        if unavailable_reason(name, device) is None and (
            problem is None or shape_reason(name, problem, device) is None
        ):
            return name
    return "reference"


def available(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can plan for a tensor on ``device`` now."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]


def _on_cpu(fn: Core) -> Core:
    """Run ``fn`` on a CPU copy of the weight and move its results back."""

    def run(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
        if weight.device.type == "cpu":
            return fn(weight, *sizes)
        return tuple(t.to(weight.device) for t in fn(weight.cpu(), *sizes))

    return run


def _native_core(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.ops.deeppar.eplb_rebalance(weight, *sizes)


def _triton_core(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    """Triton kernel on the weight's device (CUDA, or CPU under TRITON_INTERPRET=1); imported
    on first use because importing it imports triton."""
    from deeppar.kernels.eplb_triton import eplb_rebalance_triton

    return eplb_rebalance_triton(weight, *sizes)


def check_method(method: object) -> str:
    """``method`` if it is one of :data:`METHODS`, else ValueError."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    return method  # type: ignore[return-value]


def resolve_balanced(backend: str | None) -> str:
    """The backend of ``method="balanced"``: the C++ CPU kernel (``None`` or ``"cpu"``)."""
    if backend is not None and backend != "cpu":
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be None or one of {', '.join(BACKENDS)}; got {backend!r}"
            )
        raise BackendUnavailable(
            f"EPLB backend {backend!r} does not implement method='balanced' (only 'cpu' does; "
            "tensors on other devices are planned on a host copy)"
        )
    if not _native.has_kernel("eplb_rebalance_balanced", "cpu"):
        raise BackendUnavailable(
            "method='balanced' needs the C++ kernel eplb_rebalance_balanced: "
            f"{_native_reason('cpu') or 'rebuild the extension'}"
        )
    return "cpu"


def _balanced_core(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.ops.deeppar.eplb_rebalance_balanced(weight, *sizes)


def core(backend: str, method: str = "deepseek") -> Core:
    """The planner core of a resolved backend."""
    if method == "balanced":
        return _on_cpu(_balanced_core)
    if backend == "reference":
        return _on_cpu(reference.rebalance_hierarchical)
    if backend == "cpu":
        return _on_cpu(_native_core)
    if backend == "cuda":
        return _native_core
    if backend == "triton":
        return _triton_core
    raise ValueError(f"unknown EPLB backend {backend!r}")
