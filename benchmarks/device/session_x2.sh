#!/usr/bin/env bash
# One call on nvidia-h200-x2: kernel rates + first-clip run on GPU 1 while the later-clip run uses GPU 0.
set -o pipefail
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
bash benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, cudnn; print(torch.__version__, torch.backends.cudnn.version(), cudnn.backend_version())" 2>&1 | tail -1
python3 -c "from flash_attn.cute import flash_attn_func; print('fa4 import ok')" 2>&1 | tail -2
R=$OUT/res; mkdir -p $R
V="official,torch,torch-graph,torch-graph:fastest,torch-graph@fp8"
( CUDA_VISIBLE_DEVICES=0 timeout 560 python3 -m benchmarks.run --scenario later-704x1024-80f --variants $V \
    --step-variants torch-graph:fastest,torch-graph@fp8 --official-repo .official --repeat 2 --graph-warmup 1 \
    --stages dit --out $R > $OUT/later.log 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m benchmarks.attention_kernels --out $R > $OUT/kernels.log 2>&1;
  CUDA_VISIBLE_DEVICES=1 timeout 350 python3 -m benchmarks.run --scenario first-704x1024-80f \
    --variants official,torch-graph:fastest,torch-graph@fp8 --step-variants torch-graph:fastest \
    --official-repo .official --repeat 2 --graph-warmup 1 --stages dit --out $R > $OUT/first.log 2>&1 ) &
wait
rm -f $R/*.png $R/*.md
tail -5 $OUT/kernels.log; tail -12 $OUT/later.log; tail -8 $OUT/first.log
