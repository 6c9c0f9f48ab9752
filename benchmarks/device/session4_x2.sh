#!/usr/bin/env bash
# Session 4, nvidia-h200-x2 (carry .fa3bin .whl2): one CFG step on 1 GPU vs CFG parallel vs Ulysses-2 with
# FlashAttention-3, Ulysses ranks with compiled blocks again (WAN_S2V_SP_COMPILE=1: the wrong run of session 2 used
# the complex RoPE that compiled blocks no longer take); rel_l2_vs_1gpu says whether they now agree.
set -o pipefail
export PYTHONPATH=$PWD/.fa3bin:/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash benchmarks/device/setup.sh || exit 3
R=$OUT/res; mkdir -p $R
WAN_S2V_SP_COMPILE=1 timeout 500 torchrun --nproc_per_node 2 -m benchmarks.multi_gpu --scenario later-704x1024-80f \
  --layouts cfg,ulysses --attention fa3 --repeat 2 --out $R > $OUT/multi.log 2>&1
grep -E "Error|error" $OUT/multi.log | tail -4; tail -8 $OUT/multi.log
