"""``deeppar eplb plan``: plan expert replicas for a load file (or a built-in demo input)."""

from __future__ import annotations

import argparse
from pathlib import Path

from deeppar._io import OUTPUT_POLICY

# DeepSeek-V3 prefill (spec "Sizes that matter"): layers, experts, replicas, groups, nodes, gpus.
DEMO_SHAPE = (58, 256, 288, 8, 4, 32)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eplb`` subcommand (with ``plan``) to the ``deeppar`` parser."""
    eplb = subparsers.add_parser("eplb", help="expert-parallel load balancer")
    sub = eplb.add_subparsers(dest="eplb_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "plan",
        help="plan expert replicas and their GPUs from per-expert loads",
        description="Plan expert replicas (DeepSeek EPLB) for loads [layers, experts] read from "
        ".pt, .npy or .csv, or for a built-in demo input (--demo).",
        epilog=OUTPUT_POLICY,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--loads", type=Path, metavar="FILE",
                     help="per-expert loads [layers, experts]: .pt, .npy or .csv")
    src.add_argument("--demo", action="store_true",
                     help="seeded skewed loads at the DeepSeek-V3 prefill shape "
                     "(58 layers, 256 experts; defaults R=288, G=8, N=4, P=32)")
    p.add_argument("--replicas", type=int, help="physical expert slots per layer (R)")
    p.add_argument("--groups", type=int, help="expert groups (G)")
    p.add_argument("--nodes", type=int, help="server nodes (N)")
    p.add_argument("--gpus", type=int, help="GPUs (P)")
    p.add_argument("--backend", choices=("reference", "cpu", "cuda", "triton"),
                   help="planner backend (default: best available)")
    p.add_argument("--method", metavar="NAME",
                   help="planning method, passed to the planner: deepseek (default, the "
                   "published algorithm) or balanced")
    p.add_argument("--current", type=Path, metavar="PLAN.json",
                   help="plan in use (JSON written by --out): plan with few moved replicas and "
                   "print the transfer summary; sizes default to the file's")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="with --current: balancedness that may be given up per layer against "
                   "a plan from scratch (default 0)")
    p.add_argument("--expert-bytes", type=int, metavar="N",
                   help="with --current: bytes of one expert replica, to report bytes moved")
    p.add_argument("--seed", type=int, default=0, help="seed of the --demo loads")
    p.add_argument("--out", type=Path, help="write the maps and metrics as JSON")
    p.add_argument("--png", type=Path, help="draw per-GPU loads (needs matplotlib)")
    p.set_defaults(func=_cmd_plan)


def demo_loads(seed: int = 0):
    """Synthetic skewed token counts at the DeepSeek-V3 prefill shape: log-normal popularity
    with a few hot experts per layer."""
    import torch

    layers, experts = DEMO_SHAPE[:2]
    g = torch.Generator().manual_seed(seed)
    loads = torch.exp(torch.randn(layers, experts, generator=g) * 1.2) * 100
    hot = torch.randint(0, experts, (layers, 4), generator=g)
    loads.scatter_add_(1, hot, torch.full((layers, 4), 2000.0))
    return loads.round()


def load_weights(path: Path):
    """Loads ``[layers, experts]`` from .pt (a tensor), .npy or .csv (comma-separated rows)."""
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"loads file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor):
                raise ValueError(f"expected a tensor, found {type(data).__name__}")
            return data
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            array = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
        else:
            raise ValueError("unknown format (use .pt, .npy or .csv)")
    except Exception as exc:  # torch.load/np.load raise many types for a malformed file
        raise ValueError(f"cannot read loads from {path}: {type(exc).__name__}: {exc}") from None
    if array.dtype.kind not in "iuf":
        raise ValueError(f"cannot read loads from {path}: numbers expected, got {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` as standard JSON, whole or not at all."""
    from deeppar._io import write_json

    write_json(path, data, what="the plan")


SIZE_KEYS = (("replicas", "num_replicas"), ("groups", "num_groups"), ("nodes", "num_nodes"),
             ("gpus", "num_gpus"))


def load_current(path: Path) -> dict:
    """A plan JSON as ``--out`` writes it: a dict with ``phy2log`` (a list of rows of ints)."""
    if not path.is_file():
        raise FileNotFoundError(f"current plan not found: {path}")
    from deeppar._jsonsafe import load_json_file

    try:
        data = load_json_file(path)
    except ValueError as exc:  # names the file and the byte offset
        raise ValueError(f"cannot read the current plan: {exc}") from None
    rows = data.get("phy2log") if isinstance(data, dict) else None
    if not (isinstance(rows, list) and rows and all(
        isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r)
        for r in rows
    )):
        raise ValueError(f"current plan {path} has no phy2log [layers, replicas] of integers")
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"current plan {path}: phy2log rows differ in length")
    return data


def _cmd_plan(args: argparse.Namespace) -> int:
    import deeppar.eplb as eplb
    from deeppar._io import declare_files

    declare_files(inputs=(args.loads, args.current), outputs=(args.out, args.png))
    current = load_current(args.current) if args.current else None
    if current is not None:
        for flag, key in SIZE_KEYS:
            value = current.get(key)
            if getattr(args, flag) is None and isinstance(value, int):
                setattr(args, flag, value)
        if isinstance(current.get("num_gpus"), int) and current["num_gpus"] != args.gpus:
            raise ValueError(f"the current plan is for {current['num_gpus']} GPUs, "
                             f"--gpus is {args.gpus}")
        if args.png:
            raise ValueError("--png draws a fresh plan; it is not available with --current")
    elif args.expert_bytes is not None or args.tolerance:
        raise ValueError("--expert-bytes and --tolerance need --current")
    if args.expert_bytes is not None and args.expert_bytes < 1:
        raise ValueError(f"--expert-bytes must be positive, got {args.expert_bytes}")
    extra = {} if args.method is None else {"method": args.method}
    if args.demo:
        weight = demo_loads(args.seed)
        defaults = dict(zip(("replicas", "groups", "nodes", "gpus"), DEMO_SHAPE[2:]))
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    else:
        weight = load_weights(args.loads)
        missing = [f"--{k}" for k in ("replicas", "groups", "nodes", "gpus")
                   if getattr(args, k) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} required with --loads")
    if current is not None:
        import torch

        from deeppar.eplb.migration import migrate

        moved = migrate(weight, torch.tensor(current["phy2log"]), args.replicas, args.groups,
                        args.nodes, args.gpus, tolerance=args.tolerance, backend=args.backend,
                        **extra)
        print(moved.summary(args.expert_bytes))
        if args.out:
            write_json_atomic(args.out, moved.to_dict())
            print(f"maps and transfers written to {args.out}")
        return 0
    plan = eplb.plan(weight, args.replicas, args.groups, args.nodes, args.gpus,
                     backend=args.backend, **extra)
    print(plan.summary())
    if args.out:
        write_json_atomic(args.out, plan.to_dict())
        print(f"maps written to {args.out}")
    if args.png:
        from deeppar.eplb.plot import draw_plan

        draw_plan(plan, args.png)
        print(f"picture written to {args.png}")
    return 0
