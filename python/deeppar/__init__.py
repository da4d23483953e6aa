"""deeppar: DeepSeek's parallelism strategies (EPLB, DualPipe) as a fast PyTorch library.

Importing the package is cheap on purpose: torch and the native extension load only when a
submodule that needs them is used, so that tools such as ``deeppar trace`` start quickly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("eplb", "pipeline", "profiling", "dualpipe", "ops", "moe")

if TYPE_CHECKING:  # pragma: no cover
    from . import dualpipe, eplb, moe, ops, pipeline, profiling  # noqa: F401


def info() -> dict[str, Any]:
    """What this installation can do: versions, compiled and usable backends, the GPU if any."""
    from ._info import collect_info

    return collect_info()


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "info", *_SUBMODULES]
