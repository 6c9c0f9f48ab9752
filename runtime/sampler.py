"""The official S2V generation loop over a DiT backend: clips, motion history, CFG, solver, VAE.

Inputs are already-encoded conditions (text embeddings, bucketed audio features, reference pixels), so the
loop is checkable against the official one without the text/audio encoders (golden ``e2e``).

Official semantics kept (``wan/speech2video.py``): per-clip noise from ``seed + clip`` drawn in the model
dtype on the model device; the first clip has no motion tokens and is decoded after the reference latent,
dropping 3 frames; later clips decode ``[motion latents ‖ new latents]`` and keep the last ``infer_frames``
frames; the motion history is the last 73 generated pixel frames re-encoded by the VAE; CFG uses the
negative prompt and zeroed audio with one guidance scale. Work that cannot change the output is skipped:
the all(−1) pose video of a request without pose (it is multiplied by 0 upstream), and the initial
all-zero motion encode when the first clip drops its motion tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.errors import InputError
from runtime.models.dit import ClipConditions, WanS2VDiT, timestep_frequencies
from runtime.models.vae import WanVAE
from runtime.scheduler import make_scheduler

ProgressFn = Callable[[int, int, int, int], None]  # (clip, clips, step, steps) after each step
ClipFn = Callable[[torch.Tensor], None]            # one decoded clip [3, n, H, W] float32 on the CPU


def latent_frames(infer_frames: int, motion_frames: int = 73) -> int:
    """Noisy latent frames per clip: the official (infer + 3 + motion) // 4 − motion latents (80 → 20, 48 → 12)."""
    return (infer_frames + 3 + motion_frames) // 4 - (motion_frames + 3) // 4


@dataclass(frozen=True)
class SampleOptions:
    infer_frames: int = 80
    sample_steps: int = 40
    sample_shift: float = 3.0
    guide_scale: float = 4.5
    solver: str = "unipc"
    seed: int = 0
    start_from_ref: bool = False
    motion_frames: int = 73
    drop_first_motion: bool = True
    batch_cfg: bool = True  # cond+uncond as one batch-2 DiT call (same math as two calls)

    def __post_init__(self):
        if self.infer_frames <= 0 or self.infer_frames % 4:
            raise InputError(f"infer_frames={self.infer_frames}: must be a positive multiple of 4 (e.g. 48 or 80)")
        if self.sample_steps <= 0:
            raise InputError(f"sample_steps={self.sample_steps}: must be a positive integer (official default 40)")

    @property
    def lat_motion_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    @property
    def latent_frames(self) -> int:
        """Noisy latent frames per clip (20 for 80 pixel frames)."""
        return latent_frames(self.infer_frames, self.motion_frames)


class S2VSampler:
    def __init__(self, backend, vae: WanVAE, device: torch.device | str = "cpu"):
        self.backend = backend
        self.model: WanS2VDiT = backend.model
        self.vae = vae
        self.device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ----------------------------------------------------------------- VAE helpers (fp32 VAE)
    # Whole-sequence and chunked VAE passes give the same result (tested to 1e-15 in float64); the whole
    # sequence is several times faster for small videos, the chunked one bounds memory for real ones
    # (a 153-frame 704×1024 full-resolution activation alone is ~40 GB).
    FULL_SEQUENCE_BYTES = 256 << 20

    def _small(self, frames: int, height: int, width: int) -> bool:
        return self.vae.cfg.base_dim * frames * height * width * 4 <= self.FULL_SEQUENCE_BYTES

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        video = video.to(self.device, torch.float32)
        small = self._small(*video.shape[2:])
        return self.vae.encode(video) if small else self.vae.encode_chunked(video)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, torch.float32)
        f, h, w = latents.shape[2:]
        small = self._small(1 + 4 * (f - 1), 8 * h, 8 * w)
        return self.vae.decode(latents) if small else self.vae.decode_chunked(latents)

    def _pose_latents(self, pose: torch.Tensor) -> torch.Tensor:
        """One clip of pose pixels [1, 3, F, H, W] → [1, C, F/4, h, w] (first frame prepended, first latent dropped)."""
        pose = pose.to(self.dtype)  # the official casts the pose pixels to the model dtype before encoding
        return self._encode(torch.cat([pose[:, :, :1], pose], dim=2))[:, :, 1:]

    # ----------------------------------------------------------------- the loop
    @torch.no_grad()
    def sample(self, ref_pixels: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor, audio_emb: torch.Tensor,
               num_clip: int, opts: SampleOptions, pose_pixels: torch.Tensor | None = None,
               progress: ProgressFn | None = None, on_clip: ClipFn | None = None) -> torch.Tensor | None:
        """Generate ``num_clip`` clips. ref_pixels [1, 3, 1, H, W] in [−1, 1]; context/context_null [L, text_dim];
        audio_emb [1, layers, C_a, ≥ num_clip·infer_frames]; pose_pixels [1, 3, num_clip·infer_frames, H, W] or None.
        Returns the video [3, N, H, W] float32 in [−1, 1], N = num_clip·infer_frames (− 3 with drop_first_motion).
        With ``on_clip``, each clip's frames go there as soon as they are decoded, none are kept, and None is returned."""
        dev, dt = self.device, self.dtype
        _, _, _, height, width = ref_pixels.shape
        nf, lat_f = opts.infer_frames, opts.latent_frames
        if audio_emb.shape[-1] < num_clip * nf:
            raise InputError(f"audio features cover {audio_emb.shape[-1]} frames, {num_clip} clips need {num_clip * nf}")
        audio_emb = audio_emb.to(dev, dt)  # the official casts wav2vec features to the model dtype
        context = context.to(dev)[None]
        context_null = context_null.to(dev)[None]

        ref_pixels = ref_pixels.to(dev, torch.float32)
        ref_latents = self._encode(ref_pixels)
        # Pixel history of the last motion_frames frames (mid-grey zeros), optionally ending in the reference.
        history = torch.zeros(1, 3, opts.motion_frames, height, width, device=dev, dtype=dt)
        drop_first = opts.drop_first_motion and not opts.start_from_ref
        if opts.start_from_ref:
            history[:, :, -6:] = ref_pixels.to(dt)
        motion_latents = None if drop_first else self._encode(history)

        use_cfg = opts.guide_scale > 1
        out = []
        for r in range(num_clip):
            gen = torch.Generator(device=dev).manual_seed(opts.seed + r)
            noise = torch.randn(16, lat_f, height // 8, width // 8, dtype=dt, device=dev, generator=gen)
            solver = make_scheduler(opts.solver, opts.sample_steps, opts.sample_shift, dev)

            first_without_motion = drop_first and r == 0
            motion = None if first_without_motion else motion_latents
            pose = None if pose_pixels is None else self._pose_latents(pose_pixels[:, :, r * nf:(r + 1) * nf].to(dev))
            audio = audio_emb[..., r * nf:(r + 1) * nf]
            cond = self.model.prepare(context, ref_latents, motion, pose, audio, lat_f, opts.motion_frames)
            if use_cfg:
                uncond = self.model.prepare(context_null, ref_latents, motion, pose, audio * 0, lat_f, opts.motion_frames)
                both = ClipConditions.cat([cond, uncond]) if opts.batch_cfg else None

            latents = noise[None]
            t_freqs = timestep_frequencies(solver.timesteps.cpu(), self.model.cfg.freq_dim).to(dev)
            for i in range(opts.sample_steps):
                t_freq = t_freqs[i:i + 1]
                if not use_cfg:
                    v = self.backend.forward(latents, t_freq, cond)
                elif opts.batch_cfg:
                    vc, vu = self.backend.forward(latents.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both).chunk(2)
                    v = vu + opts.guide_scale * (vc - vu)
                else:
                    vc = self.backend.forward(latents, t_freq, cond)
                    vu = self.backend.forward(latents, t_freq, uncond)
                    v = vu + opts.guide_scale * (vc - vu)
                latents = solver.step(v, latents)
                if progress is not None:
                    progress(r, num_clip, i + 1, opts.sample_steps)

            head = ref_latents if first_without_motion else motion_latents
            # torch.cat promotes the bf16 latents to the fp32 VAE latents, as the official concatenation does
            image = self._decode(torch.cat([head.float(), latents.float()], dim=2))[:, :, -nf:]
            if first_without_motion:
                image = image[:, :, 3:]
            keep = min(opts.motion_frames, image.shape[2])
            history = torch.cat([history[:, :, keep:].float(), image[:, :, -keep:]], dim=2)  # promotes to fp32 as official
            motion_latents = self._encode(history)
            if on_clip is None:
                out.append(image[0].cpu())
            else:
                on_clip(image[0].cpu())
        return torch.cat(out, dim=1) if on_clip is None else None
