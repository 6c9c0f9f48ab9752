"""Dense multi-head attention on [B, S, heads·head_dim] tensors, with a choice of kernel.

One function for every attention in the DiT, so the exporter can swap in an ONNX ``Attention`` node and the
runtime can swap in a faster kernel for the long self-attention (two thirds of the DiT's work):

- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` (everywhere; on Hopper it dispatches to cuDNN);
- ``cudnn``: cuDNN's fused attention called directly (``runtime.kernels.cudnn_sdpa``);
- ``fa4``: FlashAttention-4's CuTe kernels (``runtime.kernels.fa4``);
- ``fa3``: FlashAttention-3's SM90 kernels, built from source (``runtime.kernels.fa3``);
- ``fp8``: cuDNN FP8 attention with per-tensor dynamic scales, e4m3 output;
- ``fa3-fp8``: FlashAttention-3's FP8 forward, per-head dynamic scales, bf16 output (faster than ``fp8`` in the
  model, same accuracy);
- ``onnx``: the opset-23 ``Attention`` node (export).

Every kernel reads the [B, S, H, D] view of the projections, so no transpose or copy surrounds it. Under
Ulysses sequence parallelism, q/k/v are exchanged across ranks (sequence ↔ heads) around the kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.distributed import heads_to_seq, seq_to_heads
from runtime.errors import BackendUnavailable
from runtime.kernels import cudnn_sdpa, fa3, fa4
from runtime.kernels.fp8 import quantize_heads, quantize_tensor

IMPLEMENTATIONS = ("sdpa", "cudnn", "fa4", "fa3", "fp8", "fa3-fp8", "onnx")
# what users may name (--attention): "onnx" is the exporter's
CHOICES = ("auto",) + tuple(i for i in IMPLEMENTATIONS if i != "onnx")
# Kernels that quantise q/k/v (and P) to e4m3: never chosen by "auto", only when named (see runtime.kernels.fp8).
FP8_ATTENTION = ("fp8", "fa3-fp8")
# "auto": the first kernel of this list that can run, per compute capability major; elsewhere SDPA. The order is
# what was measured fastest in the model on Hopper (docs/speed.md, attention kernels): FlashAttention-3 where it is
# built, then FlashAttention-4 (pip-installable; fp16 too). Other majors keep SDPA until a kernel is measured faster.
PREFERENCE: dict[int, tuple[str, ...]] = {9: ("fa3", "fa4")}


def unavailable_reason(impl: str, device: torch.device, head_dim: int | None = None,
                       dtype: torch.dtype | None = None) -> str | None:
    """None when ``impl`` can run on ``device`` (for heads of ``head_dim`` and a model of ``dtype``, when given),
    else why not."""
    if impl in ("sdpa", "onnx"):
        return None
    if impl == "cudnn":
        return cudnn_sdpa.available(device)
    if impl == "fa4":
        return fa4.available(device)
    if impl in ("fa3", "fa3-fp8"):
        why = fa3.available(device)  # the device first: on a CPU the reason is the missing GPU, not the head size
        if why:
            return why
        if head_dim is not None and head_dim not in fa3.HEAD_DIMS:
            dims = ", ".join(map(str, fa3.HEAD_DIMS))
            return f"the FlashAttention-3 build has kernels for head_dim {dims} only; this model has {head_dim}"
        if dtype is not None and dtype not in fa3.DTYPES:
            return f"the FlashAttention-3 build has bf16 kernels only; this model is {dtype}"
        return None
    if impl == "fp8":
        return cudnn_sdpa.available(device, fp8=True)
    return f"unknown attention kernel {impl!r}; choose one of: auto, {', '.join(IMPLEMENTATIONS[:-1])}"


def resolve_attention(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> str:
    """``auto`` → the preferred kernel that runs on ``device`` for ``dtype`` (and ``head_dim``); a named kernel is
    checked."""
    device = torch.device(device)
    if impl == "auto":
        if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
            return "sdpa"
        major = torch.cuda.get_device_capability(device)[0]
        for cand in PREFERENCE.get(major, ("sdpa",)):
            if unavailable_reason(cand, device, head_dim, dtype) is None:
                return cand
        return "sdpa"
    why = unavailable_reason(impl, device, head_dim, dtype)
    if why:
        raise BackendUnavailable(f"attention kernel {impl!r} cannot run here: {why}; use --attention auto or sdpa")
    if impl in ("cudnn", "fa4", "fa3", "fp8", "fa3-fp8") and dtype not in (torch.bfloat16, torch.float16):
        raise BackendUnavailable(f"attention kernel {impl!r} needs a bf16/fp16 model, not {dtype}; use --attention sdpa")
    return impl


def _kernel(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, impl: str) -> torch.Tensor:
    """[B, Sq, H, D] × [B, Sk, H, D] → [B, Sq, H, D]."""
    if impl == "cudnn":
        return cudnn_sdpa.sdpa(q4, k4, v4)
    if impl == "fa4":
        return fa4.attention(q4, k4, v4)
    if impl == "fa3":
        return fa3.attention(q4, k4, v4)
    if impl == "fa3-fp8":
        (q8, dq), (k8, dk), (v8, dv) = quantize_heads(q4), quantize_heads(k4), quantize_heads(v4)
        return fa3.attention_fp8(q8, k8, v8, dq, dk, dv).to(q4.dtype)
    if impl == "fp8":
        (q8, dq), (k8, dk), (v8, dv) = quantize_tensor(q4), quantize_tensor(k4), quantize_tensor(v4)
        return (cudnn_sdpa.sdpa_fp8(q8, k8, v8, dq, dk, dv).float() * dv).to(q4.dtype)
    out = F.scaled_dot_product_attention(q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, impl: str = "sdpa",
              ulysses: tuple[str, tuple[int, ...]] | None = None) -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head, no mask. q: [B, Sq, H·D], k/v: [B, Sk, H·D] → [B, Sq, H·D].

    ``ulysses`` = (process-group name, tokens per rank): q/k/v hold this rank's tokens for all heads; they are
    exchanged to all tokens for this rank's heads, attended, and exchanged back."""
    if impl == "onnx":
        # torch.onnx.ops.attention exports as a single opset-23 Attention node; in eager mode it
        # computes the reference math, so the exported graph and PyTorch agree by construction.
        out = torch.onnx.ops.attention(q, k, v, q_num_heads=heads, kv_num_heads=heads)
        return out[0] if isinstance(out, tuple) else out
    b, sq, hd = q.shape
    d = hd // heads
    q4, k4, v4 = (t.view(b, t.shape[1], heads, d) for t in (q, k, v))
    if ulysses is None:
        return _kernel(q4, k4, v4, impl).reshape(b, sq, hd)
    group, sizes = ulysses
    q4, k4, v4 = (seq_to_heads(t, group, list(sizes)) for t in (q4, k4, v4))
    return heads_to_seq(_kernel(q4, k4, v4, impl), group, list(sizes)).reshape(b, sq, hd)
