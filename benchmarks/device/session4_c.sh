#!/usr/bin/env bash
# Session 4, call 4 (nvidia-h200, carry .fa3bin .whl2): GPU kernel tests on the changed tree (FA3 built), then the
# block GEMMs per cuBLAS layout/data (run.py's ceiling GEMM, a @ b with b [in, out], read 778 TFLOP/s where
# F.linear read 683: is it the layout?).
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -3
timeout 200 python3 -m benchmarks.gemm_shapes --no-autotune --out $R > $OUT/gemm.log 2>&1
grep "|" $OUT/gemm.log | tail -24; grep -iE "error" $OUT/gemm.log | tail -3
