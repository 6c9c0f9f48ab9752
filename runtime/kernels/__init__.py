"""GPU kernels from libraries, wrapped as PyTorch custom ops so that ``torch.compile`` and CUDA-graph capture
see them as single opaque calls: cuDNN's fused attention through ``nvidia-cudnn-frontend`` (bf16/fp16 and FP8),
FlashAttention-4's CuTe kernels, and FP8 linear layers through ``torch._scaled_mm``.

Every kernel here is optional: ``available()`` says whether it can run on a device, and callers fall back to
PyTorch's SDPA / bf16 GEMMs where it cannot (CPU, other GPUs, missing packages).
"""
