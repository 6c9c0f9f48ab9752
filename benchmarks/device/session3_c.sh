#!/usr/bin/env bash
# Session 3, call 3 (nvidia-h200, carry .whl1 .official), then session3_d.sh within 30 s: the GPU kernel tests and the
# official-parity test on the GPU; which FP8 pieces cost how much accuracy; a kernel-family profile of the FP8 forward.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1 WAN22_REPO=$PWD/.official
bash benchmarks/device/setup.sh
R=$OUT/res; mkdir -p $R
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_official_parity.py tests/test_backends.py > $OUT/gpu_tests.log 2>&1
tail -4 $OUT/gpu_tests.log
timeout 270 python3 -m benchmarks.fp8_study --scenario later-704x1024-80f --out $R > $OUT/fp8_study.log 2>&1
grep -v "^{" $OUT/fp8_study.log | grep "|" | tail -12
timeout 190 python3 -m benchmarks.profile_forward --scenario later-704x1024-80f --variant torch-compile@fp8 --out $R > $OUT/profile_fp8.log 2>&1
head -8 $R/profile_*fp8.md
