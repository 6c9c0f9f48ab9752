"""Driving audio in: decode, downmix, resample to 16 kHz for wav2vec2, keep the original for the mux.

The official code feeds wav2vec2 ``librosa.load(path, sr=16000)``: libsndfile decoding to float32, the
plain channel mean, soxr resampling at quality "HQ" (``soxr_hq``) and the length fixed to
``ceil(n * 16000 / rate)``. Here decoding is PyAV (any container/codec; PCM scaled exactly as
libsndfile), then the same mean, the same ``soxr`` resampler and the same length: the golden
``audio_load`` cases agree to float32 rounding, and MP3 (FFmpeg's decoder instead of mpg123) to ~1e-6.

Work is bounded before and during decoding: the duration the container declares is checked against
``max_seconds`` (default :data:`DEFAULT_MAX_AUDIO_S`) before any sample is decoded, and decoding stops as
soon as the decoded samples pass the limit (for files that declare no or a false duration).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
import soxr

from ..errors import InputError
from .common import VIDEO_FPS, PathLike, _check_readable_file

FEATURE_SAMPLE_RATE = 16000
# Longest driving audio accepted unless the caller raises it: 600 s is 120 clips of 80 frames, many hours
# of generation; anything longer is far more likely a wrong file than a request.
DEFAULT_MAX_AUDIO_S = 600.0
# Samples kept at the source rate (all channels): 2**28 float32 = 1 GiB, e.g. 46 min of 48 kHz stereo.
MAX_NATIVE_SAMPLES = 1 << 28
# soxr quality librosa.load uses by default (res_type="soxr_hq")
SOXR_QUALITY = "HQ"
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
               src_rate: int | None = None, max_seconds: float | None = DEFAULT_MAX_AUDIO_S) -> AudioClip:
    """Decode audio (wav/mp3/m4a/flac/ogg, or the first audio track of a video file).

    ``src``: a path, encoded bytes, an :class:`AudioClip`, or a numpy array with ``src_rate``
    (1-D mono, or 2-D with the shorter axis taken as channels; float in [-1, 1] or int PCM).
    Channels are averaged to mono, then resampled to ``sample_rate`` with soxr "HQ", as
    ``librosa.load(sr=sample_rate)``. Audio longer than ``max_seconds`` (None: no limit) is refused,
    for files before decoding when the container declares its duration.
    """
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds)
                                        and max_seconds > 0):
        raise InputError(f"max_seconds={max_seconds!r}: must be a positive number of seconds (or None for no limit)")
    if isinstance(src, AudioClip):
        _check_length(src.native.shape[1], src.native_rate, src.channels, "audio clip", max_seconds)
        if src.sample_rate == sample_rate:
            return src
        return _make_clip(src.native, src.native_rate, sample_rate, src.source, "audio clip")
    if isinstance(src, np.ndarray):
        if src_rate is None or int(src_rate) <= 0:
            raise InputError("audio array given without its sample rate; pass src_rate=<Hz>")
        planar = _array_to_planar(src)
        _check_length(planar.shape[1], int(src_rate), planar.shape[0], "audio array", max_seconds)
        return _make_clip(planar, int(src_rate), sample_rate, None, "audio array")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise InputError("audio bytes are empty; pass the contents of a wav/mp3/m4a/flac file")
        native, rate = _decode_audio(io.BytesIO(data), "audio bytes", max_seconds)
        return _make_clip(native, rate, sample_rate, None, "audio bytes")
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        _check_readable_file(path, "audio")
        native, rate = _decode_audio(str(path), str(path), max_seconds)
        return _make_clip(native, rate, sample_rate, path, str(path))
    raise InputError(f"unsupported audio source of type {type(src).__name__}; "
                     "pass a path, bytes or a numpy array with src_rate")


def probe_audio(src: PathLike, max_seconds: float | None = DEFAULT_MAX_AUDIO_S) -> float | None:
    """Check an audio file without decoding it: it opens, has an audio stream, and its declared duration
    fits ``max_seconds``. Returns the declared duration in seconds (None when the container has none)."""
    path = Path(src)
    _check_readable_file(path, "audio")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                raise InputError(f"{path} has no audio stream; pass a file that contains sound")
            return _probe(container, container.streams.audio[0], str(path), max_seconds)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not decodable audio ({type(exc).__name__}); pass a wav/mp3/m4a/flac file") from None


def _too_long(name: str, seconds: float, max_seconds: float, at_least: bool = False) -> InputError:
    need = math.ceil(seconds / 60) * 60
    return InputError(f"{name} lasts {'more than ' if at_least else ''}{seconds:.0f} s, longer than the "
                      f"{max_seconds:g} s limit; trim it, or allow it with --max_audio_s {need} "
                      f"(max_audio_s={need} in the library)")


def _too_many_samples(name: str) -> InputError:
    return InputError(f"{name} holds more than {MAX_NATIVE_SAMPLES:,} samples (channels x rate x duration); "
                      "downmix it to stereo at 48 kHz or shorten it")


def _check_length(n: int, rate: int, channels: int, name: str, max_seconds: float | None) -> None:
    if max_seconds is not None and n / rate > max_seconds:
        raise _too_long(name, n / rate, max_seconds)
    if n * channels > MAX_NATIVE_SAMPLES:
        raise _too_many_samples(name)


def _probe(container, stream, name: str, max_seconds: float | None) -> float | None:
    """The duration the container declares, checked against the limits before anything is decoded."""
    rate = stream.codec_context.sample_rate or stream.rate or 0
    if rate <= 0:
        raise InputError(f"{name} declares no sample rate; convert it to a plain wav first")
    channels = max(1, stream.codec_context.channels or 1)
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / av.time_base
    else:
        return None
    if max_seconds is not None and seconds > max_seconds:
        raise _too_long(name, seconds, max_seconds)
    if seconds * rate * channels > MAX_NATIVE_SAMPLES:
        raise _too_many_samples(name)
    return seconds


def _decode_audio(src, name: str, max_seconds: float | None = DEFAULT_MAX_AUDIO_S) -> tuple[np.ndarray, int]:
    """First audio stream -> (float32 [C, n], rate) at the source rate, no resampling; bounded work."""
    try:
        with av.open(src, mode="r") as container:
            if not container.streams.audio:
                raise InputError(f"{name} has no audio stream; pass a file that contains sound")
            stream = container.streams.audio[0]
            _probe(container, stream, name, max_seconds)
            chunks: list[np.ndarray] = []
            rate = channels = None
            decoded = 0
            for frame in container.decode(stream):
                if frame.samples == 0:
                    continue
                arr = _frame_to_planar(frame)
                if rate is None:
                    rate, channels = frame.sample_rate, arr.shape[0]
                    if rate <= 0:
                        break
                elif frame.sample_rate != rate or arr.shape[0] != channels:
                    raise InputError(f"{name} changes sample rate or channel count mid-stream; "
                                     "convert it to a plain wav first")
                decoded += arr.shape[1]
                # The declared duration may be absent or false: stop as soon as the limit is passed.
                if max_seconds is not None and decoded > max_seconds * rate:
                    raise _too_long(name, decoded / rate, max_seconds, at_least=True)
                if decoded * channels > MAX_NATIVE_SAMPLES:
                    raise _too_many_samples(name)
                chunks.append(arr)
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # av.FFmpegError and friends on garbage input
        raise InputError(f"{name} is not decodable audio ({type(exc).__name__}); "
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
    """librosa.resample(res_type="soxr_hq", fix=True): soxr "HQ" on float32, then zero-padded or cut
    to ceil(n * target / rate) samples."""
    if rate == target:
        return np.array(x, dtype=np.float32)
    y = soxr.resample(np.ascontiguousarray(x, dtype=np.float32), rate, target, quality=SOXR_QUALITY)
    n = int(math.ceil(len(x) * float(target) / rate))  # librosa's float expression
    if len(y) < n:
        y = np.pad(y, (0, n - len(y)))
    return np.ascontiguousarray(y[:n], dtype=np.float32)
