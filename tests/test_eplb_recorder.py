"""LoadRecorder: window and decay semantics, equality with a plain count, errors, no sync."""

from __future__ import annotations

import pytest
import torch

from deeppar import _native
from deeppar.eplb import recorder as recorder_module
from deeppar.eplb.recorder import LoadRecorder

HAS_NATIVE = _native.has_kernel("expert_counts_add_", "cpu")


def plain_count(ids: torch.Tensor, experts: int) -> torch.Tensor:
    """Per-layer count of ``ids [layers, ...]`` with a Python loop."""
    out = torch.zeros(ids.shape[0], experts)
    for layer in range(ids.shape[0]):
        for e in ids[layer].reshape(-1).tolist():
            out[layer, e] += 1
    return out


def random_ids(layers: int, tokens: int, k: int, experts: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, experts, (layers, tokens, k), generator=g)


@pytest.mark.parametrize("layers,experts,tokens,k", [(1, 1, 5, 1), (3, 8, 17, 2), (4, 33, 64, 6)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16])
def test_one_step_equals_plain_count(layers, experts, tokens, k, dtype):
    ids = random_ids(layers, tokens, k, experts, seed=layers + k).to(dtype)
    rec = LoadRecorder(layers, experts, window=4)
    rec.record(ids)
    loads = rec.loads()
    assert loads.dtype == torch.float32 and loads.shape == (layers, experts)
    assert torch.equal(loads, plain_count(ids.long(), experts))
    # Layer by layer gives the same.
    rec2 = LoadRecorder(layers, experts, decay=0.5)
    for layer in range(layers):
        rec2.record(ids[layer], layer=layer)
    assert torch.equal(rec2.loads(), loads)


@pytest.fixture(params=["native", "bincount"])
def count_path(request, monkeypatch):
    """Runs a test on the native CPU count and on the bincount fallback."""
    if request.param == "native" and not HAS_NATIVE:
        pytest.skip("deeppar._C has no expert_counts_add_")
    if request.param == "bincount":
        monkeypatch.setattr(recorder_module._native, "has_kernel", lambda op, device: False)
    return request.param


@pytest.mark.parametrize("layers,experts,tokens,k", [(1, 1, 1, 1), (2, 256, 4096, 8),
                                                     (58, 256, 128, 8), (5, 7, 3, 300)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.int8])
def test_both_cpu_counts_equal_bincount(count_path, layers, experts, tokens, k, dtype):
    if dtype in (torch.uint8, torch.int8) and experts > 127:
        experts = 100
    ids = random_ids(layers, tokens, k, experts, seed=tokens).to(dtype)
    want = torch.stack([torch.bincount(row.reshape(-1).long(), minlength=experts)
                        for row in ids]).float()
    for mode in ({"window": 3}, {"decay": 0.5}):
        rec = LoadRecorder(layers, experts, **mode)
        assert rec._native == (count_path == "native")
        rec.record(ids)
        assert torch.equal(rec.loads(), want)
        rec.record(ids[layers - 1], layer=layers - 1)
        want_layer = want.clone()
        want_layer[layers - 1] *= 2
        assert torch.equal(rec.loads(), want_layer)
        with pytest.raises(ValueError, match=rf"expert id {experts}, outside \[0, {experts}\)"):
            rec.record(torch.full((layers, 2), experts, dtype=torch.int64))
        with pytest.raises(ValueError, match="expert id -2"):
            rec.record(torch.tensor([0, -2]), layer=0)
        assert torch.equal(rec.loads(), want_layer)  # nothing counted


@pytest.mark.skipif(not HAS_NATIVE, reason="deeppar._C has no expert_counts_add_")
def test_expert_counts_add_op_passes_opcheck_and_rejects_bad_input():
    op = torch.ops.deeppar.expert_counts_add_.default
    ids = random_ids(3, 5, 2, 6, seed=0)
    for counts, topk_ids in ((torch.zeros(3, 6, dtype=torch.long), ids),
                             (torch.ones(1, 9, dtype=torch.long), ids.int()),
                             (torch.zeros(3, 4, dtype=torch.long), ids[:, :0])):
        torch.library.opcheck(op, (counts, topk_ids))
    counts = torch.full((3, 6), 7, dtype=torch.long)
    op(counts, ids)
    assert torch.equal(counts - 7, plain_count(ids, 6).long())
    with pytest.raises(ValueError, match=r"expert id 6, outside \[0, 6\)"):
        op(counts, torch.tensor([0, 6, 1]).expand(3, 3))  # strided ids are read too
    assert torch.equal(counts - 7, plain_count(ids, 6).long())  # untouched
    with pytest.raises(TypeError, match="integer"):
        op(counts, ids.float())
    with pytest.raises(ValueError, match="same number of ids per row"):
        op(counts, ids[:2])
    with pytest.raises(ValueError, match="contiguous int64"):
        op(counts.float(), ids)


@pytest.mark.skipif(not HAS_NATIVE, reason="deeppar._C has no expert_counts_add_")
@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("bad_rows", [[0], [5], [57], [3, 40]])
def test_expert_counts_add_leaves_counts_unchanged_on_a_bad_id(num_threads, bad_rows):
    # Large enough (58 x 4096 x 8 ids) for rows to be counted in parallel; the bad ids sit in
    # the middle of their rows, after ids that were already counted.
    ids = random_ids(58, 4096, 8, 256, seed=1)
    for row in bad_rows:
        ids[row, 2000, 3] = 256 + row
    counts = torch.arange(58 * 256, dtype=torch.long).reshape(58, 256)
    before = counts.clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        with pytest.raises(ValueError, match=rf"expert id {256 + max(bad_rows)}, outside"):
            torch.ops.deeppar.expert_counts_add_(counts, ids)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(counts, before)


def test_window_keeps_the_last_steps():
    layers, experts, window = 2, 5, 3
    steps = [random_ids(layers, 7, 2, experts, seed=s) for s in range(8)]
    rec = LoadRecorder(layers, experts, window=window)
    for i, ids in enumerate(steps):
        rec.record(ids)
        kept = torch.cat(steps[max(0, i - window + 1): i + 1], dim=1)
        assert torch.equal(rec.loads(), plain_count(kept, experts)), i
        rec.step()
    # After the last step() the open step is empty: the window holds window - 1 recorded steps.
    assert torch.equal(rec.loads(), plain_count(torch.cat(steps[-window + 1:], 1), experts))


def test_window_of_one_forgets_at_each_step():
    rec = LoadRecorder(1, 3, window=1)
    rec.record(torch.tensor([[0, 0, 2]]))
    assert rec.loads().tolist() == [[2.0, 0.0, 1.0]]
    rec.step()
    assert rec.loads().tolist() == [[0.0, 0.0, 0.0]]


def test_decay_weighs_older_steps_less():
    decay = 0.5
    rec = LoadRecorder(1, 3, decay=decay)
    rec.record(torch.tensor([[0, 1, 1]]))
    rec.step()
    rec.record(torch.tensor([[2]]))
    rec.step()
    rec.record(torch.tensor([[0]]))
    want = torch.tensor([[1 * decay**2 + 1, 2 * decay**2, 1 * decay]])
    assert torch.allclose(rec.loads(), want)
    rec.reset()
    assert rec.loads().sum() == 0


def test_decay_one_is_a_running_count_and_zero_keeps_the_open_step():
    ids = random_ids(2, 9, 3, 4, seed=1)
    keep = LoadRecorder(2, 4, decay=1.0)
    forget = LoadRecorder(2, 4, decay=0.0)
    for _ in range(3):
        keep.record(ids)
        forget.record(ids)
        keep.step()
        forget.step()
    forget.record(ids)
    assert torch.equal(keep.loads(), 3 * plain_count(ids, 4))
    assert torch.equal(forget.loads(), plain_count(ids, 4))


def test_loads_is_a_copy():
    rec = LoadRecorder(1, 2, window=2)
    rec.record(torch.tensor([[1]]))
    snapshot = rec.loads()
    rec.record(torch.tensor([[1]]))
    assert snapshot.tolist() == [[0.0, 1.0]]


def test_bad_input():
    rec = LoadRecorder(2, 4, window=2)
    with pytest.raises(ValueError, match=r"expert id 4, outside \[0, 4\)"):
        rec.record(torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="expert id -1"):
        rec.record(torch.tensor([0, -1]), layer=1)
    assert rec.loads().sum() == 0  # nothing counted
    with pytest.raises(TypeError, match="integer expert ids"):
        rec.record(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="num_layers=2"):
        rec.record(torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="layer must be"):
        rec.record(torch.zeros(3, dtype=torch.long), layer=2)
    with pytest.raises(ValueError, match="exactly one of window"):
        LoadRecorder(2, 4)
    with pytest.raises(ValueError, match="exactly one of window"):
        LoadRecorder(2, 4, window=3, decay=0.9)
    with pytest.raises(ValueError, match="decay must be"):
        LoadRecorder(2, 4, decay=1.5)
    with pytest.raises(ValueError, match="window must be"):
        LoadRecorder(2, 4, window=0)
    with pytest.raises(ValueError, match="num_experts"):
        LoadRecorder(2, 0, window=1)


def test_empty_ids_count_nothing():
    rec = LoadRecorder(2, 3, decay=0.9)
    rec.record(torch.zeros(2, 0, dtype=torch.long))
    assert rec.loads().sum() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [{"window": 4}, {"decay": 0.9}])
def test_cuda_record_step_and_read_do_not_sync(mode):
    layers, experts = 3, 16
    ids = random_ids(layers, 64, 4, experts, seed=3).cuda()
    rec = LoadRecorder(layers, experts, device="cuda", **mode)
    rec.record(ids)  # warm-up (allocations, first launch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            rec.record(ids)
            rec.record(ids[0], layer=0)
            rec.step()
        loads = rec.loads()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = LoadRecorder(layers, experts, **mode)
    cpu.record(ids.cpu())
    for _ in range(3):
        cpu.record(ids.cpu())
        cpu.record(ids[0].cpu(), layer=0)
        cpu.step()
    assert torch.allclose(loads.cpu(), cpu.loads())
