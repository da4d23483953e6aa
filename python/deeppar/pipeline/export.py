"""Exports of a schedule: PyTorch pipelining action strings, JSON, Chrome trace.

* :func:`to_torch_actions` - PyTorch ``torch.distributed.pipelining`` action strings, as
  ``str(_Action)`` prints them: ``{stage}{F|I|W|B}{microbatch}`` and
  ``({stage}F{mb};{stage}B{mb})OVERLAP_F_B`` for an overlapped pair. One list per rank.
  Stage ids are PyTorch's (rank r of a V holds stages r and 2P-1-r), which is what
  :mod:`deeppar.pipeline.ir` uses for ``1f1b``, ``zb1p``, ``zbv`` and ``dualpipev``.
  PyTorch has no DualPipe; its export uses deeppar's stage ids (documented in ``ir``).
* :func:`to_chrome_trace` - a Chrome-trace (Perfetto) JSON object of a simulated run.
* JSON of the schedule itself is :meth:`Schedule.to_json`.
"""

from __future__ import annotations

from typing import Any

from .ir import Action, Overlap, Schedule, Step


def torch_action_string(step: Step) -> str:
    """``0F3``, ``7I0``, ``7W0``, ``3B1`` or ``(0F3;3B1)OVERLAP_F_B``."""
    if isinstance(step, Overlap):
        return f"({torch_action_string(step.forward)};{torch_action_string(step.backward)})" \
               "OVERLAP_F_B"
    a: Action = step
    return f"{a.stage}{a.kind.value}{a.microbatch}"


def to_torch_actions(schedule: Schedule) -> list[list[str]]:
    """Per rank, the PyTorch action strings of its program."""
    return [[torch_action_string(s) for s in prog] for prog in schedule.steps]


def format_torch(schedule: Schedule) -> str:
    """One comma-separated line per rank (the ``deeppar schedule export --format torch`` text)."""
    return "\n".join(",".join(line) for line in to_torch_actions(schedule))


_KIND_NAMES = {"F": "forward", "B": "backward", "I": "backward-input", "W": "backward-weight",
               "FB": "forward+backward"}


def to_chrome_trace(schedule: Schedule, result: Any | None = None,
                    time_unit_us: float = 1000.0) -> dict[str, Any]:
    """Chrome-trace JSON (``{"traceEvents": [...]}``) of a run: one process, one thread per
    rank, one complete event ("X") per step, flow arrows for cross-rank transfers.

    ``result`` is a :class:`~deeppar.pipeline.simulate.SimResult`, or a list of
    :class:`~deeppar.pipeline.simulate.TimedStep` (e.g. the runtime's measured timeline, in
    microseconds: pass ``time_unit_us=1``); when omitted the schedule is simulated with the
    default unit costs. One time unit is ``time_unit_us`` microseconds in the trace.
    """
    if result is None:
        from .simulate import simulate

        result = simulate(schedule)
    timeline = result.timeline if hasattr(result, "timeline") else list(result)
    events: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
         "args": {"name": f"{schedule.method} ranks={schedule.num_ranks} "
                          f"chunks={schedule.num_chunks}"}},
    ]
    for r in range(schedule.num_ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r,
                       "args": {"name": f"rank {r}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": r,
                       "args": {"sort_index": r}})
    for t in timeline:
        step = t.step
        kind = t.kind
        events.append({
            "name": str(step), "cat": _KIND_NAMES[kind], "ph": "X", "pid": 0, "tid": t.rank,
            "ts": t.start * time_unit_us, "dur": (t.end - t.start) * time_unit_us,
            "args": {"kind": kind, "index": t.index,
                     "actions": [str(a) for a in step.actions],
                     "directions": [a.direction for a in step.actions]},
        })
    end_of = {(t.rank, t.index): t.end for t in timeline}
    producer = schedule.producers()
    flow_id = 0
    for t in timeline:
        for tr in schedule.recvs_before(t.rank, t.step):
            if tr.local or tr.key not in producer:
                continue
            src_rank, src_index = producer[tr.key]
            if (src_rank, src_index) not in end_of:  # not run (forward-only measured step)
                continue
            flow_id += 1
            name = f"{tr.tensor} mb{tr.microbatch}"
            events.append({"name": name, "cat": "p2p", "ph": "s", "id": flow_id, "pid": 0,
                           "tid": src_rank,
                           "ts": end_of[(src_rank, src_index)] * time_unit_us - 1e-3})
            events.append({"name": name, "cat": "p2p", "ph": "f", "bp": "e", "id": flow_id,
                           "pid": 0, "tid": t.rank, "ts": t.start * time_unit_us})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "metadata": {"method": schedule.method, "ranks": schedule.num_ranks,
                         "chunks": schedule.num_chunks,
                         "makespan": max((t.end for t in timeline), default=0.0)}}


__all__ = ["format_torch", "to_chrome_trace", "to_torch_actions", "torch_action_string"]
