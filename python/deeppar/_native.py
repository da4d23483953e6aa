"""Loading of the native extension ``deeppar._C`` and backend availability.

Importing this module never fails: when ``_C`` is missing or broken, the reason is kept in
``NATIVE_ERROR`` and the pure-Python/Triton paths are used instead.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings

import torch

log = logging.getLogger("deeppar")

NATIVE_LOADED: bool = False
NATIVE_ERROR: str | None = None
# (op name, "cpu"/"cuda") pairs with a registered native kernel; filled once at import so that
# lookups are plain constant reads (torch.compile traces through them without a graph break).
_KERNELS: frozenset[tuple[str, str]] = frozenset()


def _load() -> None:
    global NATIVE_LOADED, NATIVE_ERROR
    if os.environ.get("DEEPPAR_DISABLE_NATIVE") == "1":
        NATIVE_ERROR = "disabled by DEEPPAR_DISABLE_NATIVE=1"
        return
    try:
        importlib.import_module("deeppar._C")
    except Exception as exc:  # ImportError, or OSError from a bad shared object
        NATIVE_ERROR = f"{type(exc).__name__}: {exc}"
        log.info("deeppar: native extension not loaded (%s); using Python paths", NATIVE_ERROR)
        if os.environ.get("DEEPPAR_NO_EXT", "0").lower() not in ("1", "true", "yes", "on"):
            # once per process: this module is imported once, by the first op that needs it
            warnings.warn(missing_extension_message(NATIVE_ERROR), RuntimeWarning, stacklevel=2)
        return
    NATIVE_LOADED = True
    global _KERNELS
    found = set()
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        for name in torch._C._dispatch_get_registrations_for_dispatch_key(key):
            if name.startswith("deeppar::"):
                found.add((name.split("::", 1)[1].split(".", 1)[0], device))
    _KERNELS = frozenset(found)


def missing_extension_message(error: str) -> str:
    """The warning given once when ``_C`` does not load."""
    return (f"deeppar: the native extension deeppar._C did not load ({error}); the slower "
            "pure-Python/Triton paths run instead. Rebuild it against the installed torch "
            "(pip install --no-build-isolation .), or set DEEPPAR_DISABLE_NATIVE=1 to use the "
            "Python paths without this warning.")


_load()


def has_kernel(op: str, device: str) -> bool:
    """Whether ``torch.ops.deeppar.<op>`` has a kernel for ``device`` ("cpu" or "cuda")."""
    return (op, device) in _KERNELS


def native_ops(device: str) -> list[str]:
    """Names of the ``deeppar`` ops with a native kernel for ``device`` ("cpu" or "cuda")."""
    return sorted(op for op, dev in _KERNELS if dev == device)


def triton_status() -> tuple[bool, str | None]:
    """(importable, reason if not). Triton runs on CUDA, or on CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def triton_usable(device: torch.device | str) -> bool:
    """Whether Triton kernels can run on ``device`` now."""
    ok, _ = triton_status()
    if not ok:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return os.environ.get("TRITON_INTERPRET") == "1"
