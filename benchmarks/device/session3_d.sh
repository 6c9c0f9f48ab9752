#!/usr/bin/env bash
# Session 3, call 4 (same warm nvidia-h200-x2, carry .whl .official): FlashAttention-4 installed. GPU 0: the later-clip
# run, official beside ours (default attention = auto → FA4 on SM90) and the FP8 tiers; GPU 1: FA4 kernel tests on
# the GPU, then the first-clip run.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
( CUDA_VISIBLE_DEVICES=0 timeout 540 python3 -m benchmarks.run --scenario later-704x1024-80f \
    --variants official,torch-graph,torch-graph@fp8,torch-graph:fa4@fp8 --step-variants torch-graph,torch-graph@fp8,torch-graph:fa4@fp8 \
    --official-repo .official --repeat 3 --graph-warmup 1 --stages dit --out $R > $OUT/later.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py > $OUT/gpu_tests.log 2>&1;
  CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m benchmarks.run --scenario first-704x1024-80f \
    --variants official,torch-graph:sdpa,torch-graph,torch-graph@fp8 --step-variants torch-graph \
    --official-repo .official --repeat 3 --graph-warmup 1 --stages dit --out $R > $OUT/first.log 2>&1 ) &
wait
rm -f $R/*.png
tail -3 $OUT/gpu_tests.log; grep -E "ready|Error" $OUT/later.log | tail -8; tail -7 $OUT/later.log; tail -7 $OUT/first.log
