"""`deeppar demo` (what `make demo` runs) works end to end and writes its artefacts."""

from __future__ import annotations

import pytest

from deeppar.cli import main


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_demo_runs_end_to_end(tmp_path, capfd):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    out = capfd.readouterr().out  # spawned ranks write to the file descriptors
    assert "losses bit-identical to the sequential model" in out
    assert "overlap ratio" in out or "ratio 0." in out
    for name in ("eplb_plan.json", "eplb_plan.png", "schedules_compare.png",
                 "deepseek_trace_timeline.png", "dualpipev_timeline.json",
                 "dualpipev_rank0.json"):
        assert (tmp_path / name).stat().st_size > 0, name
