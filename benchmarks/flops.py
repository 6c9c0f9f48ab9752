"""FLOP model of one S2V DiT forward (multiply-add = 2 FLOPs), split into linear-layer and attention work.

Counted per forward for batch B, S tokens (L noisy + E reference/motion), text length T = text_len:
- self-attention: q, k, v, o projections 4·2·S·D²; QKᵀ and PV 2·2·S²·D
- text cross-attention: q, o on S tokens 2·2·S·D²; k, v on T tokens 2·2·T·D²; core 2·2·S·T·D
- FFN: 2·2·S·D·F_ffn
- audio injection (per injector): AdaLN linear 2·F·D·2D; q, o on L tokens 2·2·L·D²; k, v on F·5 tokens;
  core 2·2·L·5·D
- embeddings and head: patch conv 2·L·D·C·4, head 2·L·D·4·C_out, time MLPs on 2 rows (t and 0)
Per-clip work (text MLP, audio encoder, reference/motion/pose convolutions) runs once per clip in ``prepare``
and is not part of a forward. Elementwise work (norms, RoPE, modulation) is not counted: it is memory-bound.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import DiTConfig


@dataclass(frozen=True)
class Flops:
    linear: float
    attention: float

    @property
    def total(self) -> float:
        return self.linear + self.attention

    def floor_s(self, gemm_tflops: float, attention_tflops: float) -> float:
        """Time at the measured ceilings: linear work at the GEMM rate, attention at the SDPA rate."""
        return self.linear / (gemm_tflops * 1e12) + self.attention / (attention_tflops * 1e12)


def dit_forward_flops(cfg: DiTConfig, frames: int, grid_h: int, grid_w: int, extra: int, batch: int = 1) -> Flops:
    d, ffn, t = cfg.dim, cfg.ffn_dim, cfg.text_len
    L = frames * grid_h * grid_w
    S = L + extra
    n_tok = cfg.num_audio_token + 1
    per_block_linear = 4 * 2 * S * d * d + 2 * 2 * S * d * d + 2 * 2 * t * d * d + 2 * 2 * S * d * ffn
    per_block_attn = 2 * 2 * S * S * d + 2 * 2 * S * t * d
    inj_linear = 2 * frames * d * 2 * d + 2 * 2 * L * d * d + 2 * 2 * frames * n_tok * d * d
    inj_attn = 2 * 2 * L * n_tok * d
    n_inj = len(cfg.audio_inject_layers)
    embed = 2 * L * d * cfg.in_dim * 4 + 2 * L * d * 4 * cfg.out_dim + 2 * 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    linear = cfg.num_layers * per_block_linear + n_inj * inj_linear + embed
    attention = cfg.num_layers * per_block_attn + n_inj * inj_attn
    return Flops(batch * linear, batch * attention)
