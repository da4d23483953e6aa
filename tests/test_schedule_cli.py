"""``deeppar schedule ...`` through ``deeppar.cli.main``."""

from __future__ import annotations

import json

import pytest

from deeppar.cli import main


def test_show(capsys):
    assert main(["schedule", "show", "--method", "dualpipev", "--ranks", "2",
                 "--chunks", "4"]) == 0
    out = capsys.readouterr().out
    assert "rank 0: F0@s0 F1@s0 F2@s0 F0@s3 I0@s3 W0@s3" in out
    assert "loss of micro-batches [0, 1, 2, 3]" in out


def test_show_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s.png"
    assert main(["schedule", "show", "-m", "dualpipe", "-p", "4", "-n", "8",
                 "--png", str(out)]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out


def test_simulate_json(capsys):
    assert main(["schedule", "simulate", "--method", "1f1b", "--ranks", "4", "--chunks", "8",
                 "--F", "1", "--B", "2", "--W", "1", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["makespan"] == 33
    assert d["bubble"] == [9, 9, 9, 9]
    assert d["peak_activations"] == [4, 3, 2, 1]
    assert d["published_holds"] is True


def test_simulate_text_reports_published(capsys):
    assert main(["schedule", "simulate", "-m", "dualpipe", "-p", "8", "-n", "20",
                 "--B", "3"]) == 0
    out = capsys.readouterr().out
    assert "does not hold" in out and "makespan" in out
    assert main(["schedule", "simulate", "-m", "dualpipe", "-p", "8", "-n", "20",
                 "--FB", "2.5", "--comm", "0"]) == 0
    assert "-> holds" in capsys.readouterr().out


def test_simulate_measured(capsys, tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"durations": {"F0@s0": 5.0}}))
    assert main(["schedule", "simulate", "-m", "1f1b", "-p", "1", "-n", "1",
                 "--measured", str(f), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan"] == 7.0


def test_compare(capsys, tmp_path):
    assert main(["schedule", "compare", "--ranks", "4", "--chunks", "8"]) == 0
    out = capsys.readouterr().out
    for m in ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev"):
        assert m in out
    assert "params/dev" in out and "devices" in out
    assert main(["schedule", "compare", "-p", "4", "-n", "8", "--json",
                 "--basis", "devices"]) == 0
    d = json.loads(capsys.readouterr().out)
    rows = {r["method"]: r for r in d["methods"]}
    assert rows["dualpipe"]["params_per_device"] == 2
    assert rows["dualpipev"]["devices"] == 4
    assert rows["1f1b"]["max_bubble"] == 9
    # odd number of stages: the V-shaped methods cannot fold, DualPipe needs even ranks
    assert main(["schedule", "compare", "-p", "3", "-n", "6"]) == 0
    assert "n/a" in capsys.readouterr().out


def test_compare_png(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "c.png"
    assert main(["schedule", "compare", "-p", "4", "-n", "8", "--png", str(out)]) == 0
    assert out.exists()


@pytest.mark.parametrize("fmt", ["torch", "json", "chrome"])
def test_export(capsys, tmp_path, fmt):
    assert main(["schedule", "export", "-m", "dualpipev", "-p", "2", "-n", "4",
                 "--format", fmt]) == 0
    out = capsys.readouterr().out
    if fmt == "torch":
        assert out.startswith("0F0,0F1,0F2,3F0,3I0,3W0,3F1,(0F3;3B1)OVERLAP_F_B,")
    else:
        json.loads(out)
    dest = tmp_path / f"x.{fmt}"
    assert main(["schedule", "export", "-m", "zbv", "-p", "2", "-n", "4", "--format", fmt,
                 "--out", str(dest)]) == 0
    assert dest.stat().st_size > 0


def test_errors(capsys):
    assert main(["schedule", "show", "-m", "dualpipe", "-p", "3", "-n", "6"]) == 2
    assert "ranks must be even" in capsys.readouterr().err
    assert main(["schedule", "simulate", "-m", "nope", "-p", "2", "-n", "4"]) == 2
    assert "unknown schedule method" in capsys.readouterr().err


def test_bad_costs_and_measured_files(capsys, tmp_path):
    base = ["schedule", "simulate", "-m", "dualpipe", "-p", "4", "-n", "8"]
    assert main(base + ["--F", "nan"]) == 2
    assert "cost F must be a finite number >= 0" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert main(base + ["--measured", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON" in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"durations": {"F99@s0": 1.0}}))
    assert main(base + ["--measured", str(unknown)]) == 2
    err = capsys.readouterr().err
    assert str(unknown) in err and "F99@s0" in err
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"by_index": {"0": [1.0, 2.0]}}))
    assert main(base + ["--measured", str(short), "--json"]) == 2
    assert "rank 0 has 2 durations" in capsys.readouterr().err
    assert main(["schedule", "export", "-m", "dualpipe", "-p", "4", "-n", "8", "--format",
                 "chrome", "--measured", str(unknown)]) == 2
    assert "F99@s0" in capsys.readouterr().err
