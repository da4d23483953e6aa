"""Expert weight rearrangement on spawned gloo groups of 2 and 4 processes, and failures in the
middle of the transfers (a rank that raises, stalls, cannot post its transfers, or is killed)
on groups of 3.

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
    "case_index_failure_changes_nothing",
    "case_store_keys_bounded",
    "case_default_group_never_aborted",
    "case_late_rank_sees_the_failure",
    "case_raise_mid_transfer",
    "case_raise_at_last_send",
    "case_two_ranks_raise",
]
TIMEOUT = {2: 60, 4: 90}

_results: dict[int, dict] = {}


def _run(world: int) -> dict:
    if world not in _results:
        _results[world] = h.run_cases(world, [f"_eplb_dist_cases:{c}" for c in CASES],
                                      timeout=TIMEOUT[world])
    return _results[world]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world,case", [(w, c) for w in TIMEOUT for c in CASES])
def test_rearrange_case(world: int, case: str) -> None:
    res = _run(world)[f"_eplb_dist_cases:{case}"]
    bad = {r: e for r, e in res.items() if e is not None}
    assert not bad, h.failures({case: bad})


@pytest.mark.timeout(60)
def test_stalled_rank_and_posting_failure() -> None:
    """3 ranks: a stalled rank past ``transfer_timeout``, then a rank that cannot post its
    transfers (last: it leaves unmatched transfers in the group)."""
    cases = ["case_hung_rank_times_out", "case_posting_failure_abandons"]
    res = h.run_cases(3, [f"_eplb_dist_cases:{c}" for c in cases], timeout=45)
    bad = {c: {r: e for r, e in res[f"_eplb_dist_cases:{c}"].items() if e is not None}
           for c in cases}
    assert not any(bad.values()), h.failures(bad)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", ["case_killed_rank", "case_killed_while_allocating",
                                  "case_killed_before_entering"])
def test_killed_rank(case: str) -> None:
    """3 ranks, rank 1 killed mid-transfer, before its transfers or before the call: ranks 0
    and 2 raise the same error naming it."""
    res = h.run_cases(3, [f"_eplb_dist_cases:{case}"], timeout=45)
    per_rank = res[f"_eplb_dist_cases:{case}"]
    assert per_rank[1] == "timeout (no report)", per_rank[1]  # it died before reporting
    bad = {r: e for r, e in per_rank.items() if r != 1 and e is not None}
    assert not bad, h.failures({case: bad})
