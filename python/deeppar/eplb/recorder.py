"""Per-layer expert load recorder: the planner's input, counted on the device that routes.

Each step the router's top-k expert ids are added to a ``[layers, experts]`` count: on a GPU
with ``index_add_`` (no host synchronisation: no ``.item()``, no data-dependent shapes), so the
recorder can sit inside a CUDA-graph-captured or ``torch.compile``-d forward pass; on the CPU
with the native op ``deeppar::expert_counts_add_`` (one pass that checks and counts the ids,
layers in parallel; ``bincount`` when the extension is not built). Two ways to forget old
traffic:

* ``window=N``: a ring buffer of the last ``N`` steps (the open step included); counts are
  exact integers.
* ``decay=d``: exponential decay; closing a step multiplies everything recorded so far by ``d``,
  so a count recorded ``k`` steps ago weighs ``d ** k``.
"""

from __future__ import annotations

import torch

from deeppar import _native, ops  # noqa: F401  (ops registers the native ops' fake functions)

_ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class LoadRecorder:
    """Expert loads of ``num_layers`` MoE layers with ``num_experts`` experts each.

    Example::

        rec = LoadRecorder(58, 256, window=1000, device="cuda")
        for step in ...:
            for layer, ids in enumerate(router_topk_ids):  # ids: [tokens, k]
                rec.record(ids, layer=layer)
            rec.step()
        weight = rec.loads()  # [58, 256] float32, input of rebalance_experts

    Out-of-range ids raise ``ValueError`` on CPU; on other devices they trip a device-side
    assert (``torch._assert_async``) instead, as a check that needs no host read.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        *,
        window: int | None = None,
        decay: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if (window is None) == (decay is None):
            raise ValueError("give exactly one of window (steps kept) or decay (factor per step)")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                                   or window < 1):
            raise ValueError(f"window must be a positive int (steps kept), got {window!r}")
        if decay is not None and not (isinstance(decay, (int, float)) and 0.0 <= decay <= 1.0):
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.window = window
        self.decay = None if decay is None else float(decay)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        shape = (num_layers, num_experts)
        # record() adds to the open step only, `_open` (exact counts; per-layer views made once,
        # so recording one layer is one add); step() folds it into `_total`, which holds the
        # closed steps: their sum (window: the last window - 1 of them, kept in the ring `_steps`
        # at the slots other than `_slot`) or their decayed sum. loads() is `_total + _open`.
        self._open = torch.zeros(shape, dtype=torch.int64, device=self.device)
        self._open_rows = self._open.split(1)
        if window is not None:
            self._steps = torch.zeros((window, *shape), dtype=torch.int64, device=self.device)
            self._total = torch.zeros(shape, dtype=torch.int64, device=self.device)
        else:
            self._total = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self._slot = 0  # ring position of the open step (host-side: no sync to advance it)
        self._layer_offsets = torch.arange(num_layers, device=self.device) * num_experts
        # The native CPU op checks the ids in its own counting pass.
        self._native = self.device.type == "cpu" and _native.has_kernel("expert_counts_add_", "cpu")

    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"topk_ids must be a torch.Tensor, got {type(ids).__name__}")
        if ids.dtype not in _ID_DTYPES:
            raise TypeError(f"topk_ids must hold integer expert ids, got dtype {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(f"topk_ids is on {ids.device}, the recorder on {self.device}")
        if ids.numel() == 0 or self._native:
            return
        if ids.device.type == "cpu":
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.num_experts:
                bad = low if low < 0 else high
                raise ValueError(
                    f"topk_ids holds expert id {bad}, outside [0, {self.num_experts})"
                )
        else:
            torch._assert_async(
                ((ids >= 0) & (ids < self.num_experts)).all(),
                "topk_ids holds an expert id outside [0, num_experts)",
            )

    def record(self, topk_ids: torch.Tensor, layer: int | None = None) -> None:
        """Count the expert ids of the open step.

        ``topk_ids``: ``[layers, ...]`` ids of every layer (``layer=None``), or ``[...]`` ids of
        one ``layer`` (e.g. the router's ``[tokens, k]``); any integer dtype.
        """
        self._check_ids(topk_ids)
        if layer is None:
            if topk_ids.dim() < 1 or topk_ids.shape[0] != self.num_layers:
                raise ValueError(
                    f"topk_ids must be [num_layers={self.num_layers}, ...] when layer is None, "
                    f"got shape {tuple(topk_ids.shape)}"
                )
        elif isinstance(layer, bool) or not isinstance(layer, int) or not (
            0 <= layer < self.num_layers
        ):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if self._native:
            target = self._open if layer is None else self._open_rows[layer]
            torch.ops.deeppar.expert_counts_add_.default(target, topk_ids)
            return
        if layer is None:
            ids = topk_ids.reshape(self.num_layers, -1).long()
            flat = (ids + self._layer_offsets[:, None]).reshape(-1)
        else:
            flat = topk_ids.reshape(-1).long() + layer * self.num_experts
        if self.device.type == "cpu":  # ids are checked, so the size is known: no sync issue
            size = self.num_layers * self.num_experts
            self._open.view(-1).add_(torch.bincount(flat, minlength=size))
        else:  # bincount would read the ids' maximum back to the host
            self._open.view(-1).index_add_(0, flat, torch.ones_like(flat))

    def step(self) -> None:
        """Close the open step: the window drops its oldest step, or the decay applies."""
        self._total.add_(self._open)
        if self.window is not None:
            self._steps[self._slot].copy_(self._open)
            self._slot = (self._slot + 1) % self.window
            self._total.sub_(self._steps[self._slot])  # the step leaving the window
            self._steps[self._slot].zero_()
        else:
            self._total.mul_(self.decay)
        self._open.zero_()

    def loads(self) -> torch.Tensor:
        """``[layers, experts]`` float32 loads (a new tensor), ready for the planner."""
        return torch.add(self._total, self._open).to(torch.float32)

    def reset(self) -> None:
        """Forget everything recorded."""
        self._total.zero_()
        self._open.zero_()
        if self.window is not None:
            self._steps.zero_()
        self._slot = 0
