#!/usr/bin/env bash
# Compile the CUDA sources with plain nvcc, so a broken kernel or binding is caught on a machine
# without a GPU or a CUDA-enabled torch:
#   1. every torch-free kernel header (csrc/cuda/*_kernel.cuh), warnings as errors;
#   2. every binding (csrc/cuda/*.cu) against the installed torch's headers, when $PYTHON has
#      torch (a CPU wheel ships the CUDA headers but not the generated cuda_cmake_macros.h,
#      hence -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE). Objects are compiled, not linked.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  if [ "${DEEPPAR_ALLOW_NO_NVCC:-0}" = "1" ]; then
    echo "cuda-check: nvcc not found; SKIPPED (DEEPPAR_ALLOW_NO_NVCC=1)" >&2
    exit 0
  fi
  echo "cuda-check: nvcc not found (set NVCC, or DEEPPAR_ALLOW_NO_NVCC=1 to skip)" >&2
  exit 1
fi
ARCH="${DEEPPAR_CUDA_ARCH:-90a}"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
n=0
for header in csrc/cuda/*_kernel.cuh; do
  name="$(basename "$header" .cuh)"
  printf '#include "%s"\n' "$(pwd)/$header" > "$tmp/$name.cu"
  "$NVCC" -std=c++17 -O3 -Werror all-warnings -gencode "arch=compute_${ARCH},code=sm_${ARCH}" \
    -c "$tmp/$name.cu" -o "$tmp/$name.o"
  echo "cuda-check: $header OK (sm_${ARCH})"
  n=$((n + 1))
done
echo "cuda-check: $n kernel header(s) compiled"

PYTHON="${PYTHON:-python3}"
if ! includes="$("$PYTHON" -c 'import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
  echo "cuda-check: $PYTHON has no torch; bindings not compiled" >&2
  exit 0
fi
m=0
for binding in csrc/cuda/*.cu; do
  name="$(basename "$binding" .cu)"
  # shellcheck disable=SC2086  # $includes is a list of -I flags
  "$NVCC" -std=c++20 -O0 -c "$binding" -o "$tmp/$name.binding.o" $includes -Icsrc \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI=1 \
    -gencode "arch=compute_${ARCH},code=sm_${ARCH}" -diag-suppress 20012,20013,20014,20015 \
    2> "$tmp/$name.log" || { cat "$tmp/$name.log" >&2; echo "cuda-check: $binding FAILED" >&2; exit 1; }
  echo "cuda-check: $binding OK (against torch headers)"
  m=$((m + 1))
done
echo "cuda-check: $m binding(s) compiled"
