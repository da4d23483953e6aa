"""DualPipe / DualPipeV runtime against the sequential reference, on spawned gloo groups.

One process group per world size runs all its cases in a row (starting processes dominates the
cost); each case is then reported as its own test.
"""

from __future__ import annotations

import _runtime_helpers as h
import pytest

pytestmark = pytest.mark.distributed

DP_CASES = ["case_dp_train", "case_dp_infer", "case_dp_variants", "case_zero_bubble",
            "case_deepseek_dp", "case_timeline", "case_dp_errors", "case_generic_methods"]
DPV_CASES = ["case_dpv_train", "case_dpv_infer", "case_dpv_variants", "case_dpv_zero_bubble",
             "case_deepseek_dpv", "case_dpv_timeline", "case_dpv_errors", "case_shape_cache",
             "case_program_mismatch"]

GROUPS: dict[int, list[str]] = {
    2: DP_CASES + DPV_CASES + ["case_profiled_step"],
    3: DPV_CASES,
    4: DP_CASES + DPV_CASES,
    8: ["case_dp_train", "case_dp_infer", "case_dp_variants", "case_zero_bubble",
        "case_dp_errors"],
}
TIMEOUT = {2: 60, 3: 60, 4: 90, 8: 120}

_results: dict[int, dict] = {}


def _run(world: int) -> dict:
    if world not in _results:
        _results[world] = h.run_cases(world, GROUPS[world], timeout=TIMEOUT[world])
    return _results[world]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world,case", [(w, c) for w, cs in GROUPS.items() for c in cs])
def test_runtime_case(world: int, case: str) -> None:
    res = _run(world)[case]
    bad = {r: e for r, e in res.items() if e is not None}
    assert not bad, h.failures({case: bad})


FAILURE_CASES = ["case_failure_headers", "case_failure_cached_shapes", "case_failure_fixed_shapes"]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", [2, 4])
def test_failing_rank_fails_every_rank(world: int) -> None:
    """A stage that raises on one rank (process alive): that rank raises its own exception,
    every other rank a PipelineFailure naming it, all within the bound (checked per rank)."""
    res = h.run_cases(world, FAILURE_CASES, timeout=100)
    bad = {c: {r: e for r, e in per.items() if e is not None} for c, per in res.items()}
    assert not any(bad.values()), h.failures(bad)
