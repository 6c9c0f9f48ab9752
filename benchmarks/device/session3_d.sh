#!/usr/bin/env bash
# Session 3, call 4 (same warm nvidia-h200, carry .whl .official): FlashAttention-4 installed. FA4 kernel tests on the
# GPU; the later-clip run, official beside ours (default attention = auto → FA4 on SM90) and the FP8 tiers; the
# first-clip run.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > $OUT/gpu_tests.log 2>&1; tail -2 $OUT/gpu_tests.log
timeout 330 python3 -m benchmarks.run --scenario later-704x1024-80f \
    --variants official,torch-graph,torch-graph@fp8,torch-graph:fa4@fp8 --step-variants torch-graph,torch-graph:fa4@fp8 \
    --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/later.log 2>&1
grep -E "ready|Error" $OUT/later.log | tail -6; tail -6 $OUT/later.log
timeout 190 python3 -m benchmarks.run --scenario first-704x1024-80f --variants official,torch-graph --step-variants none \
    --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/first.log 2>&1
tail -4 $OUT/first.log; rm -f $R/*.png
