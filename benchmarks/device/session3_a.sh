#!/usr/bin/env bash
# Session 3, call 1 of 2 (nvidia-h200-x2, carry .whl1 .official): GPU 0 profiles one compiled bf16 forward by kernel
# family; GPU 1 measures which FP8 pieces cost how much accuracy. Then call 2 (session3_b.sh) within 30 s.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
bash benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, cudnn; print(torch.__version__, torch.backends.cudnn.version(), cudnn.backend_version())" 2>&1 | tail -1
R=$OUT/res; mkdir -p $R
( CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m benchmarks.profile_forward --scenario later-704x1024-80f --out $R > $OUT/profile.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 420 python3 -m benchmarks.fp8_study --scenario later-704x1024-80f --out $R > $OUT/fp8_study.log 2>&1 ) &
wait
tail -40 $OUT/profile.log; tail -14 $OUT/fp8_study.log
