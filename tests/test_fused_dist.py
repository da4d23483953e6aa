"""The fused F&B engine on spawned gloo groups: token-mixing and MoE stages with EP over 2 and 4
ranks, the in-flight timeline, forward-only overlap, and DualPipe / DualPipeV of MoE stages on a
PP x EP = 2 x 2 grid, each against F then B bit for bit."""

from __future__ import annotations

import _runtime_helpers as h
import pytest

pytestmark = pytest.mark.distributed

GROUPS: dict[int, list[str]] = {
    2: ["case_ep_fb", "case_timeline", "case_forward_two", "case_moe_ep_fb",
        "case_bad_declaration_fails_every_rank"],
    4: ["case_moe_ep_fb", "case_dualpipe_grid", "case_dualpipev_grid"],
}
_results: dict[int, dict] = {}


def _run(world: int) -> dict:
    if world not in _results:
        _results[world] = h.run_cases(world, [f"_fused_helpers:{c}" for c in GROUPS[world]],
                                      timeout=120)
    return _results[world]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world,case", [(w, c) for w, cs in GROUPS.items() for c in cs])
def test_fused_case(world: int, case: str) -> None:
    res = _run(world)[f"_fused_helpers:{case}"]
    bad = {r: e for r, e in res.items() if e is not None}
    assert not bad, h.failures({case: bad})
