"""``deeppar schedule``: show, simulate, compare and export pipeline schedules.

    deeppar schedule show     --method M --ranks P --chunks N [--png out.png]
    deeppar schedule simulate --method M --ranks P --chunks N [--F 1 --B 2 --W 1 --FB x
                              --comm c] [--measured timings.json] [--json] [--png out.png]
    deeppar schedule compare  --ranks P --chunks N [costs] [--basis stages|devices]
                              [--json] [--png out.png]
    deeppar schedule export   --method M --ranks P --chunks N --format torch|json|chrome
                              [costs] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from deeppar._io import OUTPUT_POLICY, declare_files, dumps_json, write_text

_METHODS = ("1f1b", "zb1p", "zbv", "dualpipe", "dualpipev")


def _add_shape(p: argparse.ArgumentParser, method: bool = True) -> None:
    if method:
        p.add_argument("--method", "-m", required=True,
                       help=f"schedule: {', '.join(_METHODS)}")
    p.add_argument("--ranks", "-p", type=int, required=True, help="pipeline ranks (devices)")
    p.add_argument("--chunks", "-n", type=int, required=True,
                   help="micro-batches (DualPipe: both directions together)")


def _add_costs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("costs (per stage, any time unit)")
    g.add_argument("--F", type=float, default=1.0, help="forward chunk (default 1)")
    g.add_argument("--B", type=float, default=2.0,
                   help="full backward chunk, input + weight gradient (default 2)")
    g.add_argument("--W", type=float, default=1.0,
                   help="weight-gradient part of B; an I takes B - W (default 1)")
    g.add_argument("--FB", type=float, default=None,
                   help="overlapped F&B pair (default F + B: no overlap gain)")
    g.add_argument("--comm", type=float, default=0.0,
                   help="p2p latency between different ranks (default 0)")
    g.add_argument("--measured", metavar="JSON", default=None,
                   help="measured per-step durations: MeasuredCosts JSON, or the runtime's "
                        "timeline file (write_chrome_trace); missing steps fall back to the "
                        "constants above, steps not in the schedule are an error")


def _costs(args: argparse.Namespace) -> Any:
    from .simulate import Costs, MeasuredCosts

    c = Costs(F=args.F, B=args.B, W=args.W, FB=args.FB, comm=args.comm)
    path = getattr(args, "measured", None)
    if path:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--measured {path}: not valid JSON: {e}") from None
            except RecursionError:
                raise ValueError(f"--measured {path}: JSON nested too deeply") from None
        try:
            if isinstance(data, dict):
                data.setdefault("comm", args.comm)
            return MeasuredCosts.from_dict(data, fallback=c)
        except ValueError as e:
            raise ValueError(f"--measured {path}: {e}") from None
    return c


def _simulate(schedule: Any, costs: Any, args: argparse.Namespace) -> Any:
    """``simulate`` with the measured-costs file named in its errors."""
    from .simulate import simulate

    try:
        return simulate(schedule, costs)
    except ValueError as e:
        path = getattr(args, "measured", None)
        raise ValueError(f"--measured {path}: {e}" if path else str(e)) from None


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _cmd_show(args: argparse.Namespace) -> int:
    from .schedules import build

    declare_files(outputs=(args.png,))
    s = build(args.method, args.ranks, args.chunks)
    print(f"{s.method}: {s.num_ranks} ranks, {s.num_chunks} micro-batches, "
          f"{s.num_stages} stages")
    for r in range(s.num_ranks):
        held = ", ".join(
            f"s{st} (slot {s.stages[st].slot}, phase {s.stages[st].phase}, "
            f"dir {s.stages[st].direction})" for st in s.stages_of(r))
        losses = s.losses(r)
        extra = f"; loss of micro-batches {list(losses)}" if losses else ""
        print(f"  rank {r}: {held}{extra}")
    print(s.format())
    if args.png:
        from .draw import draw

        draw(s, args.png)
        if args.png != "-":
            print(f"wrote {args.png}")
    return 0


def _sim_table(res: Any) -> str:
    lines = [f"{'rank':>4}  {'busy':>10}  {'bubble':>10}  {'peak act.':>9}"]
    for r in range(res.schedule.num_ranks):
        lines.append(f"{r:>4}  {_fmt(res.busy[r]):>10}  {_fmt(res.bubble[r]):>10}  "
                     f"{res.peak_activations[r]:>9}")
    return "\n".join(lines)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .schedules import build, canonical_method
    from .simulate import PUBLISHED_BUBBLE, Costs, compare_published

    declare_files(inputs=(args.measured,), outputs=(args.png,))
    s = build(args.method, args.ranks, args.chunks)
    costs = _costs(args)
    res = _simulate(s, costs, args)
    published = None
    if canonical_method(args.method) in PUBLISHED_BUBBLE and isinstance(costs, Costs):
        published = compare_published(args.method, args.ranks, args.chunks, costs)
    if args.json:
        out = {"method": s.method, "ranks": s.num_ranks, "chunks": s.num_chunks,
               "makespan": res.makespan, "bubble": res.bubble, "busy": res.busy,
               "peak_activations": res.peak_activations, "max_bubble": max(res.bubble)}
        if published is not None:
            out["published_bubble"] = published["published"]
            out["published_holds"] = published["holds"]
        if args.timeline:
            out["timeline"] = res.to_dict()["timeline"]
        print(dumps_json(out, indent=2))
    else:
        print(f"{s.method}: {s.num_ranks} ranks, {s.num_chunks} micro-batches; "
              f"makespan {_fmt(res.makespan)}, max bubble {_fmt(max(res.bubble))}")
        print(_sim_table(res))
        if published is not None:
            verdict = "holds" if published["holds"] else (
                f"does not hold (simulated - published = {_fmt(published['difference'])}; "
                f"exact when {published['condition']})")
            print(f"published bubble formula: {_fmt(published['published'])} -> {verdict}")
    if args.png:
        from .draw import draw

        draw(s, args.png, result=res, costs=costs if isinstance(costs, Costs) else None)
        if args.png != "-":
            print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def compare_rows(ranks: int, chunks: int, costs: Any, basis: str = "stages"
                 ) -> list[dict[str, Any]]:
    """Rows of ``deeppar schedule compare`` (one per method).

    ``basis="stages"`` (the published table's convention): the model is cut into ``ranks``
    stages of the given costs; 1F1B, ZB-H1 and DualPipe run on ``ranks`` devices, the V-shaped
    schedules (ZBV, DualPipeV) put two stages per device on ``ranks/2`` devices.
    ``basis="devices"``: every method runs on ``ranks`` devices; the V-shaped ones cut the model
    into ``2*ranks`` half-size stages (costs halved). ``params_per_device`` is in units of
    ``1/ranks`` of the model; ``activation_memory = peak_activations * stage size`` in the same
    unit.
    """
    from .schedules import build, check_params
    from .simulate import PUBLISHED_BUBBLE, Costs, simulate

    rows = []
    for m in _METHODS:
        v = m in ("zbv", "dualpipev")
        row: dict[str, Any] = {"method": m}
        if basis == "stages":
            if v and ranks % 2:
                row["error"] = f"needs an even number of stages to fold onto {ranks}/2 devices"
                rows.append(row)
                continue
            n_ranks, size = (ranks // 2 if v else ranks), 1.0
            params = 2 if (v or m == "dualpipe") else 1
        else:
            n_ranks, size = ranks, (0.5 if v else 1.0)
            params = 2 if m == "dualpipe" else 1
        try:
            check_params(m, n_ranks, chunks)
        except ValueError as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        c = costs.scaled(size) if (size != 1.0 and isinstance(costs, Costs)) else costs
        s = build(m, n_ranks, chunks)
        try:
            res = simulate(s, c)
        except ValueError as exc:  # costs that do not fit this method's schedule
            row["error"] = str(exc)
            rows.append(row)
            continue
        row.update(devices=n_ranks, params_per_device=params, makespan=res.makespan,
                   bubble=res.bubble, max_bubble=max(res.bubble),
                   peak_activations=res.peak_activations,
                   activation_memory=max(res.peak_activations) * size,
                   schedule=s, result=res)
        if m in PUBLISHED_BUBBLE and isinstance(c, Costs) and basis == "stages":
            with contextlib.suppress(ValueError):  # per-stage costs: no formula
                row["published_bubble"] = PUBLISHED_BUBBLE[m](ranks, c)
        rows.append(row)
    return rows


def _cmd_compare(args: argparse.Namespace) -> int:
    declare_files(inputs=(args.measured,), outputs=(args.png,))
    costs = _costs(args)
    rows = compare_rows(args.ranks, args.chunks, costs, args.basis)
    if all("error" in r for r in rows):
        why = dict.fromkeys(r["error"].removeprefix(f"{r['method']}: ") for r in rows)
        raise ValueError("no method can run with these parameters: " + "; ".join(why))
    if args.json:
        out = [{k: v for k, v in r.items() if k not in ("schedule", "result")} for r in rows]
        print(dumps_json({"ranks": args.ranks, "chunks": args.chunks, "basis": args.basis,
                          "methods": out}, indent=2))
    else:
        print(f"{args.chunks} micro-batches, model in {args.ranks} stages"
              if args.basis == "stages" else
              f"{args.chunks} micro-batches on {args.ranks} devices")
        hdr = (f"{'method':<10} {'devices':>7} {'params/dev':>10} {'makespan':>9} "
               f"{'bubble':>8} {'published':>9} {'peak act.':>9} {'act. mem':>8}")
        print(hdr)
        print("-" * len(hdr))
        for r in rows:
            if "error" in r:
                print(f"{r['method']:<10} n/a: {r['error']}")
                continue
            pub = _fmt(r["published_bubble"]) if "published_bubble" in r else "-"
            print(f"{r['method']:<10} {r['devices']:>7} {str(r['params_per_device']) + 'x':>10} "
                  f"{_fmt(r['makespan']):>9} {_fmt(r['max_bubble']):>8} {pub:>9} "
                  f"{max(r['peak_activations']):>9} {_fmt(r['activation_memory']):>8}")
        print("bubble: the largest per-rank bubble (makespan - busy time); peak act.: live "
              "stage activations on the fullest device; act. mem: the same in units of "
              f"1/{args.ranks} of the model")
    if args.png:
        from .draw import draw_compare

        ok = [(r["schedule"], r["result"]) for r in rows if "error" not in r]
        draw_compare(ok, args.png)
        if args.png != "-":
            print(f"wrote {args.png}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .schedules import build

    declare_files(inputs=(args.measured,), outputs=(args.out,))
    s = build(args.method, args.ranks, args.chunks)
    if args.format == "torch":
        from .export import format_torch

        text = format_torch(s)
    elif args.format == "json":
        text = s.to_json(indent=1)
    else:
        from .export import to_chrome_trace

        text = dumps_json(to_chrome_trace(s, _simulate(s, _costs(args), args)),
                          what="the Chrome trace")
    if args.out:
        write_text(args.out, text + "\n")
        if args.out != "-":
            print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def register(subparsers: Any) -> None:
    """Add the ``schedule`` subcommand to the ``deeppar`` parser."""
    p = subparsers.add_parser("schedule", help="pipeline schedules: show, simulate, compare, "
                              "export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)

    sp = sub.add_parser("show", help="print a schedule (and draw it)", epilog=OUTPUT_POLICY)
    _add_shape(sp)
    sp.add_argument("--png", metavar="FILE", help="write a picture")
    sp.set_defaults(func=_cmd_show)

    sp = sub.add_parser("simulate", help="simulate a schedule: makespan, bubbles, memory",
                        epilog=OUTPUT_POLICY)
    _add_shape(sp)
    _add_costs(sp)
    sp.add_argument("--json", action="store_true", help="print a JSON object")
    sp.add_argument("--timeline", action="store_true", help="include the timeline in --json")
    sp.add_argument("--png", metavar="FILE", help="write a picture with true durations")
    sp.set_defaults(func=_cmd_simulate)

    sp = sub.add_parser("compare", help="all methods side by side", epilog=OUTPUT_POLICY)
    _add_shape(sp, method=False)
    _add_costs(sp)
    sp.add_argument("--basis", choices=("stages", "devices"), default="stages",
                    help="stages: same number of model stages (published table); devices: "
                         "same number of devices")
    sp.add_argument("--json", action="store_true", help="print a JSON object")
    sp.add_argument("--png", metavar="FILE", help="write all schedules in one picture")
    sp.set_defaults(func=_cmd_compare)

    sp = sub.add_parser("export", help="export a schedule: torch action strings, JSON, "
                        "Chrome trace", epilog=OUTPUT_POLICY)
    _add_shape(sp)
    sp.add_argument("--format", choices=("torch", "json", "chrome"), required=True)
    _add_costs(sp)
    sp.add_argument("--out", "-o", metavar="FILE", help="write to FILE instead of stdout")
    sp.set_defaults(func=_cmd_export)


__all__ = ["compare_rows", "register"]
