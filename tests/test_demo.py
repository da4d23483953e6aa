"""``deeppar demo`` (what ``make demo`` runs): the MoE training system end to end, and the checks
it relies on."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from deeppar.cli import main
from deeppar.demo.config import TrainConfig
from deeppar.demo.reference import compare_first_step
from deeppar.demo.report import RunResult, claims
from deeppar.demo.task import NextTokenTask

CLAIMS = ("loss falls", "first step losses bit-identical to one process",
          "first step gradients match one process", "losses unchanged by the expert move")


SMALL = ["--steps", "4"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One run of the demo (4 steps, experts moved after step 2): exit code, what it
    printed (the spawned ranks write to the file descriptors), its output folder."""
    out = tmp_path_factory.mktemp("demo")
    run = subprocess.run([sys.executable, "-m", "deeppar", "demo", "--out", str(out), *SMALL,
                          "--rebalance-at", "2"], capture_output=True, text=True, timeout=280)
    return run.returncode, run.stdout + run.stderr, out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_demo_trains_the_moe_end_to_end(demo_run):
    code, out, tmp_path = demo_run
    assert code == 0, out[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(CLAIMS) <= set(summary["claims"]), summary["claims"]
    assert all(summary["claims"].values()), summary["claims"]
    losses = summary["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert summary["first_step"]["losses"] == 2 * TrainConfig().chunks  # both data shards
    assert summary["first_step"]["max_cos_distance"] < 1e-12
    eplb = summary["eplb"]
    assert eplb["step"] == 2 and eplb["identical"]
    assert eplb["balancedness_after"] >= eplb["balancedness_before"]
    assert summary["step_ms"]["measured"] > 0 and summary["step_ms"]["simulated"] > 0
    for text in ("step 4/4", "losses bit-identical to the sequential one-process run",
                 "held-out losses before and after the move: bit-identical",
                 "F.attn", "fused engine, F&B pairs", "step: measured vs simulated"):
        assert text in out, text
    for name in ("loss.png", "schedule_timeline.png", "eplb_placement.png",
                 "trace_timeline.png", "trace_timeline.html", "traces/rank0.json",
                 "traces/rank3.json"):
        assert (tmp_path / name).stat().st_size > 0, name


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_training_losses_are_those_of_a_run_without_the_move(demo_run, tmp_path, capfd):
    code, out, moved_dir = demo_run
    assert code == 0, out[-5000:]
    assert main(["demo", "--out", str(tmp_path), *SMALL, "--rebalance-at", "0",
                 "--no-check", "--no-profile"]) == 0, capfd.readouterr().out
    moved = json.loads((moved_dir / "summary.json").read_text())
    kept = json.loads((tmp_path / "summary.json").read_text())
    assert "eplb" in moved and "eplb" not in kept
    assert moved["eplb"]["moved"] > 0  # the experts did change ranks
    assert moved["losses"] == kept["losses"]  # every step, bit for bit


def test_demo_rejects_sizes_that_cannot_work(capsys):
    assert main(["demo", "--pp", "3"]) == 2
    assert "--pp must be even" in capsys.readouterr().err
    assert main(["demo", "--experts", "6", "--ep", "4", "--pp", "2"]) == 2
    assert "multiple of --ep" in capsys.readouterr().err


def test_demo_help_explains_sizes_and_pieces(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--pp", "--ep", "--experts", "--top-k", "--n-group", "--topk-group",
                   "--chunks", "--rebalance-at", "--no-profile", "--no-check"):
        assert option in text, option


def test_claims_fail_when_the_run_does_not_show_them():
    result = RunResult(config=TrainConfig(), layout="", losses=[2.0, 2.5])
    result.eplb = {"identical": False}
    c = claims(result)
    assert c == {"loss falls": False, "losses unchanged by the expert move": False}


def test_first_step_check_sees_a_changed_loss_and_a_wrong_gradient():
    want = ({(0, 0): 1.5, (1, 0): 2.0}, {"S0.w": torch.ones(3)})
    same = [{"losses": {(0, 0): 1.5}, "grads": {"S0.w": (0, torch.ones(3))}},
            {"losses": {(1, 0): 2.0}, "grads": {}}]
    assert compare_first_step(want, same).ok
    off = [{"losses": {(0, 0): 1.5 + 2 ** -20}, "grads": {"S0.w": (0, torch.ones(3))}},
           {"losses": {(1, 0): 2.0}, "grads": {}}]
    assert not compare_first_step(want, off).losses_identical
    wrong = [{"losses": {(0, 0): 1.5}, "grads": {"S0.w": (0, torch.tensor([1.0, 1, -1]))}},
             {"losses": {(1, 0): 2.0}, "grads": {}}]
    check = compare_first_step(want, wrong)
    assert check.losses_identical and not check.ok


def test_task_is_reproducible_per_shard_and_learnable():
    task = NextTokenTask(vocab=32, seq=16, seed=0)
    x, y = task.batch(3, 1, 8)
    x2, y2 = task.batch(3, 1, 8)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(task.batch(3, 0, 8)[0], x)  # shards see different data
    assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the next tokens
    follows = (task.successor[x] == y).float().mean().item()
    assert follows > 0.8  # mostly the successor table: a loss far below log(vocab) is possible
    assert task.best_loss() < 0.3 * torch.log(torch.tensor(32.0)).item()
