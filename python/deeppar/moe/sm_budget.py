"""SM budgets for overlapping communication with computation.

Three levers, each detected on the installed torch and reported by ``deeppar info``:

* the permute / unpermute kernels take ``num_sms`` (exactly that many persistent blocks);
* :func:`ep_group` creates an expert-parallel NCCL group whose collectives use between
  ``min_ctas`` and ``max_ctas`` CTAs (``ProcessGroupNCCL.Options().config``);
* :func:`compute_partition` gives the compute stream all SMs but ``reserved_sms`` through a CUDA
  green context (``torch.cuda.green_contexts``), or falls back to a plain stream and says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MAX_NCCL_CTAS = 64  # NCCL's upper bound on CTAs per collective


def nccl_cta_budget_status() -> tuple[bool, str | None]:
    """(whether NCCL groups can be given ``min_ctas``/``max_ctas`` here, reason if not)."""
    if not dist.is_available():
        return False, "torch.distributed is not available in this torch build"
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        return False, "this torch build has no NCCL (torch.distributed.ProcessGroupNCCL missing)"
    if not hasattr(nccl, "Options"):
        return False, "ProcessGroupNCCL.Options is missing in this torch build"
    try:
        config = nccl.Options().config
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot"
        return False, f"ProcessGroupNCCL.Options().config is unusable ({type(exc).__name__}: {exc})"
    missing = [name for name in ("max_ctas", "min_ctas") if not hasattr(config, name)]
    if missing:
        return False, f"ProcessGroupNCCL.Options().config has no {' / '.join(missing)}"
    return True, None


def _check_ctas(max_ctas: int | None, min_ctas: int | None) -> None:
    for name, value in (("max_ctas", max_ctas), ("min_ctas", min_ctas)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int)
            or not 1 <= value <= MAX_NCCL_CTAS
        ):
            raise ValueError(
                f"{name} must be None or an int in [1, {MAX_NCCL_CTAS}], got {value!r}"
            )
    if max_ctas is not None and min_ctas is not None and min_ctas > max_ctas:
        raise ValueError(f"min_ctas={min_ctas} exceeds max_ctas={max_ctas}")


def ep_group(
    ranks: Sequence[int],
    *,
    max_ctas: int | None = None,
    min_ctas: int | None = None,
    backend: str | None = None,
    **new_group_kwargs: Any,
) -> dist.ProcessGroup:
    """Create the expert-parallel group of ``ranks`` (a collective: every process of the default
    group calls it with the same arguments).

    On NCCL, ``max_ctas`` / ``min_ctas`` bound the CTAs (thread blocks, so SMs) its collectives
    use; a torch without those options raises RuntimeError saying what is missing. On gloo
    (CPU) CTA budgets do not apply: the group is created as usual and a warning says so.
    """
    _check_ctas(max_ctas, min_ctas)
    ranks = list(ranks)
    backend = backend or dist.get_backend()
    budget = max_ctas is not None or min_ctas is not None
    if not budget:
        return dist.new_group(ranks, backend=backend, **new_group_kwargs)
    if backend != "nccl":
        warnings.warn(
            f"ep_group: CTA budgets (max_ctas/min_ctas) apply to NCCL only; the {backend} group "
            "is created without one", stacklevel=2,
        )
        return dist.new_group(ranks, backend=backend, **new_group_kwargs)
    ok, reason = nccl_cta_budget_status()
    if not ok:
        raise RuntimeError(f"ep_group: cannot set max_ctas/min_ctas: {reason}")
    options = dist.ProcessGroupNCCL.Options()
    if max_ctas is not None:
        options.config.max_ctas = max_ctas
    if min_ctas is not None:
        options.config.min_ctas = min_ctas
    return dist.new_group(ranks, backend=backend, pg_options=options, **new_group_kwargs)


def green_context_status() -> tuple[bool, str | None]:
    """(whether CUDA green contexts can partition SMs here, reason if not)."""
    try:
        from torch.cuda import green_contexts
    except ImportError:
        return False, "this torch has no torch.cuda.green_contexts (added in torch 2.9)"
    if not getattr(green_contexts, "SUPPORTED", False):
        return False, "this torch build has no CUDA green context support"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, None


@dataclass
class ComputePartition:
    """A compute stream and the SMs it may use.

    ``green_context`` is None (and ``reason`` says why) when the stream is a plain stream that
    may use every SM; keep the object alive as long as the stream is used."""

    stream: torch.cuda.Stream | None
    sms: int | None  # SMs the stream may use (None: all, unpartitioned)
    reserved_sms: int
    green_context: Any = None
    reason: str | None = None

    @property
    def partitioned(self) -> bool:
        return self.green_context is not None


def compute_partition(reserved_sms: int, device: int | None = None) -> ComputePartition:
    """A compute stream on all SMs but ``reserved_sms`` (left to communication kernels), made
    with a CUDA green context when available; otherwise a plain stream (or None without CUDA)
    and the reason. Green contexts allocate SMs in hardware-sized groups, so the driver may
    round the count."""
    if isinstance(reserved_sms, bool) or not isinstance(reserved_sms, int) or reserved_sms < 0:
        raise ValueError(f"reserved_sms must be an int >= 0, got {reserved_sms!r}")
    ok, reason = green_context_status()
    if not torch.cuda.is_available():
        return ComputePartition(None, None, reserved_sms, reason=reason)
    device = torch.cuda.current_device() if device is None else device
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if reserved_sms >= total:
        raise ValueError(f"reserved_sms={reserved_sms} leaves no SM of the {total} on device "
                         f"{device} for computation")
    if ok and reserved_sms > 0:
        from torch.cuda.green_contexts import GreenContext

        try:
            context = GreenContext.create(num_sms=total - reserved_sms, device_id=device)
            return ComputePartition(context.Stream(), total - reserved_sms, reserved_sms,
                                    green_context=context)
        except Exception as exc:  # noqa: BLE001 - driver refusals become the fallback's reason
            reason = f"green context creation failed ({type(exc).__name__}: {exc})"
    elif ok:
        reason = "reserved_sms=0: no partition needed"
    return ComputePartition(torch.cuda.Stream(device), None, reserved_sms, reason=reason)


def sm_budget_info() -> dict[str, Any]:
    """What ``deeppar info`` reports about SM partitioning."""
    cta_ok, cta_reason = nccl_cta_budget_status()
    green_ok, green_reason = green_context_status()
    return {
        "kernel_num_sms": True,
        "nccl_cta_budget": {"available": cta_ok, "reason": cta_reason},
        "green_contexts": {"available": green_ok, "reason": green_reason},
    }
