#!/usr/bin/env bash
# Next session on nvidia-h200, two calls on the same warm machine (FA3 build stays in /tmp/fa3 between them):
#   bash benchmarks/device/session4_fa3.sh build   (carry .fa3bin .fa3src .whl2; ~3 min): FlashAttention-3
#        (forward, SM90, head_dim 128, bf16 + e4m3) cross-built here (fa3_cross_build.sh, .fa3bin), else built
#        there from .fa3src; checked against SDPA; GPU kernel tests; kernel rates beside SDPA and cuDNN FP8;
#   bash benchmarks/device/session4_fa3.sh run     (carry .fa3bin .official; ~6 min, within 30 s of the first): the
#        later-clip run with the official model and FA3 in the model (bf16, and FP8 attention with per-head scales
#        and bf16 output — the candidate for issue 11's accuracy bound).
# FA4 needs the two-call carry of session3_*.sh instead.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/fa3:/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
if [ "${1:-}" = build ]; then
  bash benchmarks/device/setup.sh
  if [ -f .fa3bin/flash_attn_3/_C.abi3.so ] && timeout 60 python3 benchmarks/device/fa3_build.py --out .fa3bin --check; then
    echo "session4: the cross-built FlashAttention-3 runs here"
  else
    mv .fa3bin .fa3bin.unused 2>/dev/null || true
    timeout 300 bash benchmarks/device/build_fa3.sh > $OUT/fa3_build.log 2>&1; tail -15 $OUT/fa3_build.log
  fi
  timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -2
  timeout 150 python3 -m benchmarks.attention_kernels --only sdpa,fa3,fp8 --out $R > $OUT/kernels.log 2>&1
  grep -v "^{" $OUT/kernels.log | grep "|" | head -20
elif [ "${1:-}" = run ]; then  # carry .fa3bin again if the build phase used it
  timeout 560 python3 -m benchmarks.run --scenario later-704x1024-80f \
      --variants official,torch-graph:fa3,torch-graph:fa3@fp8,torch-graph:fa3-fp8@fp8 \
      --step-variants none --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/later.log 2>&1
  grep -E "ready|Error" $OUT/later.log | tail -8; tail -9 $OUT/later.log; rm -f $R/*.png
else
  echo "usage: $0 build|run"; exit 2
fi
