"""Data shipped with deeppar (package data, read from the installed package only)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def sample_trace() -> Path:
    """DeepSeek's published DeepSeek-V3 training trace (one rank of 64, gzipped Chrome trace
    from github.com/deepseek-ai/profile-data): what the demo and the tests analyze."""
    return _HERE / "deepseek_v3_train_trace.json.gz"


__all__ = ["sample_trace"]
