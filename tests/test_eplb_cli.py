"""``deeppar eplb plan``: files, demo input, JSON and PNG outputs, clean errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _eplb_helpers import random_weight

import deeppar.eplb as eplb
from deeppar.cli import main

ARGS = ["--replicas", "16", "--groups", "4", "--nodes", "2", "--gpus", "8"]


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".csv"])
def test_plan_from_file(tmp_path, capsys, suffix):
    weight = random_weight(3, 12, "int", 0).float()
    path = tmp_path / f"loads{suffix}"
    if suffix == ".pt":
        torch.save(weight, path)
    elif suffix == ".npy":
        np.save(path, weight.numpy())
    else:
        np.savetxt(path, weight.numpy(), delimiter=",")
    out = tmp_path / "plan.json"
    assert main(["eplb", "plan", "--loads", str(path), *ARGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "policy: hierarchical" in text and "balancedness before" in text
    data = json.loads(out.read_text())
    phy2log, log2phy, logcnt = eplb.rebalance_experts(weight, 16, 4, 2, 8)
    assert data["phy2log"] == phy2log.tolist() and data["logcnt"] == logcnt.tolist()
    assert data["log2phy"] == log2phy.tolist()


def test_demo_with_png(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["eplb", "plan", "--demo", "--png", str(png), "--backend", "cpu"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "58 layers, 256 experts -> 288 replicas" in text


def test_missing_and_malformed_files(tmp_path, capsys):
    assert main(["eplb", "plan", "--loads", str(tmp_path / "nope.csv"), *ARGS]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,x\n3,4,5\n")
    assert main(["eplb", "plan", "--loads", str(bad), *ARGS]) == 2
    assert "cannot read loads" in capsys.readouterr().err
    odd = tmp_path / "loads.txt"
    odd.write_text("1,2\n")
    assert main(["eplb", "plan", "--loads", str(odd), *ARGS]) == 2
    assert "unknown format" in capsys.readouterr().err
    vec = tmp_path / "vec.npy"
    np.save(vec, np.ones(12))
    assert main(["eplb", "plan", "--loads", str(vec), *ARGS]) == 2
    assert "2-D" in capsys.readouterr().err
    good = tmp_path / "good.npy"
    np.save(good, np.ones((2, 12)))
    assert main(["eplb", "plan", "--loads", str(good), "--replicas", "16"]) == 2
    assert "--groups" in capsys.readouterr().err


def test_pt_file_that_is_not_a_tensor_pickle(tmp_path, capsys):
    text = tmp_path / "text.pt"
    text.write_text("this is not a torch file\n")
    assert main(["eplb", "plan", "--loads", str(text), *ARGS]) == 2
    assert "cannot read loads" in capsys.readouterr().err


def test_outputs_get_usual_permissions(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["eplb", "plan", "--demo", "--out", str(out), "--backend", "cpu"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left


def _write_plan_and_drifted_loads(tmp_path):
    weight = random_weight(3, 12, "real", 1)
    loads = tmp_path / "loads.npy"
    np.save(loads, weight.numpy())
    old = tmp_path / "old.json"
    assert main(["eplb", "plan", "--loads", str(loads), *ARGS, "--out", str(old)]) == 0
    g = torch.Generator().manual_seed(2)
    drifted = tmp_path / "drifted.npy"
    np.save(drifted, (weight * torch.exp(torch.randn(weight.shape, generator=g) * 0.5)).numpy())
    return old, drifted


def test_current_plan_prints_the_transfer_summary(tmp_path, capsys):
    old, drifted = _write_plan_and_drifted_loads(tmp_path)
    capsys.readouterr()
    new = tmp_path / "new.json"
    # Sizes come from the current plan's file.
    assert main(["eplb", "plan", "--loads", str(drifted), "--current", str(old),
                 "--expert-bytes", "1000", "--out", str(new)]) == 0
    text = capsys.readouterr().out
    data = json.loads(new.read_text())
    moved = data["moved_replicas"]
    assert f"migration: {moved} of 48 replicas move to another GPU" in text
    assert f"bytes moved: {moved * 1000}" in text
    assert "balancedness: current placement" in text and "fresh plan" in text
    weight = torch.from_numpy(np.load(drifted))
    current = torch.tensor(json.loads(old.read_text())["phy2log"])
    want = eplb.migrate(weight, current, 16, 4, 2, 8)
    assert data["phy2log"] == want.phy2log.tolist()
    assert data["source_slot"] == want.source_slot.tolist()
    # The written plan is itself a valid --current.
    assert main(["eplb", "plan", "--loads", str(drifted), "--current", str(new)]) == 0
    assert "migration: 0 of 48 replicas" in capsys.readouterr().out


def test_current_plan_errors_name_the_problem(tmp_path, capsys):
    old, drifted = _write_plan_and_drifted_loads(tmp_path)
    capsys.readouterr()
    base = ["eplb", "plan", "--loads", str(drifted), "--current"]
    data = json.loads(old.read_text())

    def run(plan: object, *extra: str) -> str:
        path = tmp_path / "bad.json"
        path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
        assert main([*base, str(path), *extra]) == 2
        return capsys.readouterr().err

    assert "current placement has shape (3, 15)" in run(
        {**data, "phy2log": [r[:15] for r in data["phy2log"]], "num_replicas": 15},
        "--replicas", "16")
    assert "current placement has shape (2, 16)" in run({**data, "phy2log": data["phy2log"][:2]})
    uncovered = [[0] * 16 for _ in range(3)]
    assert "does not cover every expert" in run({**data, "phy2log": uncovered})
    assert "no phy2log" in run({"num_gpus": 8})
    assert "no phy2log" in run({**data, "phy2log": [[0.5] * 16] * 3})
    assert "cannot read the current plan" in run("{not json")
    assert "rows differ in length" in run({**data, "phy2log": [[0] * 16, [0] * 15, [0] * 16]})
    assert "the current plan is for 8 GPUs, --gpus is 4" in run(data, "--gpus", "4")
    assert "not available with --current" in run(data, "--png", str(tmp_path / "x.png"))
    assert main([*base, str(tmp_path / "missing.json")]) == 2
    assert "current plan not found" in capsys.readouterr().err
    assert main(["eplb", "plan", "--loads", str(drifted), *ARGS, "--expert-bytes", "8"]) == 2
    assert "need --current" in capsys.readouterr().err


def test_method_is_passed_to_the_planner(tmp_path, capsys):
    old, drifted = _write_plan_and_drifted_loads(tmp_path)
    weight = torch.from_numpy(np.load(drifted))
    out = tmp_path / "balanced.json"
    assert main(["eplb", "plan", "--loads", str(drifted), *ARGS, "--method", "balanced",
                 "--out", str(out)]) == 0
    want, _, _ = eplb.rebalance_experts(weight, 16, 4, 2, 8, method="balanced")
    assert json.loads(out.read_text())["phy2log"] == want.tolist()
    moved = tmp_path / "moved.json"
    assert main(["eplb", "plan", "--loads", str(drifted), "--current", str(old), "--method",
                 "balanced", "--out", str(moved)]) == 0
    current = torch.tensor(json.loads(old.read_text())["phy2log"])
    m = eplb.migrate(weight, current, 16, 4, 2, 8, method="balanced")
    assert json.loads(moved.read_text())["phy2log"] == m.phy2log.tolist()
    capsys.readouterr()
    assert main(["eplb", "plan", "--loads", str(drifted), *ARGS, "--method", "best"]) == 2
    assert "method must be one of 'deepseek', 'balanced'" in capsys.readouterr().err
