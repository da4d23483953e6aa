"""EPLB backends: the planner's kernel size limits and the planner core of each backend.

Which backend runs is decided by :func:`deeppar.ops.resolve` (names and order shared by every
deeppar op); this module adds what only the planner knows: the shapes each kernel can take.

Every backend computes the same thing, the hierarchical policy of the spec for every row, and
returns ``(phy2log [L, R], phy_rank [L, R], logcnt [L, E])`` (int64, on the input's device);
they agree bit for bit on every input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deeppar import _native, ops
from deeppar.eplb import reference
from deeppar.eplb._validate import Problem
from deeppar.ops import BackendUnavailable

# The names of deeppar.ops; "native" is also accepted (the CPU or CUDA kernel of the weight's
# device).
BACKENDS = ops.BACKENDS

# Planning methods: "deepseek" is the spec's algorithm (every backend); "balanced" improves its
# placement (the C++ CPU kernel and the CUDA kernel, one algorithm: bit-identical plans; CUDA
# tensors go to the CUDA kernel, or to a host copy where it is not compiled).
METHODS = ("deepseek", "balanced")

Core = Callable[[torch.Tensor, int, int, int, int], tuple[torch.Tensor, ...]]


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
    """The backend to run (:func:`deeppar.ops.resolve`): ``backend`` itself (checked), or the
    best one for ``device`` that can take ``problem``'s sizes (a kernel's size limit skips it
    rather than failing)."""
    fits = None
    if problem is not None:
        def fits(name: str) -> str | None:
            return shape_reason(name, problem, device)
    return ops.resolve(ops.EPLB_PLANNER, backend, device, fits=fits)


def available(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can plan for a tensor on ``device`` now."""
    device = torch.device(device)
    return [b for b in BACKENDS if ops.unavailable_reason(ops.EPLB_PLANNER, b, device) is None]


def _on_cpu(fn: Core) -> Core:
    """Run ``fn`` on a CPU copy of the weight and move its results back."""

    def run(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
        if weight.device.type == "cpu":
            return fn(weight, *sizes)
        return tuple(t.to(weight.device) for t in fn(weight.cpu(), *sizes))

    return run


# deeppar::eplb_rebalance_maps: planner and log2phy in one CPU op (read once: a constant lookup).
_FUSED_CPU = _native.has_kernel("eplb_rebalance_maps", "cpu")


def fused_cpu(weight: torch.Tensor) -> bool:
    """Whether the eager CPU path can run as the single op ``eplb_rebalance_maps`` (traced code
    keeps the planner and log2phy ops apart, so that a sync-free compiled plan needs no
    data-dependent shape)."""
    return _FUSED_CPU and weight.device.type == "cpu" and not torch.compiler.is_compiling()


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


def resolve_balanced(backend: str | None, device: torch.device | str = "cpu") -> str:
    """The backend of ``method="balanced"`` for a weight on ``device``: its native kernel
    (``None``, ``"native"``, ``"cpu"`` or ``"cuda"``, as :func:`deeppar.ops.resolve`; ``None``
    takes the CUDA kernel for CUDA tensors where it is compiled, else a host copy on the CPU
    kernel). There is no reference or Triton implementation of it."""
    if backend in ("reference", "triton"):
        raise BackendUnavailable(
            f"EPLB backend {backend!r} does not implement method='balanced' (only the native "
            "'cpu' and 'cuda' kernels do; CUDA tensors may also be planned on a host copy)"
        )
    name = ops.resolve(ops.EPLB_BALANCED, backend, device)
    if name == "reference":  # no native kernel could run
        why = ops.unavailable_reason(ops.EPLB_BALANCED, "cpu", torch.device("cpu"))
        raise BackendUnavailable(f"method='balanced' needs the C++ kernel: {why}")
    return name


def _balanced_core(weight: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.ops.deeppar.eplb_rebalance_balanced(weight, *sizes)


def core(backend: str, method: str = "deepseek") -> Core:
    """The planner core of a resolved backend."""
    if method == "balanced":
        return _balanced_core if backend == "cuda" else _on_cpu(_balanced_core)
    if backend == "reference":
        return _on_cpu(reference.rebalance_hierarchical)
    if backend == "cpu":
        return _on_cpu(_native_core)
    if backend == "cuda":
        return _native_core
    if backend == "triton":
        return _triton_core
    raise ValueError(f"unknown EPLB backend {backend!r}")
