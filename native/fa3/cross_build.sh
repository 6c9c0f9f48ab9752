#!/usr/bin/env bash
# On a CPU machine: build the FlashAttention-3 extension for the GPU machine's torch, to carry it there (2.6 MiB)
# instead of building on device time. Downloads (PyPI) the torch wheel of that version (its headers and libraries
# only are unpacked) and CUDA 13.0's nvcc, then runs fa3_build.py --torch-root. Output: .fa3bin/flash_attn_3/.
# Usage: bash native/fa3/cross_build.sh [TORCH_VERSION (2.11.0)] [CUDA (13.0)]
# Env: FA3_CACHE (downloads and unpacked trees, default /tmp/fa3cross), MAX_JOBS (default: nproc).
set -euo pipefail
TV=${1:-2.11.0}; CV=${2:-13.0}
C=${FA3_CACHE:-/tmp/fa3cross}; mkdir -p "$C/whl"
[ -d .fa3src/hopper ] || { echo "fa3_cross_build: .fa3src missing: make it with native/fa3/assemble.sh"; exit 2; }
pip_dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$C/whl" "$@"; }
ls "$C"/whl/torch-"$TV"-*.whl >/dev/null 2>&1 || pip_dl --platform manylinux_2_28_x86_64 "torch==$TV"
ls "$C"/whl/nvidia_cuda_nvcc-"$CV".*.whl >/dev/null 2>&1 || pip_dl --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64 \
  "nvidia-cuda-nvcc==$CV.*" "nvidia-cuda-runtime==$CV.*" "nvidia-cuda-cccl==$CV.*" "nvidia-nvvm==$CV.*" \
  "nvidia-cuda-crt==$CV.*"
if [ ! -d "$C/torch-$TV/torch/lib" ]; then
  unzip -qo "$C"/whl/torch-"$TV"-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py' -d "$C/torch-$TV"
fi
if [ ! -x "$C/cuda-$CV/nvidia/cu13/bin/nvcc" ]; then
  for w in "$C"/whl/nvidia_*-"$CV".*.whl; do unzip -qo "$w" -d "$C/cuda-$CV"; done
fi
grep -E "__version__|^cuda" "$C/torch-$TV/torch/version.py"
NVCC="$C/cuda-$CV/nvidia/cu13/bin/nvcc" nice -n 19 python3 native/fa3/build.py --src .fa3src --out .fa3bin \
  --jobs "${MAX_JOBS:-$(nproc)}" --torch-root "$C/torch-$TV/torch"
rm -rf .fa3bin/build
echo "fa3_cross_build: carry .fa3bin; on the GPU machine: PYTHONPATH=\$PWD/.fa3bin python3 native/fa3/build.py --out .fa3bin --check"
