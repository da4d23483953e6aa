"""Triton kernel of ``slot_loads``: the load carried by each physical expert slot.

Registered as the custom op ``deeppar::slot_loads_triton`` with a fake (shape) function, so
``torch.compile`` traces it and ``torch.library.opcheck`` checks it (also under
``TRITON_INTERPRET=1`` on CPU). Reached through ``deeppar.ops.slot_loads(backend="triton")``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# debug=True keeps the device-side bounds assert (Triton drops tl.device_assert otherwise).
@triton.jit(debug=True)
def _slot_loads_kernel(
    weight_ptr,  # [L, E] float32
    phy2log_ptr,  # [L, R] int64
    logcnt_ptr,  # [L, E] int64
    out_ptr,  # [L, R] float32
    experts,
    replicas,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = slots < replicas
    expert = tl.load(phy2log_ptr + layer * replicas + slots, mask=mask, other=0)
    valid = (expert >= 0) & (expert < experts)
    tl.device_assert(valid | ~mask, "slot_loads: phy2log holds an invalid expert id")
    in_row = mask & valid  # never read outside the row, even were the assert compiled out
    load = tl.load(weight_ptr + layer * experts + expert, mask=in_row, other=float("nan"))
    count = tl.load(logcnt_ptr + layer * experts + expert, mask=in_row, other=1).to(tl.float32)
    # div_rn: correctly rounded, as the CPU and CUDA kernels divide.
    tl.store(out_ptr + layer * replicas + slots, tl.div_rn(load, count), mask=mask)


@torch.library.custom_op("deeppar::slot_loads_triton", mutates_args=())
def slot_loads_triton(
    weight: torch.Tensor, phy2log: torch.Tensor, logcnt: torch.Tensor
) -> torch.Tensor:
    """``weight[l, e] / logcnt[l, e]`` for the expert ``e`` of each slot (see deeppar.ops)."""
    weight, phy2log, logcnt = weight.contiguous(), phy2log.contiguous(), logcnt.contiguous()
    layers, replicas = phy2log.shape
    out = torch.empty((layers, replicas), dtype=weight.dtype, device=weight.device)
    if out.numel() == 0:
        return out
    block = 128
    grid = (layers, triton.cdiv(replicas, block))
    _slot_loads_kernel[grid](weight, phy2log, logcnt, out, weight.shape[1], replicas, BLOCK=block)
    return out


@slot_loads_triton.register_fake
def _slot_loads_triton_fake(weight, phy2log, logcnt):
    return weight.new_empty(phy2log.shape)
