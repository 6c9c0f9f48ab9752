"""Dense multi-head attention on [B, S, heads·head_dim] tensors.

One function for every attention in the DiT, so the exporter can swap the implementation for an ONNX
``Attention`` node in the 3-D layout (the layout that ONNX Runtime and the ONNX reference agree on).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATIONS = ("sdpa", "onnx")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, impl: str = "sdpa") -> torch.Tensor:
    """softmax(q kᵀ / √d) v per head, no mask. q: [B, Sq, H·D], k/v: [B, Sk, H·D] → [B, Sq, H·D]."""
    if impl == "onnx":
        # torch.onnx.ops.attention exports as a single opset-23 Attention node; in eager mode it
        # computes the reference math, so the exported graph and PyTorch agree by construction.
        out = torch.onnx.ops.attention(q, k, v, q_num_heads=heads, kv_num_heads=heads)
        return out[0] if isinstance(out, tuple) else out
    b, sq, hd = q.shape
    d = hd // heads
    q4 = q.view(b, sq, heads, d).transpose(1, 2)
    k4 = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v4 = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q4, k4, v4)
    return out.transpose(1, 2).reshape(b, sq, hd)
