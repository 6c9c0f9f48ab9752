#!/usr/bin/env bash
# On a lent GPU machine (the device tool), from the repo root: install the carried wheels, then run one benchmark
# module with its log and results under $OUT. What each run measured is in its result file's meta (command,
# code revision, date); benchmarks/NOTES.md keeps the findings.
#   bash benchmarks/device/run.sh MODULE [ARGS...]       e.g.  bash benchmarks/device/run.sh clip --precision bf16,fp8
# Carry: .whl3 (PyAV, soxr, ftfy, diffusers for the official model), .fa3bin (FlashAttention-3, native/fa3/),
# .official (a Wan-Video/Wan2.2 checkout, for --official-repo .official). Set S2V_CODE_REV to this tree's commit.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
module=${1:?benchmark module, e.g. clip}; shift
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -m "benchmarks.$module" --out "$OUT" "$@" 2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/$module.log" | grep -v "^|"
