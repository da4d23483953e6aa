#!/usr/bin/env bash
# Compile every torch-free CUDA kernel header (csrc/cuda/*_kernel.cuh) with plain nvcc, so a
# broken kernel is caught on a machine without a GPU or a CUDA-enabled torch.
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
