"""MP4 out (H.264 + AAC, atomic) and a probe that reads back what was written.

One PyAV pass replaces the official two ffmpeg runs (imageio encode, then mux with ``-shortest``);
see :func:`write_mp4`.
"""
from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from ..errors import InputError, OutputError
from .atomic import _check_destination, _create_temp, _fsync, _output_error, _publish, _remove_quietly
from .audio import AudioClip, load_audio
from .common import VIDEO_FPS, PathLike, _check_readable_file

log = logging.getLogger(__name__)

# Rates FFmpeg's native AAC encoder accepts; anything else is resampled to 48 kHz for the mux.
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


def write_mp4(path: PathLike, frames: np.ndarray, fps: int = VIDEO_FPS,
              audio: AudioClip | PathLike | bytes | None = None, overwrite: bool = False, crf: int = 10) -> Path:
    """Write H.264 (libx264, yuv420p, crf 10) + AAC 192 kb/s to ``path``, atomically.

    Equivalent to the official imageio encode (quality 8 = crf 10) followed by the ffmpeg mux
    (``-c:a aac -b:a 192k -shortest``): the audio is the clip's original signal at its native
    rate/channels (>2 channels are downmixed to stereo; rates AAC cannot take go to 48 kHz).
    ``-shortest`` is emulated exactly: video stops at floor(audio_s * fps) frames, audio at
    n_frames / fps seconds. Written to a hidden temp file beside ``path`` and renamed; on any
    failure (including KeyboardInterrupt) the temp file is removed and ``path`` is untouched.
    """
    dest = Path(path)
    frames = _check_frames(frames)
    rate_v = Fraction(fps).limit_denominator(1001)
    if rate_v <= 0:
        raise InputError(f"fps is {fps}; pass a positive frame rate")
    _check_destination(dest, overwrite)

    n_video = frames.shape[0]
    pcm = rate_a = None
    if audio is not None:
        if not isinstance(audio, AudioClip):
            audio = load_audio(audio)  # a path or bytes works too
        pcm, rate_a = _mux_audio(audio)
        n_video = min(n_video, int(Fraction(pcm.shape[1]) * rate_v / rate_a))
        if n_video == 0:
            raise InputError(f"audio lasts {pcm.shape[1] / rate_a * 1000:.1f} ms, shorter than one "
                             "video frame; pass longer audio")
        pcm = pcm[:, : int(Fraction(n_video) * rate_a / rate_v)]

    tmp = _create_temp(dest)
    try:
        with av.open(str(tmp), mode="w", format="mp4") as out:
            v = out.add_stream("libx264", rate=rate_v, options={"crf": str(int(crf)), "preset": "medium"})
            v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            a = None
            if pcm is not None:
                # Named layout: the aac encoder rejects FFmpeg's unnamed "2 channels" layouts.
                a = out.add_stream("aac", rate=rate_a, layout="mono" if pcm.shape[0] == 1 else "stereo")
                a.bit_rate = 192000
            # Every stream is configured above, before the first mux opens the encoders.
            _encode_all(out, v, a, frames[:n_video], rate_v, pcm, rate_a)
        _fsync(tmp)
        _publish(tmp, dest, overwrite)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, (InputError, OutputError)) or not isinstance(exc, Exception):
            raise  # our own errors, KeyboardInterrupt, SystemExit: propagate as they are
        raise _output_error(exc, dest) from exc
    return dest


def _encode_all(out, v, a, frames: np.ndarray, rate_v: Fraction, pcm, rate_a) -> None:
    # Interleave audio with video by time so the muxer's queue stays small.
    a_pos = 0
    chunk = 1024  # one AAC frame
    for i, rgb in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        vf.pts = i
        _mux(out, v.encode(vf))
        if a is not None:
            a_end = int(Fraction(i + 1) * rate_a / rate_v)
            while a_pos + chunk <= a_end or (i == len(frames) - 1 and a_pos < pcm.shape[1]):
                part = np.ascontiguousarray(pcm[:, a_pos: a_pos + chunk])
                af = av.AudioFrame.from_ndarray(part, format="fltp", layout=a.layout.name)
                af.sample_rate = rate_a
                af.pts = a_pos
                _mux(out, a.encode(af))
                a_pos += part.shape[1]
    _mux(out, v.encode(None))
    if a is not None:
        _mux(out, a.encode(None))


def _mux(out, packets) -> None:
    """The only place packets reach the file (tests patch it to simulate a full disk)."""
    out.mux(packets)


# FFmpeg's default layout per channel count (av_channel_layout_default), used to downmix >2 channels.
_DEFAULT_LAYOUTS = {3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


def _mux_audio(clip: AudioClip) -> tuple[np.ndarray, int]:
    pcm, rate = clip.native, clip.native_rate
    if pcm.shape[0] > 2 and pcm.shape[0] not in _DEFAULT_LAYOUTS:
        # No FFmpeg layout to downmix from (9+ channels): the plain channel mean, as the features use.
        log.info("audio has %d channels; muxing their mono mix", pcm.shape[0])
        pcm = pcm.mean(axis=0, keepdims=True, dtype=np.float32)
    elif pcm.shape[0] > 2:
        log.info("audio has %d channels; downmixing to stereo for AAC", pcm.shape[0])
        pcm = _swr(pcm, rate, rate, _DEFAULT_LAYOUTS[pcm.shape[0]], "stereo")
    if rate not in _AAC_RATES:
        log.info("audio rate %d Hz is not an AAC rate; resampling to 48000 Hz for the mux", rate)
        layout = "mono" if pcm.shape[0] == 1 else "stereo"
        pcm, rate = _swr(pcm, rate, 48000, layout, layout), 48000
    return np.ascontiguousarray(pcm, dtype=np.float32), rate


def _swr(pcm: np.ndarray, rate: int, target: int, layout_in: str, layout_out: str) -> np.ndarray:
    resampler = av.AudioResampler(format="fltp", layout=layout_out, rate=target)
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.float32),
                                       format="fltp", layout=layout_in)
    frame.sample_rate = rate
    frame.pts = 0
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray() for f in out], axis=1)


def _check_frames(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise InputError(f"video frames are {frames.dtype} {frames.shape}; expected uint8 [T, H, W, 3]")
    t, h, w, _ = frames.shape
    if t == 0:
        raise InputError("no video frames to write; generate at least one frame")
    if h % 2 or w % 2 or h < 2 or w < 2:
        raise InputError(f"frame size {w}x{h} is not even; yuv420p needs even width and height")
    return frames


def probe_mp4(path: PathLike) -> dict:
    """Describe a media file: container, and per stream codec, sizes, rates and exact lengths.

    Returns ``{"format", "duration_s", "streams": [...], "video": first video or None,
    "audio": first audio or None}``. Video ``frames`` counts packets. For audio, ``duration_s``
    is the edit-list length players honour; ``samples`` counts decoded samples, which also include
    the AAC encoder's padding of the last frame (< 1024 samples).
    """
    path = Path(path)
    _check_readable_file(path, "media file")
    try:
        with av.open(str(path), mode="r") as c:
            streams = []
            for s in c.streams:
                cc = s.codec_context
                info: dict[str, Any] = {
                    "index": s.index, "type": s.type, "codec": cc.name,
                    "profile": getattr(cc, "profile", None), "bit_rate": cc.bit_rate,
                    "time_base": s.time_base,
                    "duration_s": float(s.duration * s.time_base) if s.duration and s.time_base else None,
                }
                if s.type == "video":
                    info.update(width=cc.width, height=cc.height, pix_fmt=cc.pix_fmt,
                                fps=float(s.average_rate) if s.average_rate else None)
                elif s.type == "audio":
                    info.update(sample_rate=cc.sample_rate, channels=cc.channels,
                                layout=cc.layout.name)
                streams.append(info)
            result = {"format": c.format.name,
                      "duration_s": c.duration / av.time_base if c.duration else None,
                      "streams": streams}
        # Exact lengths need a pass over the data; separate opens keep each pass simple.
        for info in streams:
            with av.open(str(path), mode="r") as c:
                s = c.streams[info["index"]]
                if info["type"] == "video":
                    info["frames"] = sum(1 for p in c.demux(s) if p.size)
                elif info["type"] == "audio":
                    info["samples"] = sum(f.samples for f in c.decode(s))
                    info["decoded_duration_s"] = info["samples"] / info["sample_rate"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a readable media file ({type(exc).__name__}: {exc}); "
                         "check that it was fully written") from None
    result["video"] = next((s for s in streams if s["type"] == "video"), None)
    result["audio"] = next((s for s in streams if s["type"] == "audio"), None)
    return result
