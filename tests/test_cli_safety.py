"""The ``deeppar`` commands under hostile use: outputs on inputs, special files, overflow,
sizes that cannot fit, closed pipes, matplotlib missing. All through ``deeppar.cli.main``."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import deeppar
from deeppar.cli import main
from deeppar.data import sample_trace

PYTHON_DIR = str(Path(deeppar.__file__).resolve().parents[1])
EXPORT = ["schedule", "export", "-m", "1f1b", "-p", "2", "-n", "4"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    return err


# ------------------------------------------------------------------ outputs never on inputs
def test_trace_html_on_its_input_is_refused(tmp_path, capsys):
    trace = tmp_path / "v.json.gz"
    shutil.copyfile(sample_trace(), trace)
    before = trace.read_bytes()
    assert main(["trace", "analyze", str(trace), "--html", str(trace)]) == 2
    assert "refusing to overwrite" in _error(capsys)
    assert trace.read_bytes() == before


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_eplb_out_on_its_loads_is_refused(tmp_path, capsys, link):
    loads = tmp_path / "x.npy"
    np.save(loads, np.ones((2, 8)))
    before = loads.read_bytes()
    out = loads
    if link == "symlink":
        out = tmp_path / "link.npy"
        out.symlink_to(loads)
    elif link == "hardlink":
        out = tmp_path / "hard.npy"
        os.link(loads, out)
    args = ["eplb", "plan", "--loads", str(loads), "--replicas", "8", "--groups", "1",
            "--nodes", "1", "--gpus", "2"]
    assert main([*args, "--out", str(out)]) == 2
    assert "refusing to overwrite" in _error(capsys)
    assert main([*args, "--png", str(out)]) == 2
    assert "refusing to overwrite" in _error(capsys)
    assert loads.read_bytes() == before


def test_schedule_outputs_on_the_measured_file_are_refused(tmp_path, capsys):
    measured = tmp_path / "m.json"
    measured.write_text(json.dumps({"durations": {"F0@s0": 2.0}}))
    before = measured.read_text()
    assert main([*EXPORT, "--format", "chrome", "--measured", str(measured),
                 "--out", str(measured)]) == 2
    assert "refusing to overwrite" in _error(capsys)
    for action in (["simulate", "-m", "1f1b"], ["compare"]):
        assert main(["schedule", *action, "-p", "2", "-n", "4", "--measured", str(measured),
                     "--png", str(measured)]) == 2
        assert "refusing to overwrite" in _error(capsys)
    assert measured.read_text() == before


def test_two_outputs_on_one_file_are_refused(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["eplb", "plan", "--demo", "--out", str(out), "--png", str(out)]) == 2
    assert "given twice" in _error(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------- special outputs
def test_export_to_character_device_fifo_stdout_and_directory(tmp_path, capsys):
    assert main([*EXPORT, "--format", "json", "--out", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    capsys.readouterr()

    assert main([*EXPORT, "--format", "json", "--out", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "1f1b"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert main([*EXPORT, "--format", "torch", "--out", str(fifo)]) == 0
    reader.join(timeout=30)
    assert got[0].startswith(b"0F0") and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    capsys.readouterr()

    assert main([*EXPORT, "--format", "json", "--out", str(tmp_path)]) == 2
    assert "is a directory" in _error(capsys)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_full_device_is_an_error_and_stays_a_device(capsys):
    assert main([*EXPORT, "--format", "json", "--out", "/dev/full"]) == 2
    assert "No space left" in _error(capsys)
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_missing_output_folder_is_created(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "s.json"
    assert main([*EXPORT, "--format", "json", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_ranks"] == 2


@pytest.mark.parametrize("command", [
    ["eplb", "plan"], ["schedule", "show"], ["schedule", "simulate"], ["schedule", "compare"],
    ["schedule", "export"], ["trace", "analyze"], ["demo"]])
def test_every_help_states_the_output_policy(capsys, command):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "missing folders are created" in out
    assert "may not be one of the command's inputs" in out


# ------------------------------------------------------------------- overflow, no NaN JSON
def test_eplb_loads_whose_float32_sums_overflow_give_finite_metrics(tmp_path, capsys):
    """Loads of 1e38 sum beyond float32: the metrics are taken in float64, never NaN."""
    loads = tmp_path / "big.npy"
    np.save(loads, np.full((2, 8), 1e38, dtype=np.float32))
    out = tmp_path / "plan.json"
    assert main(["eplb", "plan", "--loads", str(loads), "--replicas", "8", "--groups", "1",
                 "--nodes", "1", "--gpus", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    for bad in ("nan", "inf"):
        assert bad not in printed.lower() and bad not in text.lower()
    plan = json.loads(text)
    assert plan["balancedness"] == pytest.approx(1.0)
    assert plan["gpu_load"][0] == pytest.approx([4e38, 4e38], rel=1e-6)


@pytest.mark.parametrize("action", [["simulate", "-m", "1f1b", "--json"], ["compare", "--json"],
                                    ["export", "-m", "1f1b", "--format", "chrome"]])
def test_costs_that_overflow_are_an_error(capsys, action):
    assert main(["schedule", *action, "-p", "4", "-n", "8", "--F", "1e308", "--B", "1e308",
                 "--W", "1"]) == 2
    err = _error(capsys)
    assert "overflow" in err or "finite" in err
    assert "Infinity" not in capsys.readouterr().out


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("argv", [
    ["schedule", "show", "-m", "1f1b", "-p", "99999999999999999999", "-n", "4"],
    ["schedule", "show", "-m", "dualpipev", "-p", "4", "-n", "99999999999999999999"],
    ["schedule", "simulate", "-m", "zb1p", "-p", "1000", "-n", "100000"],
    ["schedule", "compare", "-p", "99999999999999999999", "-n", "8"],
    ["schedule", "compare", "-p", "0", "-n", "8"],
    ["schedule", "compare", "-p", "4", "-n", "0"],
    ["schedule", "export", "-m", "zbv", "-p", "-3", "-n", "8", "--format", "json"],
])
def test_sizes_that_cannot_fit_are_errors(capsys, argv):
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    err = _error(capsys)
    assert "must be" in err or "no method can run" in err


# ------------------------------------------------------------------------- closed pipes
def test_closed_pipe_exits_quietly():
    """`deeppar ... | head -1`: no "Broken pipe" message, exit status 141 (128 + SIGPIPE)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deeppar", "schedule", "export", "-m", "dualpipe", "-p", "16",
         "-n", "256", "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": PYTHON_DIR})
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert err == ""


def test_broken_pipe_inside_a_command(monkeypatch, capsys):
    import deeppar.pipeline.cli as pcli

    def closed(args) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(pcli, "_cmd_show", closed)
    assert main(["schedule", "show", "-m", "1f1b", "-p", "2", "-n", "2"]) == 141
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------ no matplotlib
def test_pictures_without_matplotlib_are_one_line(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "s.png"
    assert main(["schedule", "show", "-m", "1f1b", "-p", "2", "-n", "2", "--png", str(png)]) == 2
    assert "deeppar[plot]" in _error(capsys)
    assert main(["eplb", "plan", "--demo", "--png", str(png)]) == 2
    assert "deeppar[plot]" in _error(capsys)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "deeppar[plot]" in _error(capsys)
    assert not png.exists() and not (tmp_path / "demo").exists()
