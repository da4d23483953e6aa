"""The bytes-level fast path of the trace loader gives exactly what the json path gives."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from deeppar.data import sample_trace
from deeppar.profiling import _fastscan, _jsonstream, loader
from deeppar.profiling.loader import load_trace

TRACE = sample_trace()


def _same(a, b) -> None:
    for key, va in vars(a).items():
        vb = getattr(b, key)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb), key
        else:
            assert va == vb, key


def _both(path: Path, no_fallback: bool = False, monkeypatch=None):
    """Load with both paths; with ``no_fallback`` the json path may not be used at all."""
    slow = load_trace(path, fast=False)
    if no_fallback:
        def boom(*_a, **_k):
            raise AssertionError("fast path fell back to the text parser")

        with monkeypatch.context() as m:
            m.setattr(loader, "iter_trace_events", boom)
            fast = load_trace(path)
    else:
        fast = load_trace(path)
    _same(fast, slow)
    return fast


def _events(n: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    evs: list[dict] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                        "args": {"name": "GPU 0"}}]
    for i in range(n):
        t = 1_000 + 10 * i
        evs.append({"ph": "X", "cat": "cpu_op", "name": f"aten::op{i}", "pid": 10, "tid": 11,
                    "ts": t, "dur": 3, "args": {"External id": i, "Input Dims": [[1, 2], []],
                                                "Input type": ["float", ""]}})
        evs.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 10,
                    "tid": 11, "ts": t + 1, "dur": 1, "args": {"correlation": i, "cbid": 211}})
        evs.append({"ph": "s", "id": i, "pid": 10, "tid": 11, "ts": t + 1, "cat": "ac2g",
                    "name": "ac2g"})
        evs.append({"ph": "X", "cat": rng.choice(["kernel", "gpu_memcpy", "gpu_memset"]),
                    "name": rng.choice(["gemm", "nccl_AllReduce", "f<{lambda()#1}>", "k_\u00e9"]),
                    "pid": 0, "tid": 7 + i % 2, "ts": t + 5, "dur": 4,
                    "args": {"device": 0, "stream": 7 + i % 2, "correlation": i}})
        if i % 10 == 0:
            evs.append({"ph": "X", "cat": "user_annotation", "name": f"phase{i // 10}",
                        "pid": 10, "tid": 11, "ts": t, "dur": 95, "args": {}})
    return evs


def _write(path: Path, events: list, indent=None, head: dict | None = None,
           tail: dict | None = None, gz: bool = False) -> Path:
    doc = {"schemaVersion": 1, "distributedInfo": {"rank": 3, "world_size": 8}, **(head or {}),
           "traceEvents": events, **(tail or {"traceName": "t"})}
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_real_trace_fast_equals_slow(tmp_path, monkeypatch):
    t = _both(TRACE, no_fallback=True, monkeypatch=monkeypatch)
    assert t.n_events == 14240 and t.ann_start.size == 42
    plain = tmp_path / "t.json"
    plain.write_bytes(gzip.decompress(TRACE.read_bytes()))
    _both(plain, no_fallback=True, monkeypatch=monkeypatch)


@pytest.mark.parametrize("indent", [None, 1, 4])
def test_layouts(tmp_path, monkeypatch, indent):
    _both(_write(tmp_path / "t.json", _events(), indent=indent), no_fallback=True,
          monkeypatch=monkeypatch)


def test_shuffled_keys_and_whitespace(tmp_path, monkeypatch):
    rng = random.Random(5)
    evs = []
    for e in _events():
        items = list(e.items())
        rng.shuffle(items)
        if isinstance(e.get("args"), dict):
            a = list(e["args"].items())
            rng.shuffle(a)
            items = [(k, dict(a) if k == "args" else v) for k, v in items]
        evs.append(dict(items))
    text = json.dumps({"traceEvents": evs}, separators=(",", ":"))
    p = tmp_path / "t.json"
    p.write_text(text.replace(',"', ' ,\n\t"').replace(":", " : "))
    _both(p, no_fallback=True, monkeypatch=monkeypatch)


def test_string_and_float_timestamps(tmp_path):
    evs = _events()
    for i, e in enumerate(evs):
        if "ts" in e:
            e["ts"] = f"{e['ts']}.125" if i % 3 == 0 else (e["ts"] + 0.5 if i % 3 == 1 else e["ts"])
        if "dur" in e and i % 4 == 0:
            e["dur"] = str(e["dur"])
    t = _both(_write(tmp_path / "t.json", evs))
    assert t.gpu_start.size > 0


def test_unreadable_ts_and_dur_are_skipped_and_counted(tmp_path, monkeypatch):
    evs = _events()
    kernels = [e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kernels[0]["dur"] = "x"  # not a number
    kernels[1]["ts"] = "abc"
    kernels[2]["ts"] = None
    kernels[3]["dur"] = [1]
    kernels[4]["dur"] = "2.5"  # a number written as text: kept
    evs[2]["dur"] = "x"  # a launch call's dur is not used: kept
    t = _both(_write(tmp_path / "t.json", evs), no_fallback=True, monkeypatch=monkeypatch)
    assert t.gpu_start.size == 60 - 4
    assert t.notes == ["4 events with unreadable ts/dur skipped"]
    assert load_trace(_write(tmp_path / "ok.json", _events())).notes == []


def _begin_end_events() -> list[dict]:
    evs = _events()
    for i in range(0, 60, 7):
        t = 1_000 + 10 * i
        evs.append({"ph": "B", "cat": "user_annotation", "name": f"be{i}", "pid": 10,
                    "tid": 11, "ts": t + 2})
        evs.append({"ph": "E", "pid": 10, "tid": 11, "ts": f"{t + 8}.5"})  # no category
        evs.append({"ph": "B", "cat": "kernel", "name": "gk", "pid": 0, "tid": 7, "ts": t})
        evs.append({"ph": "E", "cat": "kernel", "name": "gk", "pid": 0, "tid": 7, "ts": t + 1})
        evs.append({"ph": "B", "cat": "cpu_op", "name": "op", "pid": 10, "tid": 11, "ts": t})
        evs.append({"ph": "E", "cat": "cpu_op", "name": "op", "pid": 10, "tid": 11, "ts": t})
    evs.append({"ph": "E", "cat": "user_annotation", "pid": 10, "tid": 12, "ts": 5})
    evs.append({"ph": "E", "pid": 10, "tid": 12, "ts": 6})  # no "B" before it: ignored
    evs.append({"ph": "B", "cat": "user_annotation", "name": "open", "pid": 10, "tid": 13,
                "ts": 7})
    return evs


@pytest.mark.parametrize("indent", [None, 1])
def test_begin_end_events(tmp_path, monkeypatch, indent):
    evs = _begin_end_events()
    t = _both(_write(tmp_path / "t.json", evs, indent=indent), no_fallback=True,
              monkeypatch=monkeypatch)
    assert sum(n.startswith("be") for n in (t.names[i] for i in t.ann_name.tolist())) == 9
    assert t.notes == ["9 GPU activities or launch calls given as B/E pairs skipped (only "
                       "complete 'X' events carry their device, stream and correlation)",
                       "2 B/E events without a partner skipped (1 B never closed, 1 E with "
                       "no open B)"]
    # the cat-less "E" comes first in the file, before any "B": both paths ignore it
    evs.insert(1, {"ph": "E", "pid": 10, "tid": 11, "ts": 1})
    p = _write(tmp_path / "u.json", evs)
    slow = load_trace(p, fast=False)
    for size in (64, 1000, 1 << 22):
        monkeypatch.setattr(_fastscan, "_CHUNK", size)
        _same(load_trace(p), slow)


def test_escaped_names_and_unicode(tmp_path):
    evs = _events()
    evs[4]["name"] = 'kern "quoted" \\ back\\slash'
    evs[8]["name"] = "annotation \u00e9\u4e2d"
    evs.append({"ph": "X", "cat": "user_annotation", "name": "caf\u00e9 \U0001F600",
                "pid": 10, "tid": 11, "ts": 1500, "dur": 5, "args": {}})
    t = _both(_write(tmp_path / "t.json", evs))
    assert 'kern "quoted" \\ back\\slash' in t.names
    _both(_write(tmp_path / "u.json", _events()[:3] + [{"ph": "X", "c\\u0061t": "kernel"}]))


def test_unusual_values_and_nesting(tmp_path):
    evs = _events()
    evs[4]["args"]["stream"] = "8"  # stream as a string
    evs[5]["pid"] = 1.5  # float pid
    evs[6]["args"]["deep"] = {"a": [[[{"b": [1, {"c": None}]}]]]}
    evs[7]["ph"] = None
    evs.insert(9, 42)  # not an object: skipped
    evs.insert(10, [{"ph": "X", "cat": "kernel", "ts": 1}])  # an array holding an object
    evs.append({"ph": "X", "cat": "kernel", "name": "dup", "ts": 5000, "dur": 1,
                "args": {"device": 0, "stream": 3}})
    p = tmp_path / "t.json"
    text = json.dumps({"traceEvents": evs})
    # a repeated "args" key: the last one counts, as with json
    text = text.replace('"name": "dup", ', '"name": "dup", "args": {"stream": 99}, ')
    p.write_text(text)
    t = _both(p)
    assert 99 not in t.gpu_stream.tolist()


def test_bare_array_gzip_and_metadata_after_events(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(_events()))
    _both(p)
    g = _write(tmp_path / "t.json.gz", _events(), indent=2, gz=True,
               tail={"deviceProperties": [{"id": 0}], "traceName": "x",
                     "baseTimeNanoseconds": 123})
    t = _both(g)
    assert t.meta["baseTimeNanoseconds"] == 123 and t.rank == 3


def test_small_chunks(tmp_path, monkeypatch):
    """Refills at every possible place: elements cut anywhere by the buffer end."""
    p = _write(tmp_path / "t.json", _events(40), indent=1)
    slow = load_trace(p, fast=False)
    for size in (7, 64, 1000):
        monkeypatch.setattr(_fastscan, "_CHUNK", size)
        _same(load_trace(p), slow)


def test_errors_are_clear(tmp_path):
    text = json.dumps({"traceEvents": _events()})
    p = tmp_path / "cut.json"
    p.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_trace(p)
    g = tmp_path / "cut.json.gz"
    data = gzip.compress(text.encode())
    g.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_trace(g)
    for bad in ('{"hello": [1, 2]}', "hello", ""):
        p.write_text(bad)
        with pytest.raises(ValueError, match="not a Chrome trace"):
            load_trace(p)
    p.write_bytes(b'{"traceEvents": [{"ph": "X", "name": "\xff"}]}')
    with pytest.raises(ValueError, match="UTF-8"):
        load_trace(p)


def test_meta_keys_shared():
    assert "distributedInfo" in _jsonstream.META_KEYS
