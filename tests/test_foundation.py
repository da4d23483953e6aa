"""The package skeleton: import with and without the native module, info, CLI, the model op."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HAS_CUDA, TRITON_INTERPRET, devices

import deeppar
from deeppar import _native, ops
from deeppar.cli import main

PYTHON_DIR = str(Path(deeppar.__file__).resolve().parents[1])


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": PYTHON_DIR, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def _random_plan(layers: int, experts: int, replicas: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(layers, experts, generator=gen) * 100
    logcnt = torch.ones(layers, experts, dtype=torch.int64)
    phy2log = torch.empty(layers, replicas, dtype=torch.int64)
    for layer in range(layers):
        extra = torch.randint(0, experts, (replicas - experts,), generator=gen)
        logcnt[layer] += torch.bincount(extra, minlength=experts)
        phy2log[layer] = torch.cat([torch.arange(experts), extra])[torch.randperm(replicas)]
    return weight, phy2log, logcnt


def test_import_is_cheap():
    """Importing deeppar alone must not import torch (the trace CLI relies on it)."""
    result = _run_python("import sys, deeppar; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_info_reports_native_state():
    data = deeppar.info()
    assert data["deeppar"] == deeppar.__version__
    assert data["torch"] == torch.__version__
    assert data["native"]["loaded"] == _native.NATIVE_LOADED
    assert set(data["backends"]) == {"cpu", "cuda", "triton"}
    cuda_kernel = _native.has_kernel("slot_loads", "cuda")
    assert data["backends"]["cuda"]["usable"] is (HAS_CUDA and cuda_kernel)


@pytest.mark.skipif(not _native.NATIVE_LOADED, reason="native extension not built")
def test_native_kernels_registered():
    assert _native.has_kernel("slot_loads", "cpu")
    assert deeppar.info()["backends"]["cpu"]["compiled"]


def test_works_without_native_module():
    code = (
        "import torch, deeppar; from deeppar import ops; i = deeppar.info();"
        "assert not i['native']['loaded'] and 'DEEPPAR_DISABLE_NATIVE' in i['native']['error'];"
        "w = torch.tensor([[2.0, 3.0]]); p = torch.tensor([[0, 1, 1]]); c = torch.tensor([[1, 2]]);"
        "print(ops.slot_loads(w, p, c).tolist())"
    )
    result = _run_python(code, DEEPPAR_DISABLE_NATIVE="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[[2.0, 1.5, 1.5]]"


def test_missing_native_module_is_reported(tmp_path):
    """A broken _C (here: import blocked) leaves deeppar importable and says why."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'deeppar._C': raise ImportError('simulated missing _C')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import deeppar; i = deeppar.info(); print(i['native']['error'])\n"
    )
    result = _run_python(blocker)
    assert result.returncode == 0, result.stderr
    assert "simulated missing _C" in result.stdout


def test_cli_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "deeppar" in out and "torch" in out and "cpu" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deeppar"] == deeppar.__version__


def test_console_script_module():
    result = subprocess.run(
        [sys.executable, "-m", "deeppar", "--version"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": PYTHON_DIR},
    )
    assert result.returncode == 0 and deeppar.__version__ in result.stdout


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (6, 42, 123), (58, 256, 288)])
@pytest.mark.parametrize("seed", [0, 1])
def test_slot_loads_matches_reference(device, shape, seed):
    weight, phy2log, logcnt = (t.to(device) for t in _random_plan(*shape, seed))
    got = ops.slot_loads(weight, phy2log, logcnt)
    want = ops.slot_loads_reference(weight.cpu(), phy2log.cpu(), logcnt.cpu())
    assert got.device.type == device
    assert torch.equal(got.cpu(), want)  # one IEEE division per element: bit-identical


@pytest.mark.skipif(not _native.NATIVE_LOADED, reason="native extension not built")
@pytest.mark.parametrize("device", devices())
def test_slot_loads_opcheck(device):
    args = tuple(t.to(device) for t in _random_plan(4, 6, 9, 0))
    torch.library.opcheck(torch.ops.deeppar.slot_loads.default, args)


@pytest.mark.skipif(not _native.NATIVE_LOADED, reason="native extension not built")
def test_slot_loads_compiles():
    args = _random_plan(4, 6, 9, 0)
    compiled = torch.compile(lambda w, p, c: ops.slot_loads(w, p, c) * 2, fullgraph=True)
    assert torch.equal(compiled(*args), ops.slot_loads_reference(*args) * 2)


def test_slot_loads_rejects_bad_input():
    weight, phy2log, logcnt = _random_plan(2, 4, 6, 0)
    with pytest.raises(TypeError, match="weight must be float32"):
        ops.slot_loads(weight.double(), phy2log, logcnt)
    with pytest.raises(ValueError, match="phy2log"):
        ops.slot_loads(weight, phy2log.int(), logcnt)
    with pytest.raises(ValueError, match="logcnt"):
        ops.slot_loads(weight, phy2log, logcnt[:1])
    with pytest.raises(ValueError, match="backend must be"):
        ops.slot_loads(weight, phy2log, logcnt, backend="bogus")
    with pytest.raises(ops.BackendUnavailable, match="CUDA tensors"):
        ops.slot_loads(weight, phy2log, logcnt, backend="cuda")


@pytest.mark.skipif(not _native.has_kernel("slot_loads", "cpu"), reason="no native slot_loads")
def test_backend_names_are_shared():
    cpu = torch.device("cpu")
    for name in ("native", "cpu"):  # the device-specific spelling of native
        assert ops.resolve(ops.SLOT_LOADS, name, cpu) == "cpu"
    assert ops.resolve(ops.SLOT_LOADS, None, cpu) == "cpu"
    assert ops.resolve(ops.SLOT_LOADS, "reference", cpu) == "reference"
    # only the EPLB planner runs its CPU kernel on a host copy of a CUDA tensor
    assert ops.auto_order(ops.EPLB_PLANNER, torch.device("cuda")) == (
        "cuda", "triton", "cpu", "reference")
    assert ops.auto_order(ops.SLOT_LOADS, torch.device("cuda")) == ("cuda", "triton", "reference")
    assert ops.auto_order(ops.REPLICA_ROUTING, torch.device("cuda")) == (
        "cuda", "triton", "reference")
    assert ops.auto_order(ops.MOE_PERMUTE, cpu) == ("cpu", "reference")


@pytest.mark.triton
@pytest.mark.skipif(
    not (HAS_CUDA or TRITON_INTERPRET), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (6, 42, 123)])
def test_slot_loads_triton_matches_reference(shape):
    device = "cuda" if HAS_CUDA else "cpu"
    weight, phy2log, logcnt = (t.to(device) for t in _random_plan(*shape, 3))
    got = ops.slot_loads(weight, phy2log, logcnt, backend="triton")
    want = ops.slot_loads_reference(weight.cpu(), phy2log.cpu(), logcnt.cpu())
    assert torch.equal(got.cpu(), want)


@pytest.mark.triton
@pytest.mark.skipif(
    not (HAS_CUDA or TRITON_INTERPRET), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)
def test_slot_loads_triton_opcheck_and_compile():
    from deeppar.kernels.slot_loads import slot_loads_triton

    device = "cuda" if HAS_CUDA else "cpu"
    args = tuple(t.to(device) for t in _random_plan(4, 6, 9, 0))
    torch.library.opcheck(slot_loads_triton, args)
    compiled = torch.compile(
        lambda w, p, c: ops.slot_loads(w, p, c, backend="triton") * 2, fullgraph=True
    )
    want = ops.slot_loads_reference(*(t.cpu() for t in args)) * 2
    assert torch.equal(compiled(*args).cpu(), want)


def test_write_atomic_leaves_nothing_on_failure(tmp_path):
    from deeppar._io import write_atomic

    target = tmp_path / "sub" / "out.txt"

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, failing)
    assert list((tmp_path / "sub").iterdir()) == []
    write_atomic(target, lambda tmp: Path(tmp).write_text("whole"))
    assert target.read_text() == "whole"


@pytest.mark.gpu
@pytest.mark.skipif(not _native.NATIVE_LOADED, reason="native extension not built")
@pytest.mark.skipif(os.environ.get("DEEPPAR_NO_CUDA") == "1", reason="built with DEEPPAR_NO_CUDA=1")
def test_cuda_kernels_are_built_where_a_gpu_is():
    """On a GPU machine a CPU-only build would make every CUDA parity test skip: fail instead."""
    assert {"slot_loads", "eplb_rebalance"} <= set(_native.native_ops("cuda"))


def test_slot_loads_native_rejects_out_of_range_expert():
    if not _native.has_kernel("slot_loads", "cpu"):
        pytest.skip("no native slot_loads kernel")
    weight, phy2log, logcnt = _random_plan(2, 4, 6, 0)
    for bad in (4, -1):
        broken = phy2log.clone()
        broken[1, 2] = bad
        with pytest.raises(ValueError, match="invalid expert id"):
            ops.slot_loads(weight, broken, logcnt)


@pytest.mark.triton
@pytest.mark.skipif(not TRITON_INTERPRET, reason="runs the Triton kernel in its interpreter")
def test_slot_loads_triton_never_reads_outside_the_row():
    # The interpreter ignores the kernel's debug flag (no device assert there); the masked
    # loads still keep a bad id inside the row and mark its slot NaN.
    weight, phy2log, logcnt = _random_plan(2, 4, 6, 0)
    phy2log[0, 3] = 7
    got = ops.slot_loads(weight, phy2log, logcnt, backend="triton")
    assert torch.isnan(got[0, 3]) and int(torch.isnan(got).sum()) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_slot_loads_gpu_rejects_out_of_range_expert(backend):
    # A device-side assert ends the CUDA context, so it runs in a fresh process.
    code = (
        "import torch\nfrom deeppar import ops\n"
        "w = torch.rand(2, 4, device='cuda'); c = torch.ones(2, 4, dtype=torch.long, "
        "device='cuda')\np = torch.zeros(2, 4, dtype=torch.long, device='cuda'); p[1, 2] = 9\n"
        f"ops.slot_loads(w, p, c, backend={backend!r}); torch.cuda.synchronize()\n"
    )
    result = _run_python(code)
    assert result.returncode != 0
    assert "invalid expert id" in result.stdout + result.stderr or "assert" in result.stderr
