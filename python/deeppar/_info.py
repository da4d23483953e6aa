"""What ``deeppar info`` reports."""

from __future__ import annotations

import platform
from typing import Any


def _triton_kernels() -> list[str]:
    """Modules of ``deeppar.kernels`` (the Triton kernels shipped)."""
    import pkgutil

    import deeppar.kernels

    return sorted(m.name for m in pkgutil.iter_modules(deeppar.kernels.__path__))


def _moe_info(cuda_available: bool) -> dict[str, Any]:
    """Backends of the MoE permute / unpermute kernels and the SM-partitioning levers."""
    from deeppar import _native
    from deeppar.moe.sm_budget import sm_budget_info

    ops = ("moe_permute", "moe_unpermute")
    return {
        "permute_backends": {
            "native_cpu": all(_native.has_kernel(op, "cpu") for op in ops),
            "native_cuda": all(_native.has_kernel(op, "cuda") for op in ops) and cuda_available,
            "triton": _native.triton_usable("cuda") or _native.triton_usable("cpu"),
            "reference": True,
        },
        "sm_budget": sm_budget_info(),
    }


def _eplb_cpu_sort() -> str | None:
    """The CPU planner's sort for small nodes ("avx512" or "portable"); None without the op."""
    import torch

    from deeppar import _native

    if not _native.NATIVE_LOADED or not hasattr(torch.ops.deeppar, "eplb_cpu_features"):
        return None
    return str(torch.ops.deeppar.eplb_cpu_features())


def collect_info() -> dict[str, Any]:
    """Versions, native extension state, backends (compiled / usable), and the GPU if any."""
    import torch

    from deeppar import __version__, _native

    cuda_available = torch.cuda.is_available()
    triton_ok, triton_reason = _native.triton_status()
    triton_version = None
    if triton_ok:
        import triton

        triton_version = triton.__version__
    gpus = []
    if cuda_available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                    "sms": props.multi_processor_count,
                }
            )
    return {
        "deeppar": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "native": {"loaded": _native.NATIVE_LOADED, "error": _native.NATIVE_ERROR},
        "backends": {
            # compiled: native kernels registered for the device; usable: they can run here.
            # Without them every op still runs through its Python/Triton path.
            "cpu": {
                "compiled": bool(_native.native_ops("cpu")),
                "usable": bool(_native.native_ops("cpu")),
                "ops": _native.native_ops("cpu"),
                "eplb_sort": _eplb_cpu_sort(),
            },
            "cuda": {
                "compiled": bool(_native.native_ops("cuda")),
                "usable": bool(_native.native_ops("cuda")) and cuda_available,
                "ops": _native.native_ops("cuda"),
            },
            "triton": {
                "compiled": triton_ok,
                "version": triton_version,
                "usable": _native.triton_usable("cuda") or _native.triton_usable("cpu"),
                "kernels": _triton_kernels(),
                "error": triton_reason,
            },
        },
        "moe": _moe_info(cuda_available),
        "cpu_threads": torch.get_num_threads(),
        "gpus": gpus,
    }


def format_info(data: dict[str, Any]) -> str:
    """A short human-readable rendering of :func:`collect_info`."""
    lines = [
        f"deeppar {data['deeppar']}  (python {data['python']}, torch {data['torch']}, "
        f"torch CUDA {data['torch_cuda'] or 'none'})",
    ]
    native = data["native"]
    lines.append(
        "native extension: " + ("loaded" if native["loaded"] else f"not loaded ({native['error']})")
    )
    for name, b in data["backends"].items():
        extra = f" {b['version']}" if b.get("version") else ""
        kernels = b.get("ops", b.get("kernels")) or []
        line = (
            f"  {name:<7}{extra:<8} compiled: {'yes' if b['compiled'] else 'no':<4}"
            f" usable: {'yes' if b['usable'] else 'no':<4}"
            + (f" kernels: {', '.join(kernels)}" if kernels else "")
        )
        lines.append(line.rstrip())
    moe = data.get("moe")
    if moe:
        usable = [name for name, ok in moe["permute_backends"].items() if ok]
        lines.append(f"moe permute/unpermute backends usable: {', '.join(usable)}")
        sm = moe["sm_budget"]
        for key, label in (("nccl_cta_budget", "NCCL CTA budget (ep_group)"),
                           ("green_contexts", "green contexts (compute_partition)")):
            entry = sm[key]
            state = "yes" if entry["available"] else f"no ({entry['reason']})"
            lines.append(f"  {label}: {state}")
        lines.append("  kernel num_sms: yes")
    lines.append(f"cpu threads: {data['cpu_threads']}")
    sort = data["backends"]["cpu"].get("eplb_sort")
    if sort:
        lines.append(f"eplb cpu sort (nodes of <= 64 experts): {sort}")
    if data["gpus"]:
        for g in data["gpus"]:
            lines.append(
                f"gpu {g['index']}: {g['name']} (sm_{g['capability'].replace('.', '')}, "
                f"{g['memory_gib']} GiB, {g['sms']} SMs)"
            )
    else:
        lines.append("gpu: none visible")
    return "\n".join(lines)
