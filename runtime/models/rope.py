"""3-D rotary position tables for the S2V token layout, as real cos/sin (no complex numbers).

Token order in one S2V sequence: ``[noisy | reference | motion post | motion 2x | motion 4x]``.
The tables depend only on (latent frames, latent height, latent width, with/without motion), so they are
built once per clip shape in float64 and cast to float32, and fed to the DiT (or an engine) as inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.config import DiTConfig


@dataclass(frozen=True)
class TokenGroup:
    """One block of tokens with the official (start, end, range) RoPE description.

    ``start``/``end`` give the token grid ``end - start`` (frames, rows, cols); ``extent`` is the coordinate
    range that the grid samples with ``linspace`` (down-sampled motion groups keep full-resolution coordinates).
    A negative start frame means positions count backwards in time (rotation by a negative angle).
    """

    start: tuple[int, int, int]
    end: tuple[int, int, int]
    extent: tuple[int, int, int]

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(e - s for s, e in zip(self.start, self.end))  # type: ignore[return-value]

    @property
    def num_tokens(self) -> int:
        f, h, w = self.grid
        return f * h * w

    def positions(self) -> np.ndarray:
        """Integer (t, h, w) positions, [num_tokens, 3], row-major over the grid."""
        (f_o, h_o, w_o), (t_f, t_h, t_w) = self.start, self.extent
        seq_f, seq_h, seq_w = self.grid
        if f_o >= 0:
            f_pos = np.linspace(f_o, t_f + f_o - 1, seq_f).astype(int)
        else:  # sampled as magnitudes, then mirrored (the official code conjugates the rotation)
            f_pos = -np.linspace(-f_o, -t_f - f_o + 1, seq_f).astype(int)
        h_pos = np.linspace(h_o, t_h + h_o - 1, seq_h).astype(int)
        w_pos = np.linspace(w_o, t_w + w_o - 1, seq_w).astype(int)
        grid = np.stack(np.meshgrid(f_pos, h_pos, w_pos, indexing="ij"), axis=-1)
        return grid.reshape(-1, 3).astype(np.int64)


def s2v_token_groups(cfg: DiTConfig, frames: int, lat_h: int, lat_w: int, motion: bool) -> list[TokenGroup]:
    """Token groups of one clip: ``frames`` noisy latent frames at latent size ``lat_h × lat_w``."""
    ph, pw = cfg.patch_size[1], cfg.patch_size[2]
    h, w = lat_h // ph, lat_w // pw
    groups = [
        TokenGroup((0, 0, 0), (frames, h, w), (frames, h, w)),
        TokenGroup((cfg.ref_time_position, 0, 0), (cfg.ref_time_position + 1, h, w), (1, h, w)),
    ]
    if motion:
        # Frame pack: newest frame at full resolution, then 2 frames at 1/2, then 16 frames at 1/4,
        # each placed just before t=0 and keeping the full-resolution coordinate range.
        start = 0
        for scale, n in zip((1, 2, 4), cfg.zip_frame_buckets):
            start -= n
            groups.append(TokenGroup((start, 0, 0), (start + n // scale, lat_h // (ph * scale), lat_w // (pw * scale)),
                                     (n, h, w)))
    return groups


def axis_frequencies(head_dim: int, theta: float) -> list[torch.Tensor]:
    """Per-axis inverse frequencies (t, h, w), float64, as the official ``rope_params`` splits them."""
    d = head_dim
    sizes = (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))
    return [1.0 / torch.pow(theta, torch.arange(0, n, 2, dtype=torch.float64).div(n)) for n in sizes]


def rope_tables(cfg: DiTConfig, groups: list[TokenGroup], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, head_dim // 2] for the concatenated groups (angles in float64, then cast)."""
    pos = torch.from_numpy(np.concatenate([g.positions() for g in groups])).to(torch.float64)
    if pos.abs().max() >= 1024:
        raise ValueError("RoPE position beyond the official table size 1024; the clip or image is too large")
    angles = torch.cat([pos[:, i:i + 1] * f[None, :] for i, f in enumerate(axis_frequencies(cfg.head_dim, cfg.rope_theta))],
                       dim=1)
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def _table(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[N] positions × [n] frequencies → [N, n, 2] (cos, sin), angles in float64."""
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rope_inputs(cfg: DiTConfig, groups: list[TokenGroup], dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """The RoPE inputs of ``WanS2VDiT.step``: (rope_t [F, n_t, 2], rope_h [gh, n_h, 2], rope_w [gw, n_w, 2],
    rope_extra [E, head_dim/2, 2]).

    The noisy grid is separable (t, h, w positions are 0..F-1, 0..gh-1, 0..gw-1), so it travels as three small
    per-axis tables that the step expands; this keeps every input shape a function of the latent shape and the
    number of extra tokens, which is what dynamic ONNX axes need.
    """
    noisy, extra = groups[0], groups[1:]
    assert noisy.start == (0, 0, 0) and noisy.extent == noisy.grid, "noisy tokens must start at the origin"
    freqs = axis_frequencies(cfg.head_dim, cfg.rope_theta)
    axes = [_table(torch.arange(n), f) for n, f in zip(noisy.grid, freqs)]
    cos, sin = rope_tables(cfg, extra, dtype=torch.float64)
    rope_extra = torch.stack([cos, sin], dim=-1)
    return tuple(t.to(device=device, dtype=dtype) for t in (*axes, rope_extra))


def expand_rope(rope_t: torch.Tensor, rope_h: torch.Tensor, rope_w: torch.Tensor,
                rope_extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis tables + extra-token table → cos, sin [S, head_dim/2] in token order."""
    f, gh, gw = rope_t.shape[0], rope_h.shape[0], rope_w.shape[0]
    noisy = torch.cat([rope_t[:, None, None].expand(f, gh, gw, -1, 2),
                       rope_h[None, :, None].expand(f, gh, gw, -1, 2),
                       rope_w[None, None, :].expand(f, gh, gw, -1, 2)], dim=3)
    table = torch.cat([noisy.reshape(f * gh * gw, -1, 2), rope_extra], dim=0)
    return table[..., 0], table[..., 1]
