"""What ``pip install`` gives: the native extension, its warning when missing, the metadata,
the package data, and a source distribution that can build it (``make package-check`` also
builds the wheel from that sdist and checks it)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import deeppar
from deeppar import _native
from deeppar.data import sample_trace

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(deeppar.__file__).resolve().parent
PYTHON_DIR = str(PACKAGE.parent)


def _on(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _check_dist():
    spec = importlib.util.spec_from_file_location("check_dist", ROOT / "tools" / "check_dist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_native_extension_is_loaded():
    """Fails (the ~70 native tests would only skip) when _C is missing or broken, unless a
    pure-Python build (DEEPPAR_NO_EXT=1) or the Python paths (DEEPPAR_DISABLE_NATIVE=1) were
    asked for."""
    if _on("DEEPPAR_NO_EXT") or _on("DEEPPAR_DISABLE_NATIVE"):
        pytest.skip("the pure-Python paths were chosen (DEEPPAR_NO_EXT / DEEPPAR_DISABLE_NATIVE)")
    assert _native.NATIVE_LOADED, f"deeppar._C did not load: {_native.NATIVE_ERROR}"
    assert {"slot_loads", "eplb_rebalance"} <= set(_native.native_ops("cpu"))


_WARNINGS_BY_ENV = (
    "import importlib, json, os, sys, warnings\n"
    "sys.modules['deeppar._C'] = None  # as if the extension were missing\n"
    "import deeppar.ops as ops, deeppar._native as native, torch\n"
    "seen = {}\n"
    "for env in ('', 'DEEPPAR_DISABLE_NATIVE', 'DEEPPAR_NO_EXT'):\n"
    "    if env: os.environ[env] = '1'\n"
    "    with warnings.catch_warnings(record=True) as caught:\n"
    "        warnings.simplefilter('default')\n"
    "        importlib.reload(native)\n"
    "        w = torch.tensor([[2.0, 3.0]]); p = torch.tensor([[0, 1, 1]])\n"
    "        ops.slot_loads(w, p, torch.tensor([[1, 2]]))  # the slow path runs\n"
    "    seen[env] = [f'{x.category.__name__}: {x.message}' for x in caught]\n"
    "    os.environ.pop(env, None)\n"
    "print(json.dumps(seen))\n"
)


def test_missing_extension_warns_once_unless_the_python_paths_are_chosen():
    base = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPAR_")}
    result = subprocess.run([sys.executable, "-c", _WARNINGS_BY_ENV], capture_output=True,
                            text=True, timeout=120, env={**base, "PYTHONPATH": PYTHON_DIR})
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert len(seen[""]) == 1, seen
    assert seen[""][0].startswith("RuntimeWarning: deeppar: the native extension deeppar._C "
                                  "did not load (ModuleNotFoundError")
    assert "the slower pure-Python/Triton paths run instead" in seen[""][0]
    assert seen["DEEPPAR_DISABLE_NATIVE"] == [] and seen["DEEPPAR_NO_EXT"] == []


def test_metadata_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    pythons = [c for c in project["classifiers"] if c.startswith("Programming Language :: "
                                                                 "Python :: 3.")]
    assert pythons == ["Programming Language :: Python :: 3.11"]
    assert project["dynamic"] == ["version"]
    assert "version" not in (ROOT / "setup.py").read_text().split("setup(", 1)[1]
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["dynamic"]["version"] == {"attr": "deeppar.__version__"}
    assert project["optional-dependencies"]["plot"] == ["matplotlib"]
    assert project["license"] and project["urls"] and project["scripts"]["deeppar"]
    assert tool["package-data"] == {"deeppar": ["py.typed"], "deeppar.data": ["*.json.gz"]}
    for package, patterns in tool["package-data"].items():
        folder = PACKAGE.parent.joinpath(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), (package, pattern)


def test_sample_trace_is_package_data():
    trace = sample_trace()
    assert trace.is_file() and trace.parent.parent == PACKAGE
    assert (PACKAGE / "py.typed").is_file()
    assert not (ROOT / "tests" / "data" / trace.name).exists()  # one copy


@pytest.mark.slow
def test_sdist_holds_what_the_build_needs(tmp_path):
    """Build the sdist from a clean copy of the tree (no stale egg-info) and check it."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "out", "*.egg-info", "__pycache__", "*.so",
        ".*_cache", ".hypothesis"))
    code = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPAR_")}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tree, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    assert _check_dist().check_sdist(sdist, root=ROOT) == []
