"""The official S2V generation loop over a DiT backend: clips, motion history, CFG, solver, VAE.

Inputs are already-encoded conditions (text embeddings, bucketed audio features, reference pixels), so the
loop is checkable against the official one without the text/audio encoders (golden ``e2e``).

Official semantics kept (``wan/speech2video.py``): per-clip noise from ``seed + clip`` drawn in the model
dtype on the model device; the first clip has no motion tokens and is decoded after the reference latent,
dropping 3 frames; later clips decode ``[motion latents ‖ new latents]`` and keep the last ``infer_frames``
frames; the motion history is the last 73 generated pixel frames re-encoded by the VAE; CFG uses the
negative prompt and zeroed audio with one guidance scale. Work that cannot change the output is skipped:
the all(−1) pose video of a request without pose (it is multiplied by 0 upstream), the initial all-zero
motion encode when the first clip drops its motion tokens, and the motion re-encode after the last clip.

With ``offload=True`` the DiT is moved to the device before each clip's denoising and back to the CPU
right after it (before the VAE decode), as the official ``offload_model`` does.

Each stage's output is checked once per clip for NaN/Inf or absurd magnitudes (one host sync per check,
never inside the denoising step), so damaged weights fail with the stage's name instead of a black video.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from runtime.checks import (check_guide_scale, check_infer_frames, check_sample_shift, check_sample_steps, check_seed,
                            check_solver)
from runtime.config import RUN
from runtime.errors import InputError, NumericalError
from runtime.models.dit import ClipConditions, WanS2VDiT, timestep_frequencies
from runtime.models.vae import WanVAE
from runtime.scheduler import SolverConfig, make_scheduler

# (clip, clips, step, steps, stage) after each piece of work: stage "denoise" after each of the ``steps``
# denoising steps, then "vae_decode" and (except after the last clip) "vae_encode", each with step = steps = 1.
ProgressFn = Callable[[int, int, int, int, str], None]
ClipFn = Callable[[torch.Tensor], None]  # one decoded clip [3, n, H, W] float32 on the CPU

# Largest plausible magnitude of a latent or a decoded pixel. Real latents are ~N(0, 1) after the VAE's
# per-channel normalisation and pixels lie in [−1, 1] (slightly beyond before clamping); a value 10⁴ times
# larger only comes from damaged weights, config or engines, and would turn into a black or white video.
MAX_MAGNITUDE = 1e4


def latent_frames(infer_frames: int, motion_frames: int = 73) -> int:
    """Noisy latent frames per clip: the official (infer + 3 + motion) // 4 − motion latents (80 → 20, 48 → 12)."""
    return (infer_frames + 3 + motion_frames) // 4 - (motion_frames + 3) // 4


def check_finite(x: torch.Tensor, stage: str, limit: float = MAX_MAGNITUDE) -> None:
    """Refuse NaN/Inf, or magnitudes above ``limit``, after ``stage`` (one reduction and one host sync)."""
    peak = x.detach().abs().amax().item()  # NaN propagates through amax, so one number covers all cases
    if not (math.isfinite(peak) and peak <= limit):
        what = "NaN/Inf values" if not math.isfinite(peak) else f"values up to {peak:.3g}"
        raise NumericalError(f"{stage} produced {what}; the weights, config.json or engine are damaged "
                             "(re-download the checkpoint or rebuild the engines, or compare with --backend torch)")


@dataclass(frozen=True)
class SampleOptions:
    infer_frames: int = RUN.infer_frames
    sample_steps: int = RUN.sample_steps
    sample_shift: float = RUN.sample_shift
    guide_scale: float = RUN.guide_scale
    solver: str = RUN.solver
    seed: int = 0
    start_from_ref: bool = False
    motion_frames: int = 73
    drop_first_motion: bool = True
    batch_cfg: bool = True  # cond+uncond as one batch-2 DiT call (same math as two calls)
    denoising_steps: tuple[int, ...] | None = None  # the euler solver's timesteps (default: evenly spaced)

    def __post_init__(self):
        # Named as S2VPipeline.generate's keyword arguments (the library's way in).
        check_infer_frames(self.infer_frames)
        check_sample_steps(self.sample_steps)
        check_sample_shift(self.sample_shift)
        check_guide_scale(self.guide_scale)
        check_seed(self.seed)
        check_solver(self.solver)
        # checks the euler timesteps against the steps
        SolverConfig(self.solver, self.sample_steps, self.sample_shift, denoising_steps=self.denoising_steps)

    @property
    def lat_motion_frames(self) -> int:
        return (self.motion_frames + 3) // 4

    @property
    def latent_frames(self) -> int:
        """Noisy latent frames per clip (20 for 80 pixel frames)."""
        return latent_frames(self.infer_frames, self.motion_frames)


class S2VSampler:
    def __init__(self, backend, vae: WanVAE, device: torch.device | str = "cpu", offload: bool = False):
        self.backend = backend
        self.model: WanS2VDiT = backend.model
        self.vae = vae
        self.device = torch.device(device)
        self.offload = offload

    def move_dit(self, device: torch.device | str) -> None:
        self.model.to(device)
        if self.device.type == "cuda" and torch.device(device).type == "cpu":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # give the DiT's memory back to the VAE, as the official does

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

    # ----------------------------------------------------------------- one step's velocity
    def _velocity(self, x: torch.Tensor, t_freq: torch.Tensor, opts: SampleOptions, cond: ClipConditions,
                  uncond: ClipConditions | None, both: ClipConditions | None) -> torch.Tensor:
        if uncond is None:
            return self.backend.forward(x, t_freq, cond)
        if both is not None:
            vc, vu = self.backend.forward(x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both).chunk(2)
        else:
            vc = self.backend.forward(x, t_freq, cond)
            vu = self.backend.forward(x, t_freq, uncond)
        return vu + opts.guide_scale * (vc - vu)

    def _cached_velocity(self, plan, i: int, x: torch.Tensor, t_freq: torch.Tensor, opts: SampleOptions,
                         cond: ClipConditions, uncond: ClipConditions | None, both: ClipConditions | None):
        """``_velocity`` through a step cache: every branch (and every rank) skips or computes together; a computed
        step keeps its residuals when the plan says a later step may reuse them."""
        skip = plan.skip(i, x)
        keep = not skip and plan.keep_residual(i)
        backend = self.backend

        def call(xb, tb, c, slot):
            if skip:
                return backend.forward_skip(xb, tb, c, plan.residuals[slot])
            if keep:
                v, residual = backend.forward_residual(xb, tb, c)
                plan.store(slot, residual)
                return v
            return backend.forward(xb, tb, c)

        if uncond is None:
            v = vc = call(x, t_freq, cond, 0)
        else:
            if both is not None:
                vc, vu = call(x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both, 0).chunk(2)
            else:
                vc, vu = call(x, t_freq, cond, 0), call(x, t_freq, uncond, 1)
            v = vu + opts.guide_scale * (vc - vu)
        plan.observe(i, x, vc, skip)  # the cond branch decides (EasyCache)
        return v

    # ----------------------------------------------------------------- the loop
    @torch.no_grad()
    def sample(self, ref_pixels: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor, audio_emb: torch.Tensor,
               num_clip: int, opts: SampleOptions, pose_pixels: torch.Tensor | None = None,
               progress: ProgressFn | None = None, on_clip: ClipFn | None = None, cache=None) -> torch.Tensor | None:
        """Generate ``num_clip`` clips. ref_pixels [1, 3, 1, H, W] in [−1, 1]; context/context_null [L, text_dim];
        audio_emb [1, layers, C_a, ≥ num_clip·infer_frames]; pose_pixels [1, 3, num_clip·infer_frames, H, W] or None.
        Returns the video [3, N, H, W] float32 in [−1, 1], N = num_clip·infer_frames (− 3 with drop_first_motion).
        With ``on_clip``, each clip's frames go there as soon as they are decoded, none are kept, and None is returned.
        ``cache``: a ``runtime.cache.StepCache`` (steps whose block stack is skipped; None: every step computed)."""
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
        check_finite(ref_latents, "VAE encode of the reference image")
        # Pixel history of the last motion_frames frames (mid-grey zeros), optionally ending in the reference.
        history = torch.zeros(1, 3, opts.motion_frames, height, width, device=dev, dtype=dt)
        drop_first = opts.drop_first_motion and not opts.start_from_ref
        if opts.start_from_ref:
            history[:, :, -6:] = ref_pixels.to(dt)
        motion_latents = None if drop_first else self._encode(history)

        def report(r: int, step: int, steps: int, stage: str) -> None:
            if progress is not None:
                progress(r, num_clip, step, steps, stage)

        use_cfg = opts.guide_scale > 1
        out = []
        for r in range(num_clip):
            clip_name = f"clip {r + 1}/{num_clip}"
            gen = torch.Generator(device=dev).manual_seed(opts.seed + r)
            noise = torch.randn(16, lat_f, height // 8, width // 8, dtype=dt, device=dev, generator=gen)
            solver = make_scheduler(opts.solver, opts.sample_steps, opts.sample_shift, dev, opts.denoising_steps)

            first_without_motion = drop_first and r == 0
            motion = None if first_without_motion else motion_latents
            pose = None if pose_pixels is None else self._pose_latents(pose_pixels[:, :, r * nf:(r + 1) * nf].to(dev))
            audio = audio_emb[..., r * nf:(r + 1) * nf]
            if self.offload:
                self.move_dit(dev)
            try:
                cond = self.model.prepare(context, ref_latents, motion, pose, audio, lat_f, opts.motion_frames)
                uncond = both = None
                if use_cfg:
                    uncond = self.model.prepare(context_null, ref_latents, motion, pose, audio * 0, lat_f, opts.motion_frames)
                    both = ClipConditions.cat([cond, uncond]) if opts.batch_cfg else None

                latents = noise[None]
                t_freqs = timestep_frequencies(solver.timesteps.cpu(), self.model.cfg.freq_dim).to(dev)
                plan = None if cache is None else cache.for_clip(r, opts.sample_steps)
                for i in range(opts.sample_steps):
                    t_freq = t_freqs[i:i + 1]
                    if plan is None:
                        v = self._velocity(latents, t_freq, opts, cond, uncond, both)
                    else:
                        v = self._cached_velocity(plan, i, latents, t_freq, opts, cond, uncond, both)
                    latents = solver.step(v, latents)
                    report(r, i + 1, opts.sample_steps, "denoise")
                if plan is not None:
                    plan.finish()
                    cache.done(r, num_clip, plan)
            finally:
                # The conditions (GBs of DiT inputs at 704x1024) and the cache's residuals are not needed past the
                # last step: freed before the VAE decode, whose peak they would otherwise add to.
                cond = uncond = both = plan = None
                if self.offload:
                    self.move_dit("cpu")
            check_finite(latents, f"DiT denoising of {clip_name}")

            head = ref_latents if first_without_motion else motion_latents
            # torch.cat promotes the bf16 latents to the fp32 VAE latents, as the official concatenation does
            image = self._decode(torch.cat([head.float(), latents.float()], dim=2))[:, :, -nf:]
            check_finite(image, f"VAE decode of {clip_name}")
            report(r, 1, 1, "vae_decode")
            if first_without_motion:
                image = image[:, :, 3:]
            if on_clip is None:
                out.append(image[0].cpu())
            else:
                on_clip(image[0].cpu())  # streamed: encoded while the next clip is generated
            if r == num_clip - 1:
                break  # the motion history would only feed a next clip
            keep = min(opts.motion_frames, image.shape[2])
            # promotes to fp32 as official; the low-memory VAE decodes to the host, the history stays on the device
            history = torch.cat([history[:, :, keep:].float(), image[:, :, -keep:].to(history.device)], dim=2)
            motion_latents = self._encode(history)
            check_finite(motion_latents, f"VAE encode of the motion frames after {clip_name}")
            report(r, 1, 1, "vae_encode")
        return torch.cat(out, dim=1) if on_clip is None else None
