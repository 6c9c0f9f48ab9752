"""Driving audio in: decode, downmix, resample to 16 kHz for wav2vec2, keep the original for the mux.

The official code uses ``librosa.load(sr=16000)`` (channel mean, then soxr_hq resampling).
We also average channels first, then resample with FFmpeg's swresample (``av.AudioResampler``);
the two resamplers differ slightly (rel. L2 0.6 % on samples/talk.wav, 1.3 % on sing.MP3), never
in length (ceil(n * 16000 / rate), as librosa). Native-rate decoding matches librosa to 3e-6.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..errors import InputError
from .common import VIDEO_FPS, _check_readable_file

FEATURE_SAMPLE_RATE = 16000
# Audio shorter than one video frame cannot drive even a single frame.
MIN_AUDIO_SECONDS = 1.0 / VIDEO_FPS


@dataclass(frozen=True, eq=False)
class AudioClip:
    """Decoded driving audio.

    ``samples``: float32 mono at ``sample_rate`` (16 kHz) for the wav2vec2 features.
    ``native`` / ``native_rate``: float32 ``[channels, n]`` at the source rate, which
    :func:`write_mp4` re-encodes so the MP4 keeps the original sound (as the official mux does).
    ``source``: the file it came from (None for bytes/arrays), for messages.
    """

    samples: np.ndarray
    sample_rate: int
    native: np.ndarray = field(repr=False)
    native_rate: int
    source: Path | None = None

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def native_duration_s(self) -> float:
        return self.native.shape[1] / self.native_rate

    @property
    def channels(self) -> int:
        return int(self.native.shape[0])


def load_audio(src: Any, sample_rate: int = FEATURE_SAMPLE_RATE, *,
               src_rate: int | None = None) -> AudioClip:
    """Decode audio (wav/mp3/m4a/flac/ogg, or the first audio track of a video file).

    ``src``: a path, encoded bytes, an :class:`AudioClip`, or a numpy array with ``src_rate``
    (1-D mono, or 2-D with the shorter axis taken as channels; float in [-1, 1] or int PCM).
    Channels are averaged to mono, then resampled to ``sample_rate`` with swresample.
    """
    if isinstance(src, AudioClip):
        if src.sample_rate == sample_rate:
            return src
        return _make_clip(src.native, src.native_rate, sample_rate, src.source, "audio clip")
    if isinstance(src, np.ndarray):
        if src_rate is None or int(src_rate) <= 0:
            raise InputError("audio array given without its sample rate; pass src_rate=<Hz>")
        return _make_clip(_array_to_planar(src), int(src_rate), sample_rate, None, "audio array")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise InputError("audio bytes are empty; pass the contents of a wav/mp3/m4a/flac file")
        native, rate = _decode_audio(io.BytesIO(data), "audio bytes")
        return _make_clip(native, rate, sample_rate, None, "audio bytes")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        _check_readable_file(path, "audio")
        native, rate = _decode_audio(str(path), str(path))
        return _make_clip(native, rate, sample_rate, path, str(path))
    raise InputError(f"unsupported audio source of type {type(src).__name__}; "
                     "pass a path, bytes or a numpy array with src_rate")


def _decode_audio(src, name: str) -> tuple[np.ndarray, int]:
    """First audio stream -> (float32 [C, n], rate) at the source rate, no resampling."""
    try:
        with av.open(src, mode="r") as container:
            if not container.streams.audio:
                raise InputError(f"{name} has no audio stream; pass a file that contains sound")
            stream = container.streams.audio[0]
            chunks: list[np.ndarray] = []
            rate = channels = None
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                arr = _frame_to_planar(frame)
                if rate is None:
                    rate, channels = frame.sample_rate, arr.shape[0]
                elif frame.sample_rate != rate or arr.shape[0] != channels:
                    raise InputError(f"{name} changes sample rate or channel count mid-stream; "
                                     "convert it to a plain wav first")
                chunks.append(arr)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # av.FFmpegError and friends on garbage input
        raise InputError(f"{name} is not decodable audio ({type(exc).__name__}: {exc}); "
                         "pass a wav/mp3/m4a/flac file") from None
    if not chunks or rate is None or rate <= 0:
        raise InputError(f"{name} contains no audio samples; pass a non-empty recording")
    return np.concatenate(chunks, axis=1), int(rate)


_SAMPLE_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}


def _frame_to_planar(frame: av.AudioFrame) -> np.ndarray:
    """Any sample format -> float32 [C, n] in [-1, 1] (same scaling as libsndfile/librosa)."""
    a = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:  # packed: one row of interleaved samples
        a = a.reshape(-1, channels).T
    base = frame.format.name.rstrip("p")
    if base == "u8":
        return (a.astype(np.float32) - 128.0) / 128.0
    if base in _SAMPLE_SCALE:
        return (a.astype(np.float64) / _SAMPLE_SCALE[base]).astype(np.float32)
    return a.astype(np.float32, copy=False)


def _array_to_planar(a: np.ndarray) -> np.ndarray:
    if a.ndim == 1:
        a = a[None, :]
    elif a.ndim == 2:
        if a.shape[0] > a.shape[1]:  # [n, C] (soundfile layout) -> [C, n]
            a = a.T
    else:
        raise InputError(f"audio array has shape {a.shape}; expected [n] or [channels, n]")
    if a.shape[0] > 8:
        raise InputError(f"audio array has {a.shape[0]} channels; pass mono or stereo audio")
    if a.dtype == np.uint8:
        a = (a.astype(np.float32) - 128.0) / 128.0
    elif a.dtype.kind == "i":
        a = (a.astype(np.float64) / float(2 ** (8 * a.dtype.itemsize - 1))).astype(np.float32)
    elif a.dtype.kind == "f":
        a = a.astype(np.float32)
    else:
        raise InputError(f"audio array has dtype {a.dtype}; pass float32 in [-1, 1] or int16 PCM")
    if not np.isfinite(a).all():
        raise InputError("audio array contains NaN or inf; clean the signal before use")
    return np.ascontiguousarray(a)


def _make_clip(native: np.ndarray, rate: int, sample_rate: int, source: Path | None,
               name: str) -> AudioClip:
    if native.shape[1] == 0:
        raise InputError(f"{name} contains no audio samples; pass a non-empty recording")
    if native.shape[1] / rate < MIN_AUDIO_SECONDS:
        raise InputError(f"{name} lasts {native.shape[1] / rate * 1000:.1f} ms, shorter than one "
                         f"video frame ({MIN_AUDIO_SECONDS * 1000:.1f} ms); pass longer audio")
    if not np.isfinite(native).all():
        raise InputError(f"{name} decodes to NaN or inf samples; re-encode it as a plain wav")
    mono = native.mean(axis=0, dtype=np.float32)  # librosa.to_mono: plain channel mean
    samples = _resample_mono(mono, rate, sample_rate)
    native.setflags(write=False)
    samples.setflags(write=False)
    return AudioClip(samples=samples, sample_rate=sample_rate, native=native,
                     native_rate=rate, source=source)


def _resample_mono(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return np.array(x, dtype=np.float32)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="flt", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    out = resampler.resample(frame) + resampler.resample(None)  # None flushes the filter tail
    y = np.concatenate([f.to_ndarray().reshape(-1) for f in out]) if out else np.zeros(0, np.float32)
    # swresample may return a sample more or less than the exact ratio; pin the length librosa gives.
    n = int(np.ceil(len(x) * target / rate))
    if len(y) < n:
        y = np.pad(y, (0, n - len(y)))
    return np.ascontiguousarray(y[:n], dtype=np.float32)
