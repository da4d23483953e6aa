"""The streaming trace parser gives exactly what ``json.load`` of the whole file gives.

The oracle: ``json.load`` (floats and constants kept as text), every event through
``event_record``, then the same column builder; the parser must produce identical columns.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deeppar.data import sample_trace
from deeppar.profiling import _parse, loader
from deeppar.profiling._parse import (
    KIND_ANNOTATION,
    KIND_KERNEL,
    KIND_LAUNCH,
    META_KEYS,
    TraceEvent,
    event_record,
)
from deeppar.profiling.loader import load_trace

TRACE = sample_trace()


def reference(path: Path) -> loader.RankTrace:
    """The columns built from ``json.load`` of the whole file."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    doc = json.loads(raw, parse_float=str, parse_constant=str)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    meta = {k: doc[k] for k in META_KEYS if isinstance(doc, dict) and k in doc}
    records = [r for r in map(event_record, events) if r is not None]
    counts = [sum(isinstance(e, dict) for e in events)]
    return loader._collect(str(path), None, iter([records]), meta, counts)


def _same(a: loader.RankTrace, b: loader.RankTrace) -> None:
    for key, va in vars(a).items():
        vb = getattr(b, key)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb), key
        else:
            assert va == vb, key


def check(path: Path) -> loader.RankTrace:
    got = load_trace(path)
    _same(got, reference(path))
    return got


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
           tail: dict | None = None, gz: bool = False, ascii: bool = False) -> Path:
    doc = {"schemaVersion": 1, "distributedInfo": {"rank": 3, "world_size": 8}, **(head or {}),
           "traceEvents": events, **(tail or {"traceName": "t"})}
    text = json.dumps(doc, indent=indent, ensure_ascii=ascii)
    data = text.encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_deepseek_trace_equals_json_load(tmp_path):
    t = check(TRACE)
    assert t.n_events == 14240 and t.ann_start.size == 42 and t.gpu_start.size == 983
    plain = tmp_path / "t.json"
    plain.write_bytes(gzip.decompress(TRACE.read_bytes()))
    check(plain)


@pytest.mark.parametrize("indent", [None, 0, 1, 4, "\t"])
def test_layouts(tmp_path, indent):
    check(_write(tmp_path / "t.json", _events(), indent=indent))


def test_shuffled_keys_and_odd_whitespace(tmp_path):
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
    p.write_text("\r\n \t" + text.replace(',"', ' ,\n\t"').replace(":", " : ")
                 .replace("},{", "}\n\n ,\r\n{") + "\n\n")
    check(p)
    p.write_text(text.replace("},{", "}," + " " * 100 + "{"))  # long gaps
    check(p)


def test_numbers_in_every_json_form(tmp_path):
    forms = ["1000", "-0", "0", "1e3", "1E3", "1e+3", "1E-3", "1000.0", "1000.125", "-5.5",
             "0.5e1", "1.7e15", "1700000000000000.125", '"1000"', '"1000.5"', '"1e3"',
             "123456789012345678"]
    items = []
    for i, ts in enumerate(forms):
        for dur in ("4", "4.5", "4e0", '"4"', "0.0", "-0.0"):
            items.append(f'{{"ph":"X","cat":"kernel","name":"k{i}","pid":0,"tid":7,'
                         f'"ts":{ts},"dur":{dur},"args":{{"device":0,"stream":7,'
                         f'"correlation":{i}}}}}')
            items.append(f'{{"ph":"X","cat":"cuda_runtime","name":"l","pid":1,"tid":2,'
                         f'"ts":{ts},"dur":{dur},"args":{{"correlation":{i}}}}}')
    p = tmp_path / "n.json"
    p.write_text('{"traceEvents":[' + ",".join(items) + "]}")
    t = check(p)
    assert t.gpu_start.size == len(forms) * 6


def test_string_and_float_timestamps(tmp_path):
    evs = _events()
    for i, e in enumerate(evs):
        if "ts" in e:
            e["ts"] = f"{e['ts']}.125" if i % 3 == 0 else (e["ts"] + 0.5 if i % 3 == 1 else e["ts"])
        if "dur" in e and i % 4 == 0:
            e["dur"] = str(e["dur"])
    assert check(_write(tmp_path / "t.json", evs)).gpu_start.size > 0


def test_unreadable_ts_and_dur_are_skipped_and_counted(tmp_path):
    evs = _events()
    kernels = [e for e in evs if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    kernels[0]["dur"] = "x"  # not a number
    kernels[1]["ts"] = "abc"
    kernels[2]["ts"] = None
    kernels[3]["dur"] = [1]
    kernels[4]["dur"] = "2.5"  # a number written as text: kept
    kernels[5]["ts"] = True
    evs[2]["dur"] = "x"  # a launch call's dur is not used: kept
    t = check(_write(tmp_path / "t.json", evs))
    assert t.gpu_start.size == 60 - 5
    assert t.notes == ["5 events with unreadable ts/dur skipped"]
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
    t = check(_write(tmp_path / "t.json", evs, indent=indent))
    assert sum(n.startswith("be") for n in (t.names[i] for i in t.ann_name.tolist())) == 9
    assert t.notes == ["9 GPU activities or launch calls given as B/E pairs skipped (only "
                       "complete 'X' events carry their device, stream and correlation)",
                       "2 B/E events without a partner skipped (1 B never closed, 1 E with "
                       "no open B)"]
    # a cat-less "E" first in the file, before any "B", is ignored, in any chunking
    evs.insert(1, {"ph": "E", "pid": 10, "tid": 11, "ts": 1})
    p = _write(tmp_path / "u.json", evs)
    want = reference(p)
    for size in (64, 1000, 1 << 22):
        monkeypatch.setattr(_parse, "_CHUNK", size)
        _same(load_trace(p), want)


def test_escapes_and_unicode(tmp_path):
    evs = _events()
    evs[4]["name"] = 'kern "quoted" \\ back\\slash \\" \\\\"'
    evs[8]["name"] = "annotation \u00e9\u4e2d"
    evs.append({"ph": "X", "cat": "user_annotation", "name": "caf\u00e9 \U0001F600 \x01",
                "pid": 10, "tid": 11, "ts": 1500, "dur": 5, "args": {}})
    evs.append({"ph": "X", "cat": "cpu_op", "name": 'a}"{]["', "pid": 10, "tid": 11,
                "ts": 1, "dur": 1})  # brackets and escaped quotes inside a skipped string
    for ascii_only in (False, True):  # raw UTF-8, and \\u escapes (surrogate pairs)
        t = check(_write(tmp_path / "t.json", evs, ascii=ascii_only))
        assert 'kern "quoted" \\ back\\slash \\" \\\\"' in t.names
        assert "caf\u00e9 \U0001F600 \x01" in t.names
    # keys and categories written with escapes are what json makes of them
    p = tmp_path / "u.json"
    p.write_text('{"traceEvents": [{"ph": "X", "c\\u0061t": "k\\u0065rnel", "ts": 5, '
                 '"dur": 2, "name": "esc", "args": {"d\\u0065vice": 3}}, '
                 '{"ph": "X", "cat": "kernel", "ts": 9, "dur": 1, "name": "plain"}]}')
    t = check(p)
    assert t.gpu_device.tolist() == [3, 0]


def test_unusual_values_and_nesting(tmp_path):
    evs = _events()
    evs[4]["args"]["stream"] = "8"  # stream as a string
    evs[5]["pid"] = 1.5  # float pid
    evs[6]["args"]["deep"] = {"a": [[[{"b": [1, {"c": None}]}]]]}
    evs[7]["ph"] = None
    evs[9]["pid"] = {"odd": [1]}  # unhashable pid: kept as its text
    evs.insert(9, 42)  # not an object: skipped
    evs.insert(10, [{"ph": "X", "cat": "kernel", "ts": 1}])  # an array holding an object
    evs.insert(11, "kernel")
    evs.insert(12, None)
    evs.append({"ph": "X", "cat": "kernel", "name": "dup", "ts": 5000, "dur": 1,
                "args": {"device": 0, "stream": 3}})
    p = tmp_path / "t.json"
    text = json.dumps({"traceEvents": evs})
    # a repeated "args" key: the last one counts, as with json
    text = text.replace('"name": "dup", ', '"name": "dup", "args": {"stream": 99}, ')
    p.write_text(text)
    t = check(p)
    assert 99 not in t.gpu_stream.tolist()


def test_bare_array_gzip_and_metadata_after_events(tmp_path):
    p = tmp_path / "a.json"
    p.write_text(json.dumps(_events()))
    check(p)
    p.write_text("[]")
    assert check(p).n_events == 0
    g = _write(tmp_path / "t.json.gz", _events(), indent=2, gz=True,
               tail={"deviceProperties": [{"id": 0}], "traceName": "x",
                     "baseTimeNanoseconds": 123, "other": {"x": [1, {"y": "]"}]}})
    t = check(g)
    assert t.meta["baseTimeNanoseconds"] == 123 and t.rank == 3


@pytest.mark.parametrize("size", [7, 64, 1000])
def test_small_chunks(tmp_path, monkeypatch, size):
    """Refills at every possible place: elements and values cut anywhere."""
    evs = _begin_end_events()
    evs[4]["name"] = 'esc "q" \\'
    p = _write(tmp_path / "t.json", evs, indent=1,
               head={"deviceProperties": [{"name": "H800 \"x\"", "id": 0}]})
    want = reference(p)
    monkeypatch.setattr(_parse, "_CHUNK", size)
    _same(load_trace(p), want)


@pytest.mark.parametrize("seed", range(4))
def test_random_traces(tmp_path, seed):
    rng = random.Random(seed)
    evs = _begin_end_events() + [7, [], {}, {"ph": "E"}, {"cat": "kernel"}]
    rng.shuffle(evs)
    check(_write(tmp_path / "r.json", evs, indent=rng.choice([None, 1, 3]),
                 ascii=rng.random() < 0.5))


def test_event_record_fields():
    ev = {"ph": "X", "cat": "kernel", "name": "k", "pid": 0, "tid": 7, "ts": 5, "dur": "2.5",
          "args": {"device": 1, "stream": 7, "correlation": 9}}
    assert event_record(ev, 40) == TraceEvent(KIND_KERNEL, "X", 5, "2.5", "k", 0, 7, 1, 7, 9,
                                              40)
    launch = {"ph": "X", "cat": "cuda_runtime", "ts": 1, "args": "not a dict"}
    assert event_record(launch) == TraceEvent(KIND_LAUNCH, "X", 1, None, "", None, None, None,
                                              None, None, 0)
    begin = {"ph": "B", "cat": "user_annotation", "name": "fwd", "ts": 3, "pid": 1, "tid": 2}
    assert event_record(begin).kind == KIND_ANNOTATION and event_record(begin).dur is None
    assert event_record({"ph": "E", "ts": 4}).kind is None  # may close a kept "B"
    assert event_record({"ph": "E", "cat": "cpu_op"}) is None
    assert event_record({"ph": "B"}) is None
    assert event_record({"ph": "X", "cat": "cpu_op"}) is None
    assert event_record({"ph": "i", "cat": "kernel"}) is None
    assert event_record([1]) is None


def test_meta_keys():
    assert "distributedInfo" in META_KEYS


# ------------------------------------------------------------------ property: any layout

_text = st.text(alphabet=st.sampled_from(list('ab"\\/{}[],: \u00e9\u4e2d\U0001F600\x01\n')),
                max_size=8)
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                       st.floats(-1e6, 1e6, allow_nan=False), _text)
_json_any = st.recursive(_json_leaf, lambda kids: st.one_of(
    st.lists(kids, max_size=3), st.dictionaries(_text, kids, max_size=3)), max_leaves=8)
_number = st.one_of(st.integers(0, 10**15), st.floats(0, 1e9, allow_nan=False),
                    st.integers(0, 10**6).map(str), st.sampled_from(["abc", None, True]))
_event = st.fixed_dictionaries(
    {"ph": st.sampled_from(["X", "X", "B", "E", "i", "M"])},
    optional={"cat": st.sampled_from(["kernel", "gpu_memcpy", "cuda_runtime", "Runtime",
                                      "user_annotation", "cpu_op", "ac2g", "k\u00e9rnel"]),
              "name": _text, "ts": _number, "dur": _number,
              "pid": st.one_of(st.integers(0, 3), _text), "tid": st.integers(0, 3),
              "args": st.fixed_dictionaries({}, optional={
                  "device": st.integers(0, 3), "stream": st.integers(0, 9),
                  "correlation": st.integers(-1, 50), "extra": _json_any}),
              "extra": _json_any})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_event, _event, _event, _json_any), max_size=25),
       st.sampled_from([None, 0, 1, 3]), st.booleans(), st.sampled_from([5, 64, 1 << 22]),
       st.booleans())
def test_any_layout_matches_json_load(tmp_path_factory, events, indent, ascii_only, chunk,
                                      bare):
    path = tmp_path_factory.mktemp("prop") / "t.json"
    doc = events if bare else {"schemaVersion": 1, "traceEvents": events, "x": events[:2]}
    path.write_text(json.dumps(doc, indent=indent, ensure_ascii=ascii_only), encoding="utf-8")
    with mock.patch.object(_parse, "_CHUNK", chunk):
        _same(load_trace(path), reference(path))
