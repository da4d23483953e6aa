"""Picture of an EPLB plan: per-GPU loads, stacked by replica, nodes separated."""

from __future__ import annotations

from pathlib import Path

import torch

from deeppar._io import save_figure
from deeppar.eplb.planning import Plan


def _stacked_bars(ax, plan: Plan, layer: int, weight_per_slot: torch.Tensor) -> None:
    """One layer: a bar per GPU made of its replicas' loads; dashed lines between nodes."""
    per_gpu = plan.slots_per_gpu
    slots = weight_per_slot[layer].view(plan.num_gpus, per_gpu)
    cmap = __import__("matplotlib").colormaps["tab20"]
    bottom = torch.zeros(plan.num_gpus)
    experts = plan.phy2log[layer].cpu().view(plan.num_gpus, per_gpu)
    x = torch.arange(plan.num_gpus).numpy()
    for r in range(per_gpu):
        colors = [cmap(int(e) % 20) for e in experts[:, r]]
        ax.bar(x, slots[:, r].numpy(), bottom=bottom.numpy(), color=colors, edgecolor="white",
               linewidth=0.3, width=0.85)
        bottom += slots[:, r]
    mean = float(plan.gpu_load[layer].mean())
    ax.axhline(mean, color="black", linewidth=0.8, linestyle=":", label="mean GPU load")
    ax.plot(x, plan.gpu_load_before[layer].numpy(), "x", color="tab:red", markersize=3,
            label="before (no replication)")
    gpus_per_node = plan.num_gpus // plan.num_nodes if plan.policy == "hierarchical" else None
    if gpus_per_node and plan.num_nodes > 1:
        for n in range(1, plan.num_nodes):
            ax.axvline(n * gpus_per_node - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(f"layer {layer}: balancedness {float(plan.layer_balancedness[layer]):.3f}",
                 fontsize=9)
    ax.set_xlabel("GPU")
    ax.set_ylabel("load")


def draw_plan(plan: Plan, path: Path, max_bar_layers: int = 3) -> None:
    """Write a PNG: a heatmap of GPU load / mean per layer, and stacked bars of a few layers
    (the least balanced before planning first). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = plan.gpu_load.shape[0]
    logcnt = plan.logcnt.cpu()
    phy2log = plan.phy2log.cpu()
    # Load of each slot: expert load / replicas of the expert.
    slot_load = torch.gather(plan.weight, 1, phy2log) / torch.gather(logcnt, 1, phy2log).float()
    before = plan.gpu_load_before
    spread_before = before.max(1).values / before.mean(1).clamp_min(1e-30)
    picks = spread_before.argsort(descending=True)[: min(max_bar_layers, layers)].tolist()
    fig = plt.figure(figsize=(12, 3.2 * (1 + len(picks))), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(picks), 2, width_ratios=[1, 1])
    for col, (loads, title) in enumerate(
        ((plan.gpu_load_before, f"before: balancedness {plan.balancedness_before:.3f}"),
         (plan.gpu_load, f"after ({plan.policy}): balancedness {plan.balancedness:.3f} "
                         f"(bound {plan.balancedness_bound:.3f})"))):
        ax = fig.add_subplot(grid[0, col])
        rel = loads / loads.mean(1, keepdim=True).clamp_min(1e-30)
        im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", vmin=0,
                       vmax=float(spread_before.max()))
        ax.set_title(f"GPU load / mean, {title}", fontsize=9)
        ax.set_xlabel("GPU")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    for row, layer in enumerate(picks, start=1):
        ax = fig.add_subplot(grid[row, :])
        _stacked_bars(ax, plan, layer, slot_load)
        if row == 1:
            ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"EPLB plan: {plan.num_replicas} replicas on {plan.num_gpus} GPUs in "
                 f"{plan.num_nodes} nodes (bars: replicas, colour = expert)", fontsize=10)
    try:
        save_figure(fig, path, format="png", dpi=110)
    finally:
        plt.close(fig)
