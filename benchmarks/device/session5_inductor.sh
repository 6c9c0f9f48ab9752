#!/usr/bin/env bash
# Session 5 (nvidia-h200, carry .fa3bin): inductor settings for the compiled blocks' elementwise kernels, later clip.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:$PWD PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
timeout 540 python3 -m benchmarks.inductor_options --scenario later-704x1024-80f --out $R > $OUT/inductor.log 2>&1
grep -E "^\{|Error" $OUT/inductor.log | cut -c1-400 | tail -12
