"""Check deeppar's source distribution and the wheel built from it (``make package-check``).

    python tools/check_dist.py dist/deeppar-X.tar.gz dist/deeppar-X-*.whl

The sdist must hold every file needed to build the package and its native extension (all of
``csrc/``, the build files, the package data) and no build products; the wheel must hold the
compiled extension, every module, ``py.typed`` and the sample trace, no tests, and the declared
metadata; installed alone (unpacked, away from the source tree) it must import, load its
extension and run a few commands. Prints every problem found and exits 1 if there is one.
"""

from __future__ import annotations

import ast
import email.parser
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE",
               "CMakeLists.txt")
PACKAGE_DATA = ("deeppar/py.typed", "deeppar/data/deepseek_v3_train_trace.json.gz")
NATIVE_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def _version(init_source: str) -> str:
    """``__version__`` of ``deeppar/__init__.py`` (read, not imported)."""
    for node in ast.parse(init_source).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError("no __version__ in deeppar/__init__.py")


def check_sdist(sdist: str | os.PathLike[str], root: Path = ROOT) -> list[str]:
    """Problems of the sdist: build files, native sources (those of ``root``'s ``csrc/``),
    modules and package data missing, or build products present."""
    with tarfile.open(sdist) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    have = set(names)
    problems = [f"sdist lacks {f}" for f in BUILD_FILES if f not in have]
    native = sorted(str(p.relative_to(root)) for p in (root / "csrc").rglob("*")
                    if p.suffix in NATIVE_SUFFIXES)
    if "csrc/op_checks.h" not in native:
        problems.append("csrc/op_checks.h is not in the source tree")
    problems += [f"sdist lacks native source {f}" for f in native if f not in have]
    modules = sorted(str(p.relative_to(root)) for p in (root / "python" / "deeppar").rglob("*.py"))
    problems += [f"sdist lacks module {f}" for f in modules if f not in have]
    problems += [f"sdist lacks package data python/{f}" for f in PACKAGE_DATA
                 if f"python/{f}" not in have]
    problems += [f"sdist holds a build product {n}" for n in names
                 if n.endswith((".so", ".o", ".pyc"))]
    return problems


def _metadata_problems(meta: email.message.Message, version: str) -> list[str]:
    problems = []
    expect = {"Name": "deeppar", "Version": version, "Requires-Python": ">=3.11"}
    for key, value in expect.items():
        if meta.get(key) != value:
            problems.append(f"metadata {key} is {meta.get(key)!r}, expected {value!r}")
    requires = meta.get_all("Requires-Dist") or []
    for want in ("torch>=2.11", "numpy", 'matplotlib; extra == "plot"'):
        if want not in requires:
            problems.append(f"metadata lacks Requires-Dist {want!r} (has {requires})")
    if "plot" not in (meta.get_all("Provides-Extra") or []):
        problems.append("metadata lacks the extra 'plot'")
    if not (meta.get("License-Expression") or meta.get("License")):
        problems.append("metadata lacks the license")
    for key in ("Classifier", "Project-URL", "Summary"):
        if not meta.get_all(key):
            problems.append(f"metadata lacks {key}")
    pythons = [c for c in meta.get_all("Classifier") or []
               if c.startswith("Programming Language :: Python :: 3.")]
    problems += [f"classifier {c!r} claims a Python older than 3.11" for c in pythons
                 if tuple(map(int, c.rsplit(" ", 1)[1].split("."))) < (3, 11)]
    return problems


def check_wheel(wheel: str | os.PathLike[str], version: str, native: bool = True) -> list[str]:
    """Problems of the wheel's contents and metadata (``native``: the extension is expected)."""
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"deeppar-{version}.dist-info"
        meta_text = zf.read(f"{info}/METADATA").decode() if f"{info}/METADATA" in names else ""
        entry = zf.read(f"{info}/entry_points.txt").decode() if (
            f"{info}/entry_points.txt" in names) else ""
        init = zf.read("deeppar/__init__.py").decode() if "deeppar/__init__.py" in names else ""
    problems = [] if meta_text else [f"wheel lacks {info}/METADATA"]
    problems += [f"wheel lacks {f}" for f in PACKAGE_DATA if f not in names]
    extensions = [n for n in names if n.startswith("deeppar/_C") and n.endswith(".so")]
    if native and len(extensions) != 1:
        problems.append(f"wheel holds {len(extensions)} native extensions deeppar/_C*.so, "
                        "expected 1")
    modules = sorted("deeppar/" + str(p.relative_to(ROOT / "python" / "deeppar"))
                     for p in (ROOT / "python" / "deeppar").rglob("*.py"))
    problems += [f"wheel lacks module {m}" for m in modules if m not in names]
    problems += [f"wheel holds {n} (outside the package)" for n in names
                 if not n.startswith(("deeppar/", f"{info}/"))]
    problems += [f"wheel holds a test file {n}" for n in names
                 if "/tests/" in n or Path(n).name.startswith("test_")]
    if init and _version(init) != version:
        problems.append(f"deeppar.__version__ {_version(init)} differs from the wheel's {version}")
    if "deeppar = deeppar.cli:main" not in entry:
        problems.append("wheel lacks the console script deeppar = deeppar.cli:main")
    if meta_text:
        problems += _metadata_problems(email.parser.Parser().parsestr(meta_text), version)
    return problems


def smoke_test(wheel: str | os.PathLike[str], native: bool = True) -> list[str]:
    """Unpack the wheel away from the source tree and run it there."""
    with tempfile.TemporaryDirectory(prefix="deeppar-wheel-") as tmp:
        site = Path(tmp) / "site"
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEEPPAR_")}
        env["PYTHONPATH"] = str(site)
        code = (
            "import sys, deeppar, deeppar._native as n; from deeppar.data import sample_trace\n"
            f"assert deeppar.__file__.startswith({str(site)!r}), deeppar.__file__\n"
            f"assert n.NATIVE_LOADED or not {native}, n.NATIVE_ERROR\n"
            f"assert sample_trace().is_file() and str(sample_trace()).startswith({str(site)!r})\n"
        )
        runs = [[sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                [sys.executable, "-m", "deeppar", "info"],
                [sys.executable, "-m", "deeppar", "schedule", "simulate", "-m", "dualpipev",
                 "-p", "2", "-n", "4", "--json"],
                [sys.executable, "-m", "deeppar", "trace", "analyze", "--json",
                 str(site / PACKAGE_DATA[1])]]
        problems = []
        for cmd in runs:
            res = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=300)
            if res.returncode:
                problems.append(f"installed wheel: {' '.join(cmd[1:])[:80]} failed "
                                f"({res.returncode}): {res.stderr.strip()[-500:]}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    sdist, wheel = argv
    with tarfile.open(sdist) as tar:
        member = next(n for n in tar.getnames() if n.endswith("python/deeppar/__init__.py"))
        version = _version(tar.extractfile(member).read().decode())
    native = os.environ.get("DEEPPAR_NO_EXT", "0") not in ("1", "true", "yes", "on")
    problems = check_sdist(sdist) + check_wheel(wheel, version, native)
    if not problems:
        problems = smoke_test(wheel, native)
    for p in problems:
        print(f"package-check: {p}", file=sys.stderr)
    if not problems:
        print(f"package-check: {Path(sdist).name} and {Path(wheel).name} are complete "
              f"(deeppar {version}, native extension {'built' if native else 'not expected'})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
