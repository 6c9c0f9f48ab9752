"""FlashAttention-4 (``flash-attn-4``: CuTe-DSL kernels, with an SM90 forward path) as a custom op.

Takes the model's layout directly: q/k/v [B, S, H, D] (a free view of [B, S, H·D]), returns [B, Sq, H, D].
Kernels are JIT-compiled per configuration on first use (seconds), then cached by the library.

The model uses the library's own SM90 tile: ``benchmarks.attention_kernels`` sweeps other tiles through
``run(..., tile)`` and none beat it at the S2V shapes on the H200 (benchmarks/NOTES.md).
"""
from __future__ import annotations

import torch

def available(device: torch.device | None = None) -> str | None:
    """None when usable, else the reason it is not."""
    from runtime.kernels import cuda_capability

    major, why = cuda_capability(device)
    if why:
        return why
    if major not in (9, 10, 11, 12):  # the CuTe kernels target SM90/SM100/SM120
        return f"FlashAttention-4 has no kernels for compute capability {major}.x"
    try:
        from flash_attn.cute import flash_attn_func  # noqa: F401
    except Exception as err:
        return f"flash-attn-4 unavailable ({type(err).__name__}: {err})"
    return None


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """One call; ``tile`` (SM90 only) picks the forward kernel's (tile_m, tile_n)."""
    if tile is not None and torch.cuda.get_device_capability(q.device)[0] == 9:
        # The tile is only reachable through the library's forward entry point (not its autograd wrapper);
        # inference needs no autograd anyway.
        from flash_attn.cute.interface import _flash_attn_fwd

        return _flash_attn_fwd(q, k, v, tile_mn=tuple(tile), mma_pv_is_rs=True, intra_wg_overlap=True)[0]
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op("wan_s2v::fa4_attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return run(q, k, v).contiguous()


@attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))
