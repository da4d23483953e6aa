"""Compiling Triton kernels for Hopper without a GPU, shared by the kernel tests."""

from __future__ import annotations

import pytest


def compile_for_sm90(kernel, pointers: dict[str, str], constants: dict[str, object],
                     num_warps: int = 4):
    """Compile ``kernel`` to an sm_90 cubin: ``pointers`` names the pointer arguments and
    their types (``"*fp32"``), ``constants`` the constexpr arguments and their values; every
    other argument is an ``i32``. Skips the test when this Triton install has no ptxas."""
    compiler = pytest.importorskip("triton.compiler")
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(kernel.arg_names)
    signature = {name: "i32" for name in names}
    signature.update(pointers)
    for name in constants:
        signature[name] = "constexpr"
    source = compiler.ASTSource(
        fn=kernel, signature=signature,
        constexprs={(names.index(n),): v for n, v in constants.items()},
    )
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps})
    except RuntimeError as exc:  # no ptxas in this triton install
        if "ptxas" in str(exc):
            pytest.skip(str(exc))
        raise
