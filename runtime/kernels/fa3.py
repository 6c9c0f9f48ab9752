"""FlashAttention-3 (the C++/CUDA ``hopper/`` kernels of Dao-AILab/flash-attention) as custom ops.

There is no usable wheel; ``native/fa3/`` builds a forward-only SM90 extension (head_dim 128,
bf16 and e4m3) from the carried ``.fa3src`` tree into ``/tmp/fa3`` (put that on ``PYTHONPATH``). Importing its
``flash_attn_3._C`` registers the ``torch.ops.flash_attn_3`` operators; we call ``fwd`` directly (the library's
Python wrapper adds autograd and config lookups we do not need).

Layout: q/k/v [B, S, H, D] with a contiguous last dimension (a free view of [B, S, H·D], also of a fused QKV
output), out [B, Sq, H, D]. Two ops:
- ``fa3_attention``: bf16/fp16 in and out;
- ``fa3_attention_fp8``: e4m3 q/k/v with float32 descales of shape [B, H_kv] (x ≈ x8 · descale per batch and
  head; device tensors, so no host sync), bf16 out — unlike cuDNN's FP8 graph on Hopper, which outputs e4m3.
"""
from __future__ import annotations

import torch

# torch.ops.flash_attn_3.fwd's positional arguments after q, k, v (see the extension's schema):
# k_new, v_new, q_v, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q, seqused_k, max_seqlen_q,
# max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos, rotary_sin, seqlens_rotary — all None here.
_UNUSED = (None,) * 17
HEAD_DIMS = (128,)  # what native/fa3/build.py compiles (the 14B model's head_dim) ...
DTYPES = (torch.bfloat16,)  # ... and in bf16 only (fp16 is compiled out; FP8 inputs come from a bf16 model)


def _ops():
    import flash_attn_3._C  # noqa: F401  (loading the library registers torch.ops.flash_attn_3)

    return torch.ops.flash_attn_3


def available(device: torch.device | None = None) -> str | None:
    """None when usable, else the reason it is not."""
    from runtime.kernels import cuda_capability

    major, why = cuda_capability(device)
    if why:
        return why
    if major != 9:  # the build carries SM90a kernels only
        return f"FlashAttention-3 (this build) has kernels for compute capability 9.x only, not {major}.x"
    try:
        _ops().fwd  # noqa: B018
    except Exception as err:
        return (f"FlashAttention-3 unavailable ({type(err).__name__}: {err}); build it with "
                "native/fa3/ (README there) and put its output folder on PYTHONPATH")
    return None


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor | None = None,
        descale_k: torch.Tensor | None = None, descale_v: torch.Tensor | None = None,
        softmax_scale: float | None = None) -> torch.Tensor:
    """One non-causal forward call → out [B, Sq, H, Dv] (bf16 for e4m3 inputs)."""
    out, _lse, _acc, _lse_acc = _ops().fwd(
        q, k, v, *_UNUSED, descale_q, descale_k, descale_v, softmax_scale,
        False,  # is_causal
        -1, -1,  # window_size_left/right: no local window
        0,  # attention_chunk
        0.0,  # softcap
        False,  # is_rotary_interleaved
        None,  # scheduler_metadata
        1,  # num_splits: the split-KV kernels are not built
        False,  # pack_gqa: not built; no GQA here
        0,  # sm_margin
    )
    return out


@torch.library.custom_op("wan_s2v::fa3_attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return fwd(q, k, v)


@attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


@torch.library.custom_op("wan_s2v::fa3_attention_fp8", mutates_args=())
def attention_fp8(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor) -> torch.Tensor:
    return fwd(q8, k8, v8, descale_q, descale_k, descale_v)


@attention_fp8.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v):
    return q8.new_empty(q8.shape[:-1] + (v8.shape[-1],), dtype=torch.bfloat16)
