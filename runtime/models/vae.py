"""Wan2.1 video VAE (16-channel latent, 8x spatial / 4x temporal), as used by Wan2.2-S2V.

Parameter names equal the keys of the official ``Wan2.1_VAE.pth`` (no prefix), so its state dict
loads strictly with no renaming. Every time-mixing convolution is causal, so the official
chunk-by-chunk loop is only a memory device; two equivalent forms are provided:

* full sequence: ``encode`` / ``decode`` run every layer over all frames at once;
* fixed chunks with explicit caches: ``encode_first`` + ``encode_step`` (frame 0, then 4 frames per
  call) and ``decode_first`` + ``decode_step`` (one latent per call). Caches are tuples of tensors
  whose shapes depend only on the resolution, and the step functions have no data-dependent control
  flow, so they trace to static ONNX graphs. ``encode_chunked`` / ``decode_chunked`` loop over them.

Both forms reuse the same layers; a cached layer reads its "previous frames" from a ``_Slots`` object,
which yields zeros (the causal zero padding) on a first call and the carried tensors on a step call.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.checkpoint import load_torch_state_dict, read_safetensors_header
from runtime.errors import CheckpointError, ConfigError

# Official latent statistics (per channel); encode returns (mu - mean) / std.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

CACHE_FRAMES = 2  # every cached conv has temporal kernel 3 -> needs the 2 frames before the chunk
ENCODE_CHUNK = 4  # pixel frames per encode_step call (frame 0 goes alone through encode_first)


@dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    def __post_init__(self) -> None:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError(f"temporal_downsample needs {len(self.dim_mult) - 1} flags, got {self.temporal_downsample}")
        if len(self.latent_mean) != self.z_dim or len(self.latent_std) != self.z_dim:
            raise ConfigError(f"latent_mean/latent_std need {self.z_dim} values each, "
                              f"got {len(self.latent_mean)}/{len(self.latent_std)}")
        if any(s <= 0 for s in self.latent_std):
            raise ConfigError("latent_std values must be positive")

    @classmethod
    def wan21(cls) -> VAEConfig:
        return cls()

    @classmethod
    def tiny(cls) -> VAEConfig:
        """Same topology with 16 base channels: fast tests and the golden reference set."""
        return cls(base_dim=16)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temporal_downsample)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], latent_mean: Sequence[float] | None = None,
                        latent_std: Sequence[float] | None = None) -> VAEConfig:
        """Infer base_dim and z_dim from the weights; raise CheckpointError unless every other key/shape
        matches the official topology (dim_mult (1,2,4,4), 2 res blocks, temporal (F,T,T))."""
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in sd:
                raise CheckpointError(f"not a Wan2.1 VAE state dict: key {key!r} missing")
        base_dim = int(sd["encoder.conv1.weight"].shape[0])
        z_dim = int(sd["conv2.weight"].shape[0])
        kw = {}
        if latent_mean is not None or latent_std is not None or z_dim != len(WAN21_LATENT_MEAN):
            if latent_mean is None or latent_std is None:
                raise CheckpointError(f"z_dim {z_dim} differs from Wan2.1's 16: pass latent_mean and latent_std")
            kw = dict(latent_mean=tuple(float(v) for v in latent_mean), latent_std=tuple(float(v) for v in latent_std))
        try:
            cfg = cls(base_dim=base_dim, z_dim=z_dim, **kw)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
        problem = state_dict_mismatch(expected_shapes(cfg), sd)
        if problem:
            raise CheckpointError(f"does not match a Wan2.1 VAE with base_dim {base_dim}, z_dim {z_dim}: {problem}")
        return cfg


# ----------------------------------------------------------------------------------------------------
# building blocks


class _Slots:
    """Per-call cache traffic, in layer traversal order.

    ``old is None`` means a first call: every layer sees zeros as its previous frames, which is exactly
    the causal zero padding. Otherwise ``old`` holds the tensors returned by the previous call.
    """

    def __init__(self, old: Sequence[torch.Tensor] | None, consume: bool = False):
        self.first = old is None
        # consume: ``old`` is the caller's list, and each tensor is dropped from it once read, so a step holds one
        # layer's old cache at a time instead of all of them beside the new ones (WanVAE.low_memory).
        self._old = None if old is None else (old if consume else list(old))
        self._consume = consume
        self._i = 0
        self.new: list[torch.Tensor] = []

    def take(self, x: torch.Tensor, frames: int = CACHE_FRAMES) -> torch.Tensor:
        if self._old is None:
            b, c, _, h, w = x.shape
            return x.new_zeros(b, c, frames, h, w)
        if self._i >= len(self._old):
            raise ValueError(f"too few cache tensors: got {len(self._old)}")
        prev = self._old[self._i]
        if self._consume:
            self._old[self._i] = None
        self._i += 1
        return prev.to(x.dtype)

    def put(self, x: torch.Tensor, frames: int = CACHE_FRAMES) -> None:
        # A copy, not a view: a view of the concatenated input would keep all of it alive.
        self.new.append(x[:, :, -frames:].contiguous())

    def done(self) -> tuple[torch.Tensor, ...]:
        if self._old is not None and self._i != len(self._old):
            raise ValueError(f"expected {self._i} cache tensors, got {len(self._old)}")
        return tuple(self.new)


class RMSNorm(nn.Module):
    """L2-normalise over channels, scale by sqrt(C) and a per-channel gain (no bias)."""

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = math.sqrt(dim)
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Explicit formula (same arithmetic order as the reference) instead of F.normalize, whose
        # export lowering is not guaranteed to be a plain ReduceL2/Max/Div chain.
        norm = torch.linalg.vector_norm(x, ord=2, dim=1, keepdim=True).clamp_min(1e-12)
        return x / norm * self.scale * self.gamma


class CausalConv3d(nn.Conv3d):
    """Conv3d with temporal kernel 3 that sees the 2 previous frames (cache) in front of its input."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 3, padding=(0, 1, 1))

    def forward(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        x = torch.cat([slots.take(x), x], dim=2)
        slots.put(x)
        return super().forward(x)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Index layout of the official Sequential: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout, 6 conv.
        self.residual = nn.Sequential(RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout),
                                      RMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout))
        self.shortcut = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(F.silu(norm1(x)), slots)
        h = conv2(F.silu(norm2(h)), slots)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, slots: _Slots | None = None) -> torch.Tensor:  # no cache: no time mixing
        b, c, t, h, w = x.shape
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        # One frame at a time keeps the [HW, HW] score matrix to a single frame's worth of memory.
        out = torch.cat([self._attend(frames[i:i + 1]) for i in range(b * t)], dim=0)
        return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + x

    def _attend(self, f: torch.Tensor) -> torch.Tensor:
        n, c, h, w = f.shape
        qkv = self.to_qkv(self.norm(f)).view(n, 3, c, h * w)
        q, k, v = qkv[:, 0].transpose(1, 2), qkv[:, 1], qkv[:, 2].transpose(1, 2)  # [n,HW,C], [n,C,HW], [n,HW,C]
        attn = torch.softmax(torch.matmul(q, k) * (1.0 / math.sqrt(c)), dim=-1)
        o = torch.matmul(attn, v).transpose(1, 2).reshape(n, c, h, w)
        return self.proj(o)


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with a temporal x2 step.

    The spatial conv's weights are stored as the official per-frame Conv2d (``resample.1``); it is
    applied to the 5-D tensor as a (1,3,3) Conv3d, which needs no frame folding. ``resample.0`` is the
    weightless pad / upsample step of the official layout.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            # Nearest x2 picks source pixel i//2, identical to the reference's "nearest-exact" at factor 2.
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(1.0, 2.0, 2.0), mode="nearest"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
            self._stride, self._pad = 1, 1
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad3d((0, 1, 0, 1, 0, 0)), nn.Conv2d(dim, dim, 3, stride=2))
            self._stride, self._pad = 2, 0
        else:
            raise ConfigError(f"unknown resample mode {mode!r}")
        if mode == "upsample3d":
            # One input frame -> two output frames: channel halves [0:C] and [C:2C] are frames 2i and 2i+1.
            self.time_conv = nn.Conv3d(dim, dim * 2, (3, 1, 1))
        elif mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.resample[1]
        x = self.resample[0](x)
        return F.conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, self._stride, self._stride),
                        padding=(0, self._pad, self._pad))

    def forward(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, slots)
        x = self._spatial(x)
        if self.mode == "downsample3d":
            x = self._time_down(x, slots)
        return x

    def _time_up(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        head = None
        if slots.first:
            # Frame 0 is not doubled, and later frames see zeros (not frame 0) as their history.
            head, x = x[:, :, :1], x[:, :, 1:]
            if x.shape[2] == 0:
                slots.put(slots.take(head))
                return head
        x = torch.cat([slots.take(x), x], dim=2)
        slots.put(x)
        y = self.time_conv(x)
        b, c2, t, h, w = y.shape
        y = y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)
        return y if head is None else torch.cat([head, y], dim=2)

    def _time_down(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        # Frame 0 passes through; afterwards stride-2 windows start at frames 0, 2, 4, ... of the whole
        # sequence, so a chunk needs just the one frame before it.
        if slots.first:
            slots.put(x, frames=1)
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        prev = slots.take(x, frames=1)
        slots.put(x, frames=1)
        return self.time_conv(torch.cat([prev, x], dim=2))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0])
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top), nn.SiLU(), CausalConv3d(top, cfg.z_dim * 2))

    def forward(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        x = self.conv1(x, slots)
        for block in (*self.downsamples, *self.middle):
            x = block(x, slots)
        return self.head[2](F.silu(self.head[0](x)), slots)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *reversed(mult))]
        temporal_up = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0])
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # every upsample halves the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i < len(mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3))

    def forward(self, x: torch.Tensor, slots: _Slots) -> torch.Tensor:
        x = self.conv1(x, slots)
        for block in (*self.middle, *self.upsamples):
            x = block(x, slots)
        return self.head[2](F.silu(self.head[0](x)), slots)


# ----------------------------------------------------------------------------------------------------
# the VAE


class WanVAE(nn.Module):
    """Encode pixels in [-1, 1] to normalised latents (mu only) and decode them back.

    Shapes: video [B, 3, T, H, W] <-> latent [B, z_dim, 1 + (T-1)//4, H/8, W/8]. Frames past
    1 + 4*((T-1)//4) are dropped, as in the reference. Runs in the dtype of its parameters (fp32 for
    the real model); decode output is at least fp32 and clamped to [-1, 1].
    """

    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg or VAEConfig.wan21()
        self.chunk_latents = 1       # latents per chunk step (see optimize)
        self.channels_last = False   # 5-D weights and chunk inputs in channels_last_3d (see optimize)
        self.cudnn_benchmark = False  # time cuDNN's algorithms per shape in the chunked passes (see optimize)
        self.low_memory = False  # encode/decode_chunked take the low-memory path (see decode_low_memory)
        self.encoder = Encoder(self.cfg)
        self.conv1 = nn.Conv3d(self.cfg.z_dim * 2, self.cfg.z_dim * 2, 1)  # -> [mu, log-variance]
        self.conv2 = nn.Conv3d(self.cfg.z_dim, self.cfg.z_dim, 1)
        self.decoder = Decoder(self.cfg)

    def optimize(self, chunk_latents: int = 2, compile: bool = True) -> None:
        """The GPU form of the chunked passes: ``chunk_latents`` latents (4 pixel frames each) per chunk step, the
        convolution weights and chunk inputs in ``channels_last_3d`` (the layout cuDNN's tensor-core kernels read,
        so no NCDHW↔NDHWC transposes), and the chunk steps compiled (norm, SiLU and residual passes fused). The
        arithmetic stays float32 with TF32 convolutions, as before; the result moves only at TF32 rounding level
        (the convolution algorithms differ). The chunked form is exact for any chunk length: each causal conv
        carries its last two input frames, however many frames a step holds.

        cuDNN's algorithms for these channels-last shapes are chosen by timing them once per shape and process
        (``cudnn.benchmark``, only inside the chunked passes): its heuristic picks were slower (benchmarks/NOTES.md). Two processes
        may time differently and so pick different TF32 algorithms; within a process a seed repeats bit for bit."""
        if not isinstance(chunk_latents, int) or chunk_latents < 1:
            raise ConfigError(f"chunk_latents={chunk_latents!r}: must be a positive integer")
        self.chunk_latents = chunk_latents
        self.cudnn_benchmark = True
        if not self.channels_last:
            for p in self.parameters():
                if p.dim() == 5:
                    p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
            self.channels_last = True
        if compile and not hasattr(self.decode_step, "_torchdynamo_orig_callable"):
            self.decode_step = torch.compile(self.decode_step, dynamic=False)
            self.encode_step = torch.compile(self.encode_step, dynamic=False)

    # -- helpers --------------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        # Lets callers keep long videos / latents on the host and stream chunks to the VAE's device.
        x = x.to(device=self.conv2.weight.device, dtype=self.dtype)
        return x.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else x

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Built per call from the config (no buffers, so the state dict stays the official one).
        # 1/std is rounded in fp32 first, as the reference stores it.
        mean = torch.tensor(self.cfg.latent_mean, dtype=torch.float32, device=like.device)
        inv_std = 1.0 / torch.tensor(self.cfg.latent_std, dtype=torch.float32, device=like.device)
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        return mean.to(like.dtype).view(shape), inv_std.to(like.dtype).view(shape)

    def _to_latent(self, h: torch.Tensor) -> torch.Tensor:
        mu = self.conv1(h)[:, : self.cfg.z_dim]
        mean, inv_std = self._latent_stats(mu)
        return (mu - mean) * inv_std

    def _from_latent(self, z: torch.Tensor) -> torch.Tensor:
        z = self._prep(z)
        mean, inv_std = self._latent_stats(z)
        return self.conv2(z / inv_std + mean)

    def _to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.promote_types(x.dtype, torch.float32)).clamp(-1.0, 1.0)

    @staticmethod
    def _check_video(video: torch.Tensor) -> int:
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] < 1:
            raise ValueError(f"video must be [B, 3, T>=1, H, W], got {tuple(video.shape)}")
        return 1 + (video.shape[2] - 1) // ENCODE_CHUNK

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.cfg.z_dim or z.shape[2] < 1:
            raise ValueError(f"latent must be [B, {self.cfg.z_dim}, L>=1, h, w], got {tuple(z.shape)}")

    # -- full-sequence form (exact; all activations resident) ---------------------------------------

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        n = self._check_video(video)
        x = self._prep(video[:, :, : 1 + ENCODE_CHUNK * (n - 1)])
        return self._to_latent(self.encoder(x, _Slots(None)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        return self._to_pixels(self.decoder(self._from_latent(z), _Slots(None)))

    # -- fixed-chunk form (traceable; memory bounded by one chunk plus the caches) ------------------

    def encode_first(self, frame0: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """frame0 [B,3,1,H,W] -> (latent [B,z,1,h,w], caches)."""
        slots = _Slots(None)
        z = self._to_latent(self.encoder(self._prep(frame0), slots))
        return z, slots.done()

    def encode_step(self, chunk: torch.Tensor, caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """chunk [B,3,4k,H,W] (the next 4k frames) -> (latents [B,z,k,h,w], caches with unchanged shapes)."""
        slots = _Slots(caches)
        z = self._to_latent(self.encoder(self._prep(chunk), slots))
        return z, slots.done()

    def decode_first(self, z0: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """z0 [B,z,1,h,w] -> (frame [B,3,1,H,W], caches)."""
        slots = _Slots(None)
        x = self.decoder(self._from_latent(z0), slots)
        return self._to_pixels(x), slots.done()

    def decode_step(self, z_t: torch.Tensor, caches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """z_t [B,z,k,h,w] (the next k latents) -> (frames [B,3,4k,H,W], caches with unchanged shapes)."""
        slots = _Slots(caches)
        x = self.decoder(self._from_latent(z_t), slots)
        return self._to_pixels(x), slots.done()

    def _cudnn(self):
        c = torch.backends.cudnn
        return c.flags(enabled=c.enabled, benchmark=self.cudnn_benchmark or c.benchmark, deterministic=c.deterministic,
                       allow_tf32=c.allow_tf32)

    def encode_chunked(self, video: torch.Tensor) -> torch.Tensor:
        """Frame 0, then ``chunk_latents`` × 4 frames per step (the last step may hold fewer); with ``low_memory``,
        ``encode_low_memory``."""
        if self.low_memory:
            return self.encode_low_memory(video)
        with self._cudnn():
            return self._encode_chunked(video)

    def decode_chunked(self, z: torch.Tensor) -> torch.Tensor:
        """Latent 0, then ``chunk_latents`` latents per step (the last step may hold fewer); with ``low_memory``,
        ``decode_low_memory`` (its frames come back on the host)."""
        if self.low_memory:
            return self.decode_low_memory(z)
        with self._cudnn():
            return self._decode_chunked(z)

    # -- low-memory chunked form (runtime.memory_plan picks it where the default's peak does not fit) ---------

    def _low_memory_flags(self):
        # cuDNN's heuristic algorithms: timing them (cudnn.benchmark) tries, and may keep, larger workspaces
        c = torch.backends.cudnn
        return c.flags(enabled=c.enabled, benchmark=False, deterministic=c.deterministic, allow_tf32=c.allow_tf32)

    def _release_cache(self) -> None:
        # Blocks the allocator keeps from the denoise (other sizes than the VAE's) go back to the device first.
        if self.conv2.weight.device.type == "cuda":
            torch.cuda.empty_cache()

    def _decode_consuming(self, z_t: torch.Tensor, caches: list | None) -> tuple[torch.Tensor, list]:
        slots = _Slots(caches, consume=caches is not None)
        x = self.decoder(self._from_latent(z_t), slots)
        return self._to_pixels(x), list(slots.done())

    def _encode_consuming(self, chunk: torch.Tensor, caches: list | None) -> tuple[torch.Tensor, list]:
        slots = _Slots(caches, consume=caches is not None)
        z = self._to_latent(self.encoder(self._prep(chunk), slots))
        return z, list(slots.done())

    def decode_low_memory(self, z: torch.Tensor, out_device: torch.device | str = "cpu") -> torch.Tensor:
        """``decode_chunked`` in less device memory: one latent per step, eager (not the compiled step of
        ``optimize``), cuDNN's heuristic algorithms, each old cache dropped as soon as its layer has read it (the
        default holds every old cache beside the new ones through a step), and each step's frames copied to
        ``out_device`` (the host by default) as they come. The arithmetic is that of ``chunk_latents=1`` without
        ``optimize``: bit for bit the same frames as that default. Against the optimised GPU form (2 latents per
        step, channels-last, timed algorithms) it differs at TF32 rounding, as that form differs from this one."""
        self._check_latent(z)
        self._release_cache()
        per_step = self.cfg.temporal_factor
        with self._low_memory_flags():
            frames, caches = self._decode_consuming(z[:, :, :1], None)
            out = torch.empty(frames.shape[0], 3, 1 + per_step * (z.shape[2] - 1), *frames.shape[3:],
                              dtype=frames.dtype, device=out_device)
            out[:, :, :1] = frames
            del frames
            for i in range(1, z.shape[2]):
                s = 1 + per_step * (i - 1)
                frames, caches = self._decode_consuming(z[:, :, i:i + 1], caches)
                out[:, :, s:s + per_step] = frames
                del frames
        return out

    def encode_low_memory(self, video: torch.Tensor) -> torch.Tensor:
        """``encode_chunked`` in less device memory: 4 frames per step, eager, cuDNN's heuristic algorithms, each
        old cache dropped once read; ``video`` may stay on the host (each step's frames are moved in). Bit for bit
        ``encode_chunked`` with ``chunk_latents=1`` without ``optimize``."""
        n = self._check_video(video)
        self._release_cache()
        with self._low_memory_flags():
            z0, caches = self._encode_consuming(video[:, :, :1], None)
            out = z0.new_empty(z0.shape[0], z0.shape[1], n, *z0.shape[3:])
            out[:, :, :1] = z0
            for i in range(1, n):
                s = 1 + ENCODE_CHUNK * (i - 1)
                out[:, :, i:i + 1], caches = self._encode_consuming(video[:, :, s:s + ENCODE_CHUNK], caches)
        return out

    def _encode_chunked(self, video: torch.Tensor) -> torch.Tensor:
        n = self._check_video(video)
        z0, caches = self.encode_first(video[:, :, :1])
        out = z0.new_empty(z0.shape[0], z0.shape[1], n, *z0.shape[3:])
        out[:, :, :1] = z0
        for i in range(1, n, self.chunk_latents):
            k = min(self.chunk_latents, n - i)
            s = 1 + ENCODE_CHUNK * (i - 1)
            out[:, :, i:i + k], caches = self.encode_step(video[:, :, s:s + ENCODE_CHUNK * k], caches)
        return out

    def _decode_chunked(self, z: torch.Tensor) -> torch.Tensor:
        self._check_latent(z)
        frames, caches = self.decode_first(z[:, :, :1])
        per_step = self.cfg.temporal_factor
        out = frames.new_empty(frames.shape[0], 3, 1 + per_step * (z.shape[2] - 1), *frames.shape[3:])
        out[:, :, :1] = frames
        for i in range(1, z.shape[2], self.chunk_latents):
            k = min(self.chunk_latents, z.shape[2] - i)
            s = 1 + per_step * (i - 1)
            out[:, :, s:s + per_step * k], caches = self.decode_step(z[:, :, i:i + k], caches)
        return out


# ----------------------------------------------------------------------------------------------------
# checkpoint loading


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = WanVAE(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def state_dict_mismatch(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor]) -> str:
    """'' if ``sd`` has exactly the expected keys and shapes, else a one-line description."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {expected[k]}" for k in expected
             if k in sd and tuple(sd[k].shape) != expected[k]]
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    return "; ".join(parts)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights only (never runs code from the file), memory-mapped when the format allows; messages never
    quote the file's bytes (see runtime.checkpoint)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: VAE checkpoint not found; pass the path of Wan2.1_VAE.pth")
    if path.suffix != ".safetensors":
        return load_torch_state_dict(path, "VAE checkpoint")
    read_safetensors_header(path)
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path)))
    except Exception as err:  # truncated / corrupt: one line, no traceback
        raise CheckpointError(f"{path}: cannot read VAE checkpoint ({type(err).__name__}); "
                              "the file is truncated or corrupt, re-download it") from None


def load_vae(path: str | Path, device: torch.device | str | None = None,
             latent_mean: Sequence[float] | None = None, latent_std: Sequence[float] | None = None) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` (or a .safetensors with the same keys) strictly, in fp32 and eval mode.

    Channel widths come from the file; latent statistics default to the official Wan2.1 values.
    """
    path = Path(path)
    sd = _read_state_dict(path)
    try:
        cfg = VAEConfig.from_state_dict(sd, latent_mean=latent_mean, latent_std=latent_std)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    sd = {k: v.float() for k, v in sd.items()}  # the VAE runs in fp32 whatever the file dtype
    with torch.device("meta"):  # no throw-away random init of ~127M parameters
        model = WanVAE(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model.to(device) if device is not None else model
