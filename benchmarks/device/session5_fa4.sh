#!/usr/bin/env bash
# Session 5: FlashAttention-4 against FlashAttention-3 in the same process, kernels and model (nvidia-h200).
#   call 1 (carry .whl1):          bash benchmarks/device/session5_fa4.sh part1   — keeps the CuTe DSL wheel's part 1 in /tmp
#   call 2 (carry .whl .fa3bin), within 30 s: bash benchmarks/device/session5_fa4.sh  — installs FA4, then measures
# Decides `auto`'s order on SM90 per token count (issue 10: "keep whichever is fastest per shape").
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
if [ "${1:-}" = part1 ]; then bash benchmarks/device/setup.sh; ls -la /tmp/cu13.part.aa; exit; fi
bash benchmarks/device/setup.sh || exit 3
python3 -c "from flash_attn.cute import flash_attn_func; print('fa4 import ok')" 2>&1 | tail -2
R=$OUT/res; mkdir -p $R
timeout 150 python3 -m benchmarks.attention_kernels --only sdpa,fa3,fa4 --repeat 10 --out $R > $OUT/kernels.log 2>&1
grep "|" $OUT/kernels.log | head -30
for sc in later first; do
  timeout 170 python3 -m benchmarks.run --scenario $sc-704x1024-80f --variants torch-graph:fa4,torch-graph:fa3 \
      --step-variants none --repeat 3 --graph-warmup 1 --stages dit --out $R > $OUT/$sc.log 2>&1
  grep -E "ready|Error" $OUT/$sc.log | tail -4; tail -4 $OUT/$sc.log
done
rm -f $R/*.png
