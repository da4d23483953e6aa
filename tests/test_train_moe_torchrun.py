"""``examples/train_moe.py`` runs unchanged under torchrun: 4 CPU processes, PP 2 x EP 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_train_moe_under_torchrun(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
           "--standalone", str(ROOT / "examples" / "train_moe.py"), "--pp", "2",
           "--ep", "2", "--steps", "2", "--chunks", "4", "--micro-batch", "4", "--no-profile",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "step 2/2" in out
    assert "losses bit-identical" in out, out
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "schedule_timeline.png").stat().st_size > 0


def test_train_moe_help_explains_the_options():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_moe.py"), "--help"],
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    for option in ("--pp", "--ep", "--experts", "--top-k", "--n-group", "--rebalance-at",
                   "torchrun"):
        assert option in run.stdout


def test_train_moe_rejects_a_grid_that_does_not_fit():
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "train_moe.py"), "--pp",
                          "3"], env=dict(os.environ, PYTHONPATH=str(ROOT / "python")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "--pp must be even" in run.stderr
