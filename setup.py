"""Build the native extension ``deeppar._C`` (the package metadata is in pyproject.toml).

Environment switches:
  DEEPPAR_NO_EXT=1        pure-Python install (no native extension)
  DEEPPAR_NO_CUDA=1       build only the CPU kernels even where CUDA could be built
  DEEPPAR_CUDA_ARCH=...   CUDA targets, ";"-separated, default "90a" (Hopper with its
                          architecture-specific features); e.g. "90a;100a"
  MAX_JOBS=N              parallel compile jobs (read by torch's BuildExtension/ninja)
CUDA sources are compiled only when the installed torch has CUDA (torch.version.cuda) and a CUDA
toolkit is found; a visible GPU is never required (nor consulted).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("DEEPPAR_CUDA_ARCH", "90a").split(";") if a.strip()]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _extensions() -> tuple[list, dict]:
    if _flag("DEEPPAR_NO_EXT"):
        print("deeppar: DEEPPAR_NO_EXT=1, building without the native extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        not _flag("DEEPPAR_NO_CUDA") and torch.version.cuda is not None and CUDA_HOME is not None
    )
    cxx = ["-O3", "-fopenmp", "-DNDEBUG"]
    extra = {"cxx": cxx}
    if with_cuda:
        # nvcc must not use fast math: the EPLB planner relies on IEEE division (spec).
        extra["nvcc"] = ["-O3", "-DNDEBUG", "-lineinfo", *_cuda_arch_flags()]
        ext = CUDAExtension(
            "deeppar._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            define_macros=[("DEEPPAR_WITH_CUDA", "1")],
        )
    else:
        why = "DEEPPAR_NO_CUDA=1" if _flag("DEEPPAR_NO_CUDA") else (
            "torch has no CUDA" if torch.version.cuda is None else "no CUDA toolkit found"
        )
        print(f"deeppar: building CPU kernels only ({why})", file=sys.stderr)
        ext = CppExtension(
            "deeppar._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# Name, version, dependencies, packages and package data: pyproject.toml ([project]).
setup(ext_modules=ext_modules, cmdclass=cmdclass)
