"""FP8 (e4m3) inference for the DiT's block linears: what is quantised, how, and the kernels.

Weights: per-output-channel scales computed once at load from the BF16 checkpoint (``w ≈ w8 · s_w[n]``).
Activations: per-token dynamic scales computed on the fly (``x ≈ x8 · s_x[m]``), fused by ``torch.compile``
into the kernel that produces the activation. GEMM: ``torch._scaled_mm`` with row-wise scales, bf16 out, fast
accumulation (chosen by measurement: ``benchmarks/NOTES.md``, FP8 tiers).

Attention stays bf16 under ``--precision fp8`` (the fastest exact kernel, as in bf16): FP8 attention is a separate,
named choice (``--attention fp8``: cuDNN, per-tensor q/k/v scales, e4m3 output; ``fa3-fp8``: FlashAttention-3,
per-head scales, bf16 output), because it alone adds several times the error of the FP8 linears; q/k, v and P
quantisation each contribute about a third of it, whatever the scale granularity or output type.

Layers that stay in BF16/FP32, and why (``KEEP``): embeddings (patch/text/time/pose: run once per step on
small inputs or once per clip), modulation vectors and norms (elementwise, precision-sensitive), the head
(FP32 as official), the audio encoder and audio injectors (small; per-frame attention over 5 tokens), the
cross-attention's projections (k/v see 512 text tokens: negligible work; q/o cost as much FP8 error as the FFN
for a fraction of the linear work).

What each piece costs in accuracy and time is measured by ``benchmarks/fp8_study.py`` and ``benchmarks.run``
(results and numbers: docs/speed.md, FP8, and benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn

E4M3_MAX = 448.0
QUANTISABLE = ("self_attn.qkv", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.o", "ffn.0", "ffn.2")
QUANTISED = ("self_attn.qkv", "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "ffn.0", "ffn.2")
KEEP = {
    "patch_embedding / cond_encoder / text_embedding / time_embedding / time_projection": "once per step or clip, small",
    "modulation, norm_q/norm_k, norm3": "elementwise; precision-sensitive",
    "head": "float32 as in the official code",
    "casual_audio_encoder, audio_injector.*": "small; per-frame attention over a handful of tokens",
    "cross_attn.k / cross_attn.v": "512 text tokens per step: negligible work",
    "cross_attn.q / cross_attn.o": "as much FP8 error as the FFN for a fraction of the linear work (fp8_study)",
}


def unsupported_reason(device: torch.device | str) -> str | None:
    """None where the FP8 tier runs, else why not (the caller refuses with this reason; never a silent fallback)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return f"--precision fp8 needs an NVIDIA Hopper (or newer) GPU; the device is {dev.type}: use --precision bf16"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 9:
        return (f"--precision fp8 needs compute capability 9.0 or newer (Hopper); this GPU is {major}.{minor}: "
                "use --precision bf16")
    return None


def weight_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel quantisation of a [N, K] weight → (w8 [N, K] e4m3, scale [1, N] fp32), w ≈ w8 · scale."""
    amax = w.float().abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / E4M3_MAX
    w8 = (w.float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return w8, scale[None, :].contiguous()


def _to_e4m3(xf: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
    return (xf / descale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row dynamic quantisation of [M, K] → (x8, scale [M, 1] fp32), x ≈ x8 · scale."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return _to_e4m3(xf, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor dynamic quantisation → (x8, descale [1] fp32), x ≈ x8 · descale; the scale stays on the device."""
    xf = x.float()
    descale = xf.abs().amax().clamp(min=1e-12).reshape(1) / E4M3_MAX
    return _to_e4m3(xf, descale), descale


def quantize_heads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(batch, head) dynamic quantisation of [B, S, H, D] → (x8 [B, S, H, D], descale [B, H] fp32),
    x[b, :, h] ≈ x8[b, :, h] · descale[b, h]: the descale layout FlashAttention-3's FP8 forward takes."""
    xf = x.float()
    descale = xf.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    return _to_e4m3(xf, descale[:, None, :, None]), descale


class FP8Linear(nn.Module):
    """y = x wᵀ + b with e4m3 weights (per-channel scales) and per-token dynamic activation scales."""

    act_dtype = torch.bfloat16  # what the layer takes and returns (see runtime.models.dit._in)

    def __init__(self, linear: nn.Linear, fast_accum: bool = True):
        super().__init__()
        # fast_accum: Hopper's FP8 tensor cores accumulate in reduced precision unless the GEMM promotes the
        # partial sums to FP32 periodically; the fast mode skips that (faster, less accurate).
        self.fast_accum = fast_accum
        w8, scale = weight_scales(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(self.act_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x8, sx = quantize_rows(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(x8, self.weight.t(), scale_a=sx, scale_b=self.weight_scale, bias=self.bias,
                             out_dtype=self.act_dtype, use_fast_accum=self.fast_accum)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8_e4m3"


def quantize_blocks(model: nn.Module, names: tuple[str, ...] = QUANTISED, fast_accum: bool = True) -> int:
    """Replace the block linears named in ``names`` (default ``QUANTISED``) by ``FP8Linear`` (in place); returns
    how many."""
    unknown = set(names) - set(QUANTISABLE)
    if unknown:
        raise ValueError(f"not quantisable: {sorted(unknown)}; choose from {QUANTISABLE}")
    n = 0
    for block in model.blocks:
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            layer = getattr(parent, leaf, None)
            if isinstance(layer, nn.Linear):
                setattr(parent, leaf, FP8Linear(layer, fast_accum))
                n += 1
    return n
