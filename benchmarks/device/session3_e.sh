#!/usr/bin/env bash
# Session 3, call 5 (nvidia-h200, carry .whl1 .official), then session3_f.sh within 30 s: why the tiny bf16 parity test
# differs from the official model on the GPU (module by module), and the CPU-side kernel tests on the GPU.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1 WAN22_REPO=$PWD/.official
bash benchmarks/device/setup.sh
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -2
timeout 120 python3 benchmarks/device/parity_diag.py 2>&1 | grep -v "^ - \|nanobind\|Warning\|autocast\|__init__" > $OUT/parity_diag.log
head -c 6000 $OUT/parity_diag.log
