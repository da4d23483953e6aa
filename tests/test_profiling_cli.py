"""``deeppar trace analyze`` through deeppar.cli.main, error cases, and capture() on CPU."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _profiling_helpers import TraceBuilder

from deeppar.cli import main
from deeppar.data import sample_trace

DEEPSEEK = sample_trace()
REPO = Path(__file__).resolve().parents[1]
KEYS = ("span_us", "busy_us", "idle_us", "comm_busy_us", "compute_busy_us", "overlap_us",
        "overlap_ratio", "exposed_comm_us")


def _small(tmp_path: Path) -> Path:
    b = TraceBuilder(rank=0, world_size=1)
    b.kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL(x)", 0, 10, stream=9)
    b.kernel("my_kernel", 5, 10, stream=7)
    return b.write(tmp_path / "small.json")


def test_json_output(tmp_path, capsys):
    assert main(["trace", "analyze", str(_small(tmp_path)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (dev,) = out["devices"]
    assert all(k in dev for k in KEYS)
    assert dev["overlap_us"] == 5 and dev["overlap_ratio"] == 0.5 and dev["exposed_comm_us"] == 5
    assert out["ranks"][0]["devices"][0]["streams"]


def test_comm_pattern_option(tmp_path, capsys):
    main(["trace", "analyze", str(_small(tmp_path)), "--json", "--comm-pattern", "^my_"])
    (dev,) = json.loads(capsys.readouterr().out)["devices"]
    assert dev["comm_busy_us"] == 15 and dev["overlap_us"] == 0


def test_text_report_and_png(tmp_path, capsys):
    png = tmp_path / "timeline.png"
    assert main(["trace", "analyze", str(DEEPSEEK), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "overlap" in out and "exposed comm" in out and "dispatch(F)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = tmp_path / "timeline.html"
    assert main(["trace", "analyze", str(DEEPSEEK), "--html", str(html), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    page = html.read_text()
    assert "<svg" in page and "dispatch(F)" in page and "http" not in page.lower()
    assert '<g id="axis">' in page and "niceStep" in page  # a time axis that follows zoom
    # kernel names (escaped) and times in us on hover
    assert "<title>void dpsk::ep::internode::combine&lt;" in page and " us (" in page
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_no_gpu_events(tmp_path, capsys):
    b = TraceBuilder()
    b.cpu_op("aten::add", 0, 3)
    p = str(b.write(tmp_path / "cpu.json"))
    assert main(["trace", "analyze", p]) == 0
    assert "no GPU activity" in capsys.readouterr().out
    png, html = tmp_path / "cpu.png", tmp_path / "cpu.html"
    assert main(["trace", "analyze", p, "--png", str(png), "--html", str(html)]) == 0
    assert png.exists() and "no GPU activity" in html.read_text()


def _error(args, capsys) -> str:
    assert main(args) == 2
    return capsys.readouterr().err


def test_missing_file(tmp_path, capsys):
    err = _error(["trace", "analyze", str(tmp_path / "nope.json")], capsys)
    assert "not found" in err and "nope.json" in err


def test_not_a_trace(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text('{"hello": [1, 2, 3]}')
    assert "not a Chrome trace" in _error(["trace", "analyze", str(p)], capsys)
    p.write_text("hello")
    assert "not a Chrome trace" in _error(["trace", "analyze", str(p)], capsys)


def test_directory_skips_json_that_is_not_a_trace(tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    _small(d)
    (d / "config.json").write_text('{"lr": 0.1, "layers": [1, 2]}')
    (d / "count.json").write_text("42\n")
    assert main(["trace", "analyze", str(d), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ranks"]) == 1 and out["ranks"][0]["path"].endswith("small.json")
    assert out["devices"][0]["span_us"] == 15  # [0, 15): the one real trace
    skipped = [n for n in out["notes"] if n.startswith("skipped")]
    assert len(skipped) == 2 and all("not a Chrome trace" in n for n in skipped)
    # named directly, the same file is an error
    assert "not a Chrome trace" in _error(["trace", "analyze", str(d / "config.json")], capsys)
    # a truncated file in a directory is still an error, not skipped
    text = (d / "small.json").read_text()
    (d / "cut.json").write_text(text[: len(text) // 2])
    assert "truncated" in _error(["trace", "analyze", str(d)], capsys)
    # a directory with no trace at all
    e = tmp_path / "cfg"
    e.mkdir()
    (e / "config.json").write_text("{}")
    assert "not a Chrome trace" in _error(["trace", "analyze", str(e)], capsys)


def test_truncated_json_and_gzip(tmp_path, capsys):
    text = json.dumps(TraceBuilder().document() | {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k", "ts": i, "dur": 1, "pid": 0, "tid": 7,
         "args": {}} for i in range(200)]})
    p = tmp_path / "cut.json"
    p.write_text(text[: len(text) // 2])
    assert "truncated" in _error(["trace", "analyze", str(p)], capsys)
    g = tmp_path / "cut.json.gz"
    data = gzip.compress(text.encode())
    g.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(["trace", "analyze", str(g)], capsys)


_NO_TORCH = """
import argparse, sys
sys.modules["torch"] = None  # any import of torch now fails
from deeppar.profiling.cli import register
parser = argparse.ArgumentParser()
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(["trace", "analyze", sys.argv[1], "--json"])
sys.exit(args.func(args))
"""


def test_profiling_path_needs_no_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    res = subprocess.run([sys.executable, "-c", _NO_TORCH, str(_small(tmp_path))],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["devices"][0]["overlap_us"] == 5


def test_trace_command_does_not_import_torch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "python"))
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "deeppar", "trace", "analyze",
                          str(_small(tmp_path)), "--json"], capture_output=True, text=True,
                         env=env, check=True)
    order = [line.split("|")[-1].strip() for line in res.stderr.splitlines()]
    assert "numpy" in order and "matplotlib" not in order
    if "torch" in order:  # name the deeppar module whose import pulled torch in
        after = [m for m in order[order.index("torch"):] if m.startswith("deeppar")]
        pytest.fail(f"'deeppar trace' imported torch (through {after[:1]})")


def test_capture_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    from deeppar.profiling import capture

    model = torch.nn.Linear(4, 4)
    out = tmp_path / "out" / "trace.json"
    with capture(out, steps=2, warmup=1, cuda=False) as prof:
        for _ in range(prof.total_steps):
            with torch.profiler.record_function("fwd"):
                loss = model(torch.randn(2, 4)).sum()
            loss.backward()
            prof.step()
    assert out.exists() and prof.report is not None
    r = prof.report.ranks[0]
    assert not r.has_gpu and any("no GPU activity" in n for n in prof.report.notes)
    assert [p.name for p in r.phases] == ["fwd", "fwd"]  # the two active steps


def test_capture_too_few_steps(tmp_path):
    pytest.importorskip("torch")
    from deeppar.profiling import capture

    with (pytest.raises(ValueError, match="fewer than 3 steps"),
          capture(tmp_path / "t.json", steps=2, warmup=1, cuda=False)):
        pass  # still warming up when the block ends: nothing recorded
    with pytest.raises(ValueError, match="steps"), capture(tmp_path / "t.json", steps=0):
        pass


def _phases(tmp_path: Path) -> Path:
    b = TraceBuilder()
    for i, (name, start) in enumerate([("fwd", 0), ("bwd", 100), ("fwd", 200)]):
        b.annotation(name, start, 50)
        b.launch(i + 1, start + 10)
        b.kernel(NCCL if name == "bwd" else GEMM, 1000 + 20 * i, 10 + i, corr=i + 1,
                 stream=9 if name == "bwd" else 7)
    return b.write(tmp_path / "phases.json")


NCCL = "ncclDevKernel_AllReduce_Sum_f32_RING_LL(x)"
GEMM = "void gemm_kernel(x)"


def _table(out: str) -> list[list[str]]:
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["phase", "count"])
    rows = []
    for line in lines[head + 1:]:
        if not line.startswith("    ") or line.strip().startswith(("attributed", "(outer)")):
            break
        rows.append(line.split())
    return rows


def test_phases_added_up_by_name_and_all_phases_flag(tmp_path, capsys):
    p = str(_phases(tmp_path))
    assert main(["trace", "analyze", p]) == 0
    out = capsys.readouterr().out
    assert "phases by name (3 innermost ranges, 2 names; sums in us" in out
    # fwd: 2 ranges, kernels of 10 and 12 us (all compute); bwd: one NCCL kernel of 11 us,
    # nothing computes then, so all of it is exposed
    assert _table(out) == [["fwd", "2", "2", "100.0", "22.0", "0.0", "22.0", "0.0"],
                           ["bwd", "1", "1", "50.0", "11.0", "11.0", "0.0", "11.0"]]
    assert main(["trace", "analyze", p, "--all-phases"]) == 0
    assert [r[0] for r in _table(capsys.readouterr().out)] == ["fwd", "bwd", "fwd"]


def test_deepseek_phases_by_name(capsys):
    assert main(["trace", "analyze", str(DEEPSEEK)]) == 0
    rows = _table(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["combine(B)", "attn(F)", "mlp(B)", "dispatch(F)",
                                    "dispatch(B)", "mlp(W)", "mlp(F)", "attn(B)", "attn(W)",
                                    "combine(F)"]
    assert all(r[1] == "4" for r in rows)


def test_one_unit_throughout(tmp_path, capsys):
    assert main(["trace", "analyze", str(DEEPSEEK)]) == 0
    out = capsys.readouterr().out
    assert " ms" not in out and "129,012.0 us" in out  # the span, in us although > 10 ms
    assert main(["trace", "analyze", str(DEEPSEEK), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)

    def keys(x):
        if isinstance(x, dict):
            for k, v in x.items():
                yield k
                yield from keys(v)
        elif isinstance(x, list):
            for v in x:
                yield from keys(v)

    names = set(keys(doc))
    assert not [k for k in names if k.endswith("_ms") or k.endswith("_s")]
    assert {"span_us", "cpu_total_us", "exposed_comm_us"} <= names
    assert [s["name"] for s in doc["ranks"][0]["phase_summary"]][:2] == ["combine(B)", "attn(F)"]


def _rect_xs(page: str) -> list[float]:
    return [float(x) for x in re.findall(r'<rect x="([-0-9.e]+)" y="\d+" width', page)]


def test_window_for_the_pictures(tmp_path, capsys):
    full, cut = tmp_path / "full.html", tmp_path / "cut.html"
    assert main(["trace", "analyze", str(DEEPSEEK), "--html", str(full)]) == 0
    assert main(["trace", "analyze", str(DEEPSEEK), "--html", str(cut), "--png",
                 str(tmp_path / "cut.png"), "--window", "20000:40000"]) == 0
    out = capsys.readouterr().out
    assert "129,012.0 us" in out  # the figures still cover the whole trace
    xs_full, xs_cut = _rect_xs(full.read_text()), _rect_xs(cut.read_text())
    assert 0 < len(xs_cut) < len(xs_full)
    assert min(xs_cut) >= 0 and max(xs_cut) <= 20000  # drawn from the window's start
    page = cut.read_text()
    assert "20,000.0 .. 40,000.0 us (window)" in page and "OFF = 20000.0" in page
    assert main(["trace", "analyze", str(DEEPSEEK), "--html", str(cut), "--window",
                 "120000:"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("window, what", [
    ("abc", "expected START:END in microseconds"), ("5:1", "the end must lie after"),
    ("1:2:3", "expected START:END"), ("inf:", "finite"),
    ("200000:", "must lie after the start (200000 us); the timeline runs from 0 to")])
def test_window_errors(tmp_path, capsys, window, what):
    err = _error(["trace", "analyze", str(DEEPSEEK), "--png", str(tmp_path / "w.png"),
                  "--window", window], capsys)
    assert what in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w.png").exists()


def test_window_needs_a_picture(capsys):
    assert "--window applies to the pictures" in _error(
        ["trace", "analyze", str(DEEPSEEK), "--window", "1:2"], capsys)


def test_progress_only_when_asked_or_on_a_terminal(tmp_path, capsys):
    p = str(_small(tmp_path))
    assert main(["trace", "analyze", p, "--json"]) == 0
    assert capsys.readouterr().err == ""  # not a terminal
    assert main(["trace", "analyze", p, "--json", "--progress"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("\rreading small.json:") and "100%" in err and err.endswith("\n")


def test_max_mb_guard(tmp_path, capsys):
    err = _error(["trace", "analyze", str(_small(tmp_path)), "--max-mb", "0.0001"], capsys)
    assert "more than 104 bytes of JSON text (a regular file)" in err
    assert "--max-mb must be a positive" in _error(
        ["trace", "analyze", str(_small(tmp_path)), "--max-mb", "-1"], capsys)


def test_module_entry_point_errors_are_one_line(tmp_path, capsys):
    from deeppar.profiling.__main__ import main as module_main

    p = tmp_path / "zeros.json"
    p.write_bytes(b"\x00" * 100)
    assert module_main(["analyze", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeppar trace: error:") and "first byte 0x00" in err
    assert len(err.strip().splitlines()) == 1
    d = tmp_path / "locked.json"
    d.write_text("{}")
    d.chmod(0)
    if os.access(d, os.R_OK):  # running as root: permissions do not apply
        return
    assert module_main(["analyze", str(d)]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_progress_line_is_closed_before_an_error(tmp_path, capsys, monkeypatch):
    from deeppar.profiling import _parse

    monkeypatch.setattr(_parse, "_CHUNK", 256)  # the error comes before the end of the file
    p = tmp_path / "bad.json"
    p.write_text('{"traceEvents": [{"ph": "X", "cat": "kernel", "ts": tru}, '
                 + ",".join(['{"ph": "X", "cat": "cpu_op"}'] * 200) + "]}")
    assert main(["trace", "analyze", str(p), "--progress"]) == 2
    progress, message, _ = capsys.readouterr().err.split("\n")
    assert progress.startswith("\rreading bad.json:") and "100%" not in progress
    assert message.startswith("deeppar trace: error:") and "invalid JSON" in message
