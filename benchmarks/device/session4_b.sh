#!/usr/bin/env bash
# Session 4, call 2 (nvidia-h200, carry .fa3bin .whl2): FlashAttention-3 in the model beside cuDNN's FP8 attention
# (later clip: bf16, FP8 linears + FA3 bf16 attention, FP8 linears + FA3 FP8 attention, FP8 linears + cuDNN FP8
# attention), then the block GEMMs per backend (benchmarks.gemm_shapes: does anything beat cuBLAS at these shapes?).
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
timeout 330 python3 -m benchmarks.run --scenario later-704x1024-80f \
    --variants torch-graph:fa3,torch-graph:fa3@fp8,torch-graph:fa3-fp8@fp8,torch-graph@fp8 --step-variants none \
    --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/later.log 2>&1
grep -E "ready|Error" $OUT/later.log | tail -6; tail -7 $OUT/later.log; rm -f $R/*.png
timeout 220 python3 -m benchmarks.gemm_shapes --out $R > $OUT/gemm.log 2>&1
grep "|" $OUT/gemm.log | tail -20; grep -iE "error" $OUT/gemm.log | tail -3
