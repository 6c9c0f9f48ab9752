"""Audio features for S2V: wav2vec2 hidden states (50 Hz) -> 30 Hz -> one feature per 16 fps video frame.

Mirrors ``wan/modules/s2v/audio_encoder.py`` (``extract_audio_feat`` with all layers,
``linear_interpolation``, ``get_audio_embed_bucket_fps``) including its float expressions, so the
frame/clip counts come out identical to the official pipeline for every audio length.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import CheckpointError, InputError
from runtime.quoting import shown

log = logging.getLogger(__name__)

WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"
SAMPLE_RATE = 16000
FEATURE_RATE = 50  # wav2vec2 frames per second (total conv stride 320 samples)
VIDEO_RATE = 30  # Wan's intermediate rate (``AudioEncoder.video_rate``)
# XLSR-53 feature encoder (config.json conv_kernel / conv_stride)
CONV_KERNELS = (10, 3, 3, 3, 3, 2, 2)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)


def conv_frames(num_samples: int, kernels=CONV_KERNELS, strides=CONV_STRIDES) -> int:
    """Number of wav2vec2 frames for ``num_samples`` input samples (valid convolutions, no padding)."""
    n = int(num_samples)
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1 if n >= k else 0
    return n


def frames_30(frames_50: int) -> int:
    """Length after 50 -> 30 Hz resampling. The official float expression ``int(T / 50.0 * 30)`` is kept
    on purpose: it differs from exact integer arithmetic for some T (T=205 -> 122, not 123)."""
    return int(frames_50 / float(FEATURE_RATE) * VIDEO_RATE)


class Wav2Vec2Features:
    """Waveform (16 kHz mono) -> all wav2vec2 hidden states ``[num_layers + 1, T50, hidden]``.

    Index 0 is the input of the first transformer layer (feature projection + positional conv),
    1..N-1 the residual stream after each layer, and the last entry the output of the final layer
    after the encoder LayerNorm (``do_stable_layer_norm``), exactly the official
    ``torch.cat(hidden_states)``. The official code runs on the CPU in fp32; on CUDA this class keeps
    fp32 and disables TF32 convolutions for the call so the result stays at fp32 accuracy.
    """

    def __init__(self, model, feature_extractor, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_dir(cls, folder: str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> "Wav2Vec2Features":
        """Load from a local HF-format folder (config.json, preprocessor_config.json, weights)."""
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Model

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: no config.json; the checkpoint must contain {WAV2VEC_DIR}/")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            # Concrete classes never import code from the folder; trust_remote_code=False says so explicitly.
            opts = dict(local_files_only=True, trust_remote_code=False)
            extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), **opts)
            config = Wav2Vec2Config.from_pretrained(str(folder), **opts)
            # The official folder is a CTC fine-tune (keys ``wav2vec2.*`` + ``lm_head.*``); loading the class
            # it was saved as keeps the key handling trivial. Only the base model is kept: the CTC head
            # does not touch the hidden states.
            is_ctc = "Wav2Vec2ForCTC" in (config.architectures or [])
            model_cls = Wav2Vec2ForCTC if is_ctc else Wav2Vec2Model
            model, info = model_cls.from_pretrained(str(folder), output_loading_info=True, **opts)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{folder}: cannot load wav2vec2 ({type(err).__name__}: {first})") from err
        # masked_spec_embed is the SpecAugment mask vector, used only in training
        missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith("masked_spec_embed"))
        if missing:
            raise CheckpointError(f"{folder}: wav2vec2 weights lack {missing[0]!r}; the folder is incomplete")
        if info.get("mismatched_keys"):
            raise CheckpointError(f"{folder}: wav2vec2 weight {sorted(info['mismatched_keys'])[0]!r} has the wrong shape for config.json")
        if info.get("unexpected_keys"):
            log.warning("%s: ignoring unexpected wav2vec2 weights, e.g. %s", shown(folder), sorted(info["unexpected_keys"])[0])
        base = model.wav2vec2 if is_ctc else model
        if base.config.add_adapter:  # would make last_hidden_state differ from the encoder output
            raise CheckpointError(f"{folder}: wav2vec2 configs with add_adapter=true are not supported")
        base = base.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(base, extractor, device, dtype)

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype = torch.float32) -> "Wav2Vec2Features":
        return cls.from_dir(Path(ckpt_dir) / WAV2VEC_DIR, device=device, dtype=dtype)

    def num_frames(self, num_samples: int) -> int:
        cfg = self.model.config
        return conv_frames(num_samples, cfg.conv_kernel, cfg.conv_stride)

    @torch.no_grad()
    def __call__(self, waveform_16k: np.ndarray) -> torch.Tensor:
        wav = np.asarray(waveform_16k)
        if wav.ndim == 2 and 1 in wav.shape:
            wav = wav.reshape(-1)
        if wav.ndim != 1:
            raise InputError(f"audio must be mono (1-D samples), got shape {wav.shape}; mix the channels down first")
        if not np.issubdtype(wav.dtype, np.floating):
            raise InputError(f"audio samples must be floating point in [-1, 1], got {wav.dtype}")
        if not np.isfinite(wav).all():
            raise InputError("audio contains NaN or infinite samples")
        if self.num_frames(wav.shape[0]) < 2:
            raise InputError(f"audio is too short ({wav.shape[0]} samples at 16 kHz); at least ~50 ms is needed")
        # The feature extractor does the processor's normalisation: float32, (x - mean) / sqrt(var + 1e-7).
        values = self.feature_extractor(wav, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
        values = values.to(self.device, self.dtype)
        with _no_tf32(self.device):
            out = self.model(values, output_hidden_states=True)
        states = list(out.hidden_states)
        if len(states) != self.model.config.num_hidden_layers + 1:
            raise RuntimeError(f"wav2vec2 returned {len(states)} hidden states for {self.model.config.num_hidden_layers} layers")
        # transformers 4.x (the official pin, <=4.51.3) reports the last entry after the encoder's final
        # LayerNorm; 5.x reports the last layer's raw output. ``last_hidden_state`` is the normed tensor in
        # both, and it is what the DiT was trained on.
        states[-1] = out.last_hidden_state
        return torch.cat(states)  # [1, T, C] each -> [L, T, C]


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """fp32 convolutions/matmuls really in fp32 for the call: cuDNN convs default to TF32 on Ampere+,
    and the DiT code may have enabled TF32 matmuls globally; the official features are fp32 CPU math."""
    if device.type != "cuda":
        yield
        return
    if hasattr(torch.backends.cudnn, "conv"):  # torch >= 2.9 precision API (do not mix with the legacy one)
        knobs = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
        saved = [k.fp32_precision for k in knobs]
        try:
            for k in knobs:
                k.fp32_precision = "ieee"
            yield
        finally:
            for k, v in zip(knobs, saved):
                k.fp32_precision = v
    else:
        saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        try:
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
            yield
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def interpolate_50_to_30(feats: torch.Tensor) -> torch.Tensor:
    """``[L, T50, C]`` -> ``[L, int(T50 / 50.0 * 30), C]``: linear, ``align_corners=True``, per channel."""
    if feats.dim() != 3:
        raise InputError(f"expected features [layers, frames, channels], got shape {tuple(feats.shape)}")
    n30 = frames_30(feats.shape[1])
    if n30 < 1:
        raise InputError(f"audio is too short: {feats.shape[1]} wav2vec2 frames give no 30 Hz frame")
    out = F.interpolate(feats.transpose(1, 2), size=n30, mode="linear", align_corners=True)
    return out.transpose(1, 2)


def bucket_indices(n30: int, fps: int = 16, batch_frames: int = 80) -> tuple[np.ndarray, int]:
    """Official ``get_audio_embed_bucket_fps`` frame selection: ``(index per video frame, clips)``.

    Video frame i takes 30 Hz feature ``round(i * 30 / fps)`` (numpy round-half-to-even); indices at or
    beyond ``n30`` mean "no audio" (zero features). ``clips = int(n30 / (F * 30 / fps)) + 1``, which adds
    one all-silent clip when the audio is an exact multiple of the clip length.
    """
    scale = VIDEO_RATE / fps
    clips = int(n30 / (batch_frames * scale)) + 1
    bucket_num = clips * batch_frames
    padded_len = math.ceil(clips * batch_frames / fps * VIDEO_RATE)  # n30 plus the zero padding
    times = np.linspace(0.0, bucket_num / fps, bucket_num, endpoint=False)
    idx = np.clip(np.round(times * VIDEO_RATE).astype(int), 0, padded_len - 1)
    return idx, clips


def bucket_audio(feats30: torch.Tensor, fps: int = 16, batch_frames: int = 80, m: int = 0) -> tuple[torch.Tensor, int]:
    """``[L, N30, C]`` -> ``([clips * batch_frames, L, (2m + 1) * C], clips)`` as the official bucketing.

    With the S2V default ``m = 0`` each video frame gets exactly one 30 Hz feature frame; for ``m > 0``
    the window ``idx + k * int(30 / fps)``, ``k = -m..m`` is clamped into ``[0, N30 - 1]`` and flattened
    along channels. Frames past the end of the audio are all-zero.
    """
    if feats30.dim() != 3:
        raise InputError(f"expected features [layers, frames, channels], got shape {tuple(feats30.shape)}")
    num_layers, n30, dim = feats30.shape
    idx, clips = bucket_indices(n30, fps, batch_frames)
    stride = int(VIDEO_RATE / fps)
    offsets = np.arange(-m, m + 1) * stride
    window = np.clip(idx[:, None] + offsets[None, :], 0, n30 - 1)  # [B, 2m+1]
    window_t = torch.from_numpy(window).to(feats30.device)
    picked = feats30[:, window_t]  # [L, B, 2m+1, C]
    picked = picked.permute(1, 0, 2, 3).reshape(len(idx), num_layers, (2 * m + 1) * dim)
    no_audio = torch.from_numpy(idx >= n30).to(feats30.device)
    return picked.masked_fill(no_audio[:, None, None], 0.0), clips


@dataclass(frozen=True)
class ClipCount:
    frames_50: int  # wav2vec2 frames
    frames_30: int  # after resampling
    official: int  # clips the official pipeline generates (int(N30 / (F * 30/16)) + 1)
    minimal: int  # clips that contain at least one frame with audio


def needed_clips(num_samples_16k: int, infer_frames: int = 80, fps: int = 16) -> ClipCount:
    """How many clips an audio of ``num_samples_16k`` samples yields.

    ``official`` is what ``get_audio_embed_bucket_fps`` returns (and hence what the official pipeline
    renders unless ``--num_clip`` caps it). It adds a trailing clip of pure silence whenever N30 is an
    exact multiple of ``infer_frames * 30 / fps`` (e.g. 80080 samples, 5.005 s, give N30 = 150 and 2
    clips at 80 frames, the second fed with zero audio). ``minimal`` drops such clips; the muxer's ``-shortest`` cuts the
    frames past the audio anyway.
    """
    t50 = conv_frames(num_samples_16k)
    n30 = frames_30(t50)
    idx, clips = bucket_indices(n30, fps, infer_frames)
    with_audio = int(np.count_nonzero(idx < n30))  # idx is non-decreasing: a prefix
    minimal = max(1, math.ceil(with_audio / infer_frames))
    return ClipCount(frames_50=t50, frames_30=n30, official=clips, minimal=minimal)


__all__ = [
    "CONV_KERNELS", "CONV_STRIDES", "ClipCount", "FEATURE_RATE", "SAMPLE_RATE", "VIDEO_RATE", "WAV2VEC_DIR",
    "Wav2Vec2Features", "bucket_audio", "bucket_indices", "conv_frames", "frames_30", "interpolate_50_to_30",
    "needed_clips",
]
