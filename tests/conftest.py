"""Shared test settings: devices under test and markers.

Set ``DEEPPAR_TRITON_INTERPRET=1`` (as ``make test-triton`` does) to run the Triton kernels on
the CPU through Triton's interpreter; the variable must be set before triton is imported.
"""

from __future__ import annotations

import os

if os.environ.get("DEEPPAR_TRITON_INTERPRET") == "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> list[str]:
    """Devices the native kernels are tested on: always CPU, CUDA when a GPU is visible."""
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
