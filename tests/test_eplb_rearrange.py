"""Expert weight rearrangement on spawned gloo groups of 2 and 4 processes.

One process group per world size runs all cases in a row; each case is reported as its own
test. The cases live in ``_eplb_dist_cases.py``.
"""

from __future__ import annotations

import _runtime_helpers as h
import pytest

pytestmark = pytest.mark.distributed

CASES = [
    "case_migration_plan",
    "case_every_slot_remote_and_dict_weights",
    "case_bad_plan_on_one_rank",
    "case_ranks_disagree",
    "case_plan_missing_an_expert_and_wrong_shapes",
    "case_allocation_failure_changes_nothing",
]
TIMEOUT = {2: 60, 4: 90}

_results: dict[int, dict] = {}


def _run(world: int) -> dict:
    if world not in _results:
        _results[world] = h.run_cases(world, CASES, timeout=TIMEOUT[world],
                                      module="_eplb_dist_cases")
    return _results[world]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world,case", [(w, c) for w in TIMEOUT for c in CASES])
def test_rearrange_case(world: int, case: str) -> None:
    res = _run(world)[case]
    bad = {r: e for r, e in res.items() if e is not None}
    assert not bad, h.failures({case: bad})
