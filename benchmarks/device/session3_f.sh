#!/usr/bin/env bash
# Session 3, call 6 (same warm nvidia-h200, carry .whl): the FP8 tiers as now defined (cross-attention q/o kept bf16,
# fast accumulation) beside the bf16 default path, later clip.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
timeout 300 python3 -m benchmarks.run --scenario later-704x1024-80f \
    --variants torch-graph,torch-graph:fa4@fp8,torch-graph@fp8 --step-variants torch-graph:fa4@fp8,torch-graph@fp8 \
    --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/later_fp8.log 2>&1
grep -E "ready|Error" $OUT/later_fp8.log | tail -5; tail -5 $OUT/later_fp8.log; rm -f $R/*.png
