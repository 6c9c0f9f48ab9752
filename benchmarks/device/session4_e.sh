#!/usr/bin/env bash
# Session 4, call 6 (nvidia-h200, carry .fa3bin .whl2 .whl3 .official): the changed tree on a GPU — GPU tests (kernels,
# CUDA-graph backends, official parity in bf16), and the tiny model end to end on CUDA with the new defaults.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh || exit 3
WAN22_REPO=$PWD/.official timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py tests/test_backends.py \
  tests/test_official_parity.py > $OUT/tests.log 2>&1
grep -E "passed|failed|^FAILED|^SKIPPED|Error" $OUT/tests.log | head -20
for args in "--backend torch-graph" "--backend torch-graph --precision fp8" "--backend torch-graph --precision fp8 --attention fa3-fp8"; do
  timeout 120 python3 -m runtime.generate $args --save_file $OUT/tiny.mp4 --overwrite > $OUT/gen.log 2>&1
  echo "generate $args -> rc $?: $(grep -iE 'attention|error|generated' $OUT/gen.log | tail -2 | tr '\n' ' ')"
done
rm -f $OUT/tiny.mp4
