#!/usr/bin/env bash
# Session 3, call 2 of 2 (same warm nvidia-h200-x2, carry .whl .official): FlashAttention-4's SM90 path installed;
# GPU 1: attention kernel rates (SDPA, cuDNN, FA4 tiles, cuDNN FP8) then the first-clip run; GPU 0: the later-clip
# run, official code beside ours (":fastest" times SDPA, cuDNN and each FA4 tile at the clip's token count).
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
python3 -c "from flash_attn.cute import flash_attn_func; print('fa4 import ok')" 2>&1 | tail -3
R=$OUT/res; mkdir -p $R
( CUDA_VISIBLE_DEVICES=0 timeout 530 python3 -m benchmarks.run --scenario later-704x1024-80f \
    --variants official,torch-graph,torch-graph:fastest,torch-graph:fastest@fp8,torch-graph@fp8 \
    --step-variants torch-graph:fastest,torch-graph:fastest@fp8 --official-repo .official --repeat 2 --graph-warmup 1 \
    --stages dit --out $R > $OUT/later.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m benchmarks.attention_kernels --out $R > $OUT/kernels.log 2>&1;
  CUDA_VISIBLE_DEVICES=1 timeout 320 python3 -m benchmarks.run --scenario first-704x1024-80f \
    --variants official,torch-graph,torch-graph:fastest --step-variants torch-graph:fastest \
    --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/first.log 2>&1 ) &
wait
rm -f $R/*.png
grep -v "^{" $OUT/kernels.log | tail -30; grep -E "ready|Error|error|attention fa4" $OUT/later.log | tail -12; tail -9 $OUT/later.log; tail -6 $OUT/first.log
