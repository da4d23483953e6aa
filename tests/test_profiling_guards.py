"""Hostile or broken trace files: refused early, in one pass, with one-line errors.

Timing is never asserted: the progress callback shows how much of a file was read before
the error, which is what makes reporting linear (an error near the start reads one chunk).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from deeppar._jsonsafe import MAX_DEPTH, load_json_file, loads_strict
from deeppar.cli import main
from deeppar.profiling import _parse
from deeppar.profiling.loader import load_trace

KERNEL = ('{"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": %s, "dur": %s, '
          '"args": {"device": %s, "stream": 7, "correlation": 1}}')
CPU_OP = '{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 2, "ts": 5, "dur": 1}'


def _trace(path: Path, events: list[str], filler_mb: float = 0.0) -> Path:
    """A trace of ``events`` followed by about ``filler_mb`` MB of CPU ops."""
    n = int(filler_mb * 2**20 / (len(CPU_OP) + 2))
    body = ",\n".join(events + [CPU_OP] * n)
    path.write_text('{"schemaVersion": 1, "traceEvents": [\n' + body + "\n]}")
    return path


def _read_until_error(path: Path, **kw) -> tuple[str, int]:
    """The error message and how many bytes had been read when it was raised."""
    seen = [0]

    def progress(done: int, _total: int | None) -> None:
        seen[0] = max(seen[0], done)

    with pytest.raises(ValueError) as exc:
        load_trace(path, progress=progress, **kw)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg, seen[0]


def test_nul_bytes_rejected_at_the_first_chunk(tmp_path):
    p = tmp_path / "zeros.json"
    with open(p, "wb") as f:
        f.truncate(24 << 20)  # 24 MB of NUL bytes (sparse: instant)
    msg, read = _read_until_error(p)
    assert "not a Chrome trace" in msg and "binary data (first byte 0x00)" in msg
    assert read <= _parse._CHUNK


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_dev_zero_is_refused_not_read_forever():
    with pytest.raises(ValueError, match="first byte 0x00"):
        load_trace("/dev/zero")


def _fifo(tmp_path: Path, head: bytes, repeat: bytes) -> Path:
    """A FIFO fed ``head`` then ``repeat`` forever, until the reader goes away."""
    path = tmp_path / "fifo.json"
    os.mkfifo(path)

    def feed() -> None:
        try:
            with open(path, "wb") as f:
                f.write(head)
                while True:
                    f.write(repeat * 1000)
        except (BrokenPipeError, ValueError):
            pass

    threading.Thread(target=feed, daemon=True).start()
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
@pytest.mark.parametrize("repeat", [CPU_OP.encode() + b",\n", b" "])
def test_endless_fifo_stops_at_the_size_guard(tmp_path, repeat):
    p = _fifo(tmp_path, b'{"traceEvents": [', repeat)
    msg, read = _read_until_error(p, max_bytes=3 << 20)
    assert f"more than {3 << 20} bytes of JSON text (not a regular file)" in msg
    assert read <= (3 << 20) + 2 * _parse._CHUNK


def test_unread_fifo_default_guard_is_set():
    assert _parse.DEFAULT_MAX_BYTES == 32 << 30


@pytest.mark.parametrize("bad, where", [
    ('{"ph": "X", "cat": "kernel", "ts": 1, "dur": tru}', "invalid JSON"),
    (CPU_OP + " " + CPU_OP, "expected ',' or ']' after an event"),
    (CPU_OP + ", ]", "',' before ']'"),
    ('{"ph": "X", "cat": "kernel", "ts": 1, "dur": 2, "x": [}]}', "'}' does not close"),
])
def test_bad_event_near_the_start_is_reported_after_one_chunk(tmp_path, bad, where):
    events = [KERNEL % (10, 2, 0), bad, KERNEL % (20, 2, 0)]
    p = _trace(tmp_path / "bad.json", events, filler_mb=12)
    msg, read = _read_until_error(p)
    assert where in msg and str(p) in msg
    offset = int(msg.rsplit("at byte ", 1)[1].split()[0].rstrip(":"))
    text = p.read_bytes()
    start = text.index(bad.encode())
    assert start <= offset <= start + len(bad) + 2  # points into the bad event
    assert read <= 2 * _parse._CHUNK  # not the 12 MB that follow


def test_mismatched_brackets_name_the_event(tmp_path):
    bad = '{"ph": "X", "cat": "cpu_op", "args": {"a": [1, 2}]}'  # '{' ... ']'
    p = _trace(tmp_path / "m.json", [KERNEL % (1, 2, 0), bad], filler_mb=1)
    msg, _ = _read_until_error(p)
    start = p.read_bytes().index(bad.encode())
    assert f"the element starting at byte {start}: '}}' does not close" in msg
    assert msg.endswith(f"at byte {start + bad.index('}]')}")


def test_unbalanced_event_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(_parse, "MAX_EVENT_BYTES", 1 << 20)
    unclosed = '{"ph": "X", "cat": "cpu_op", "args": {"a": [1, 2}'  # never closes
    p = _trace(tmp_path / "u.json", [KERNEL % (1, 2, 0), unclosed], filler_mb=6)
    msg, read = _read_until_error(p)
    assert "longer than 1048576 bytes (unbalanced brackets?)" in msg
    assert read <= (1 << 20) + 2 * _parse._CHUNK


def test_unclosed_metadata_value_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(_parse, "MAX_EVENT_BYTES", 1 << 20)
    p = tmp_path / "m.json"
    p.write_text('{"deviceProperties": "' + "x" * (3 << 20))  # the string never ends
    msg, read = _read_until_error(p)
    assert "a JSON value longer than 1048576 bytes (unbalanced brackets or quotes?) " \
           "starts at byte 21" in msg
    assert read <= (1 << 20) + 2 * _parse._CHUNK


def test_each_byte_is_read_once(tmp_path):
    """A valid file is read exactly once, whatever its size (no second pass)."""
    for mb in (1, 4):
        p = _trace(tmp_path / f"ok{mb}.json", [KERNEL % (10, 2, 0)], filler_mb=mb)
        reads = []
        t = load_trace(p, progress=lambda done, total, r=reads: r.append((done, total)))
        assert t.gpu_start.size == 1
        assert reads[-1] == (p.stat().st_size, p.stat().st_size)


@pytest.mark.parametrize("ts, dur, device, what", [
    ("1e999", "1", "0", "'ts' 1e999 is out of range"),
    ("-1e999", "1", "0", "'ts' -1e999 is out of range"),
    ("1" + "0" * 30, "1", "0", "is out of range"),
    ("NaN", "1", "0", "'ts' NaN is out of range"),
    ("5", "1e999", "0", "'dur' 1e999 is out of range"),
    ("5", "Infinity", "0", "'dur' Infinity is out of range"),
    ("5", "1", "1e30", "args.device must be an integer below 2^63 in magnitude, got 1e30"),
    ("5", "1", "1" + "0" * 30, "args.device must be an integer"),
    ("5", "1", '"gpu0"', "args.device must be an integer"),
    ("5", "1", "1.5", "args.device must be an integer"),
])
def test_numbers_out_of_range_are_one_line_errors(tmp_path, capsys, ts, dur, device, what):
    p = _trace(tmp_path / "n.json", [KERNEL % (1, 1, 0), KERNEL % (ts, dur, device)])
    msg, _ = _read_until_error(p)
    assert what in msg and "event at byte" in msg
    assert main(["trace", "analyze", str(p)]) == 2
    err = capsys.readouterr().err
    assert what in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("doc", [
    '{"traceEvents": [' + "[" * 100_000 + "]" * 100_000 + "]}",
    '{"traceEvents": [{"ph": "X", "cat": "kernel", "args": ' + '{"a": ' * 100_000 + "1"
    + "}" * 100_000 + "}]}",
    '{"deviceProperties": ' + "[" * 100_000 + "]" * 100_000 + ', "traceEvents": []}',
    "[" * 100_000 + "]" * 100_000,
])
def test_deep_nesting_is_refused(tmp_path, capsys, doc):
    p = tmp_path / "deep.json"
    p.write_text(doc)
    msg, _ = _read_until_error(p)
    assert f"nested deeper than {MAX_DEPTH} levels at byte" in msg
    assert main(["trace", "analyze", str(p)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_nesting_up_to_the_limit_is_read(tmp_path):
    p = tmp_path / "ok.json"
    for extra in (0, 1):  # object, traceEvents, event, args: 4 levels before "x"
        deep = "[" * (MAX_DEPTH - 4 + extra) + "]" * (MAX_DEPTH - 4 + extra)
        p.write_text('{"traceEvents": [{"ph": "X", "cat": "kernel", "ts": 1, "dur": 2, '
                     f'"args": {{"x": {deep}}}}}]}}')
        if extra:
            with pytest.raises(ValueError, match="nested deeper"):
                load_trace(p)
        else:
            assert load_trace(p).gpu_start.size == 1


def test_negative_and_missing_durations_are_counted(tmp_path):
    events = [KERNEL % (1, 2, 0), KERNEL % (5, -3, 0), KERNEL % (8, "-0.5", 0),
              '{"ph": "X", "cat": "kernel", "name": "nodur", "ts": 9}',
              '{"ph": "X", "cat": "user_annotation", "name": "a", "ts": 9, "dur": -1}']
    t = load_trace(_trace(tmp_path / "d.json", events))
    assert t.gpu_end.tolist() == [3 - 1, 5 - 1, 8 - 1, 9 - 1]  # relative to ts 1
    assert t.notes == ["3 events with a negative dur taken as 0 long",
                       "1 complete events without dur taken as 0 long"]


def test_extra_data_and_bad_top_level(tmp_path):
    p = tmp_path / "x.json"
    for text, what in [('{"traceEvents": []} {}', "extra data"),
                       ('{"traceEvents": [], }', "expected a key"),
                       ('{"traceEvents": []', "truncated"),
                       ('{"traceEvents": {}}', "'traceEvents' is not an array"),
                       ('{"traceEvents": [], "traceEvents": []}', "appears twice"),
                       ('{"other": {"a": [1}], "traceEvents": []}', "'}' does not close"),
                       ("\x00{}", "binary data"),
                       ("nul", "not a Chrome trace")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=what):
            load_trace(p)


# -------------------------------------------------------------- the shared safe JSON reader

def test_load_json_file_refuses_what_json_load_accepts_or_crashes_on(tmp_path):
    p = tmp_path / "m.json"
    cases = [("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels at byte "
              f"{MAX_DEPTH}"),
             ('{"F": NaN}', "NaN is not a JSON number"),
             ('{"F": -Infinity}', "-Infinity is not a JSON number"),
             ('{"F": 1e999}', "number 1e999 is out of range"),
             ('{"F": ' + "9" * 5000 + "}", "invalid JSON value"),
             ('{"F": 1,}', "invalid JSON at byte 8 (line 1, column 9)"),
             ("\x00\x00", "not JSON: binary data (first byte 0x00)"),
             ("", "not JSON: an empty file")]
    for text, what in cases:
        p.write_text(text)
        with pytest.raises(ValueError, match=None) as exc:
            load_json_file(p)
        assert what in str(exc.value) and str(p) in str(exc.value), (text[:20], exc.value)
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError, match="not UTF-8 text at byte 7"):
        load_json_file(p)
    p.write_text('{"a": [1, 2.5, "x"], "b": null}')
    assert load_json_file(p) == {"a": [1, 2.5, "x"], "b": None}
    with pytest.raises(ValueError, match="is a directory"):
        load_json_file(tmp_path)
    with pytest.raises(ValueError, match="more than the limit of 4"):
        load_json_file(p, max_bytes=4)
    assert loads_strict(b' [1, {"a": "]["}] ', "x") == [1, {"a": "]["}]


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_load_json_file_bounds_devices():
    with pytest.raises(ValueError, match="more than 1024 bytes"):
        load_json_file("/dev/zero", max_bytes=1024)


def test_structure_ignores_escaped_quotes_and_brackets_in_strings():
    from deeppar._jsonsafe import structure

    text = json.dumps(["a\\", {"k": 'x"]}{['}, "\\\\\"", [1]]).encode()
    off, steps = structure(text)
    assert bytes(text[i] for i in off.tolist()) == b"[{}[]]"
    assert steps.tolist() == [1, 1, -1, 1, -1, -1]
