#!/usr/bin/env bash
# nvidia-h200-x2: one CFG step on 1 GPU vs CFG parallel vs Ulysses-2 (same run), then FP8 accuracy variants.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
pip install -q --no-index --no-deps --target /tmp/site .whl/nvidia_cudnn_frontend*.whl 2>/dev/null; export PYTHONPATH=/tmp/site:$PYTHONPATH
R=$OUT/res; mkdir -p $R
timeout 380 torchrun --nproc_per_node 2 -m benchmarks.multi_gpu --scenario later-704x1024-80f --layouts ${LAYOUTS:-cfg,ulysses} \
  --repeat 2 --out $R > $OUT/multi.log 2>&1
tail -8 $OUT/multi.log
[ -n "$SKIP_FP8" ] && exit 0
tail -8 $OUT/multi.log
CUDA_VISIBLE_DEVICES=0 timeout 190 python3 -m benchmarks.run --scenario later-704x1024-80f \
  --variants torch-graph:cudnn,torch-graph:cudnn@fp8 --step-variants none --repeat 1 --graph-warmup 1 --stages dit \
  --out $OUT/fp8 > $OUT/fp8.log 2>&1
tail -6 $OUT/fp8.log
rm -f $R/*.md $OUT/fp8/*.md $OUT/fp8/*.png
