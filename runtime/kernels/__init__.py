"""GPU kernels from libraries, wrapped as PyTorch custom ops so that ``torch.compile`` and CUDA-graph capture
see them as single opaque calls: cuDNN's fused attention through ``nvidia-cudnn-frontend`` (bf16/fp16 and FP8),
FlashAttention-4's CuTe kernels, and FP8 linear layers through ``torch._scaled_mm``.

Every kernel here is optional: ``available()`` says whether it can run on a device, and callers fall back to
PyTorch's SDPA / bf16 GEMMs where it cannot (CPU, other GPUs, missing packages).
"""

from __future__ import annotations

import torch


def cuda_capability(device: torch.device | str | None) -> tuple[int | None, str | None]:
    """(compute-capability major, None) for a usable CUDA device, else (None, the reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    dev = torch.device(device or "cuda")
    if dev.type != "cuda":
        return None, f"device {dev} is not CUDA"
    return torch.cuda.get_device_capability(dev)[0], None
