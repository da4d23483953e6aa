"""Build small Chrome traces (torch.profiler / Kineto layout) for the profiling tests."""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GPU_PID = 0


@dataclass
class TraceBuilder:
    """Collects events; ``write`` saves them (optionally gzipped, optionally shuffled)."""

    rank: int | None = None
    world_size: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    def kernel(self, name: str, ts: float | str, dur: float, stream: int = 7, device: int = 0,
               corr: int | None = None, cat: str = "kernel") -> None:
        args: dict[str, Any] = {"device": device, "stream": stream}
        if corr is not None:
            args["correlation"] = corr
            args["External id"] = corr
        self.events.append({"ph": "X", "cat": cat, "name": name, "pid": device, "tid": stream,
                            "ts": ts, "dur": dur, "args": args})

    def launch(self, corr: int, ts: float, tid: int = 1, pid: int = 100,
               name: str = "cudaLaunchKernel") -> None:
        self.events.append({"ph": "X", "cat": "cuda_runtime", "name": name, "pid": pid,
                            "tid": tid, "ts": ts, "dur": 1,
                            "args": {"correlation": corr, "cbid": 211}})
        self.events.append({"ph": "s", "id": corr, "pid": pid, "tid": tid, "ts": ts,
                            "cat": "ac2g", "name": "ac2g"})

    def annotation(self, name: str, ts: float, dur: float, tid: int = 1, pid: int = 100) -> None:
        self.events.append({"ph": "X", "cat": "user_annotation", "name": name, "pid": pid,
                            "tid": tid, "ts": ts, "dur": dur, "args": {}})

    def begin_end(self, name: str, ts: float, end: float, tid: int = 1, pid: int = 100,
                  cat: str | None = "user_annotation", end_cat: bool = True) -> None:
        """A range as a "B" and an "E" event (the "E" without category if not ``end_cat``)."""
        self.events.append({"ph": "B", "cat": cat, "name": name, "pid": pid, "tid": tid,
                            "ts": ts, "args": {}})
        e: dict[str, Any] = {"ph": "E", "pid": pid, "tid": tid, "ts": end}
        if end_cat:
            e["cat"] = cat
        self.events.append(e)

    def cpu_op(self, name: str, ts: float, dur: float, tid: int = 1, pid: int = 100) -> None:
        self.events.append({"ph": "X", "cat": "cpu_op", "name": name, "pid": pid, "tid": tid,
                            "ts": ts, "dur": dur, "args": {"External id": 1}})

    def document(self, shuffle: bool = False) -> dict[str, Any]:
        events = list(self.events)
        events.append({"name": "process_labels", "ph": "M", "ts": 0, "pid": GPU_PID, "tid": 0,
                       "args": {"labels": "GPU 0"}})
        if shuffle:
            random.Random(1234).shuffle(events)
        doc: dict[str, Any] = {"schemaVersion": 1}
        if self.rank is not None:
            doc["distributedInfo"] = {"backend": "nccl", "rank": self.rank,
                                      "world_size": self.world_size or self.rank + 1}
        doc["traceEvents"] = events
        doc["traceName"] = "synthetic"
        return doc

    def write(self, path: Path, gz: bool = False, shuffle: bool = False) -> Path:
        text = json.dumps(self.document(shuffle), indent=1)
        if gz:
            with gzip.open(path, "wt", encoding="utf-8") as f:
                f.write(text)
        else:
            path.write_text(text, encoding="utf-8")
        return path


def write_raw_fractional(path: Path, entries: list[tuple[str, str, str]]) -> Path:
    """A trace whose kernel timestamps are written literally, e.g. '1700000000000000.125'."""
    items = []
    for name, ts, dur in entries:
        items.append(f'{{"ph": "X", "cat": "kernel", "name": "{name}", "pid": 0, "tid": 7, '
                     f'"ts": {ts}, "dur": {dur}, "args": {{"device": 0, "stream": 7}}}}')
    path.write_text('{"traceEvents": [\n' + ",\n".join(items) + "\n]}", encoding="utf-8")
    return path
