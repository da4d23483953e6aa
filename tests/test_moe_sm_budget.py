"""SM budgets: kernels launched with num_sms=k use exactly k blocks (GPU, read from the
profiler's kernel records), EP groups with NCCL CTA budgets, green-context compute streams,
and what ``deeppar info`` says about them."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
from _runtime_helpers import failures, run_cases

import deeppar
from deeppar import _native
from deeppar.moe import permute, unpermute
from deeppar.moe.sm_budget import (
    compute_partition,
    ep_group,
    green_context_status,
    nccl_cta_budget_status,
)

KERNEL_NAMES = ("moe_count_kernel", "moe_scatter_kernel", "moe_unpermute_kernel",  # CUDA
                "_count_kernel", "_scatter_kernel", "_unpermute_kernel")  # Triton


def _launch_grids(fn, tmp_path) -> dict[str, list[list[int]]]:
    """Grid of every MoE kernel launched by ``fn()``, from the profiler's CUDA kernel events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    grids: dict[str, list[list[int]]] = {}
    for event in json.loads(path.read_text())["traceEvents"]:
        name = event.get("name", "")
        if event.get("cat") == "kernel" and any(k in name for k in KERNEL_NAMES):
            grids.setdefault(name, []).append(event["args"]["grid"])
    return grids


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("num_sms", [1, 8, 20, 32])
def test_kernels_use_exactly_num_sms_blocks(backend, num_sms, tmp_path):
    if backend == "native" and not _native.has_kernel("moe_permute", "cuda"):
        pytest.skip("native CUDA kernels not built")
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.rand(512, 64, device="cuda").topk(8, dim=-1).indices
    w = torch.rand(512, 8, device="cuda")

    def run():
        p = permute(x, ids, 64, 8, backend=backend, num_sms=num_sms)
        unpermute(p.tokens, p.pos, w, backend=backend, num_sms=num_sms)

    run()  # compile / warm up outside the profile
    grids = _launch_grids(run, tmp_path)
    assert len(grids) == 3, grids  # count, scatter, unpermute
    for name, launches in grids.items():
        assert all(grid == [num_sms, 1, 1] for grid in launches), (name, launches)


def test_status_helpers_say_why():
    for ok, reason in (nccl_cta_budget_status(), green_context_status()):
        assert isinstance(ok, bool)
        assert (reason is None) == ok
        assert ok or len(reason) > 10


def test_compute_partition_falls_back_cleanly():
    part = compute_partition(16)
    ok, reason = green_context_status()
    if ok and torch.cuda.is_available():
        assert part.stream is not None
        if part.partitioned:
            total = torch.cuda.get_device_properties(0).multi_processor_count
            assert part.sms == total - 16
        else:
            assert "green context creation failed" in part.reason
    else:
        assert not part.partitioned and part.reason == reason
        assert (part.stream is None) == (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="reserved_sms"):
        compute_partition(-1)


@pytest.mark.gpu
def test_green_context_stream_runs_work():
    part = compute_partition(8)
    if not part.partitioned:
        pytest.skip(f"no green context here: {part.reason}")
    a = torch.randn(512, 512, device="cuda")
    with torch.cuda.stream(part.stream):
        b = a @ a
    part.stream.synchronize()
    torch.testing.assert_close(b, a @ a)


def test_info_reports_moe():
    data = deeppar.info()["moe"]
    assert data["permute_backends"]["reference"] is True
    assert data["permute_backends"]["native_cpu"] == _native.has_kernel("moe_permute", "cpu")
    assert set(data["sm_budget"]) == {"kernel_num_sms", "nccl_cta_budget", "green_contexts"}


def case_gloo_ep_group(rank: int, world: int) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = ep_group(range(world), max_ctas=8, min_ctas=2)
    assert any("apply to NCCL only" in str(w.message) for w in caught)
    t = torch.full((1,), float(rank))
    dist.all_reduce(t, group=group)
    assert t.item() == sum(range(world))
    plain = ep_group(range(world))
    assert dist.get_world_size(plain) == world
    for bad, match in (({"max_ctas": 0}, "max_ctas"), ({"max_ctas": 2, "min_ctas": 4}, "exceeds")):
        try:
            ep_group(range(world), **bad)
        except ValueError as exc:
            assert match in str(exc)
        else:
            raise AssertionError("expected ValueError")


@pytest.mark.distributed
def test_ep_group_on_gloo():
    results = run_cases(2, ["test_moe_sm_budget:case_gloo_ep_group"], timeout=120)
    assert not failures(results), failures(results)


@pytest.mark.gpu
@pytest.mark.distributed
def test_ep_group_on_nccl_with_cta_budget():
    ok, reason = nccl_cta_budget_status()
    if not ok:
        pytest.skip(reason)
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from _runtime_helpers import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        group = ep_group([0], max_ctas=8, min_ctas=1)
        x = torch.arange(4.0, device="cuda")
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        assert torch.equal(out, x)
    finally:
        dist.destroy_process_group()
