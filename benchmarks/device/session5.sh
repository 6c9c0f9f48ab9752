#!/usr/bin/env bash
# One call on nvidia-h200 (carry .fa3bin .official .whl2): the first-clip run with the official model beside the
# tiers as now defined (FA3 bf16; FP8 linears + FA3 bf16 attention; + FA3 FP8 attention), then an fp16-vs-bf16
# probe of the attention and GEMM kernels (does the data type move the power-capped clock?).
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
bash benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv
timeout 470 python3 -m benchmarks.run --scenario first-704x1024-80f \
    --variants official,torch-graph:fa3,torch-graph:fa3@fp8,torch-graph:fa3-fp8@fp8 \
    --step-variants none --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/first.log 2>&1
grep -E "ready|Error" $OUT/first.log | tail -8; tail -8 $OUT/first.log; rm -f $R/*.png
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw --format=csv,noheader -lms 100 > $OUT/clocks.csv &
timeout 90 python3 -m benchmarks.attention_kernels --only sdpa,cudnn,fa3,"gemm bf16","gemm fp16" --repeat 10 --out $R \
    > $OUT/kernels.log 2>&1
kill %1 2>/dev/null
grep "|" $OUT/kernels.log | head -24
