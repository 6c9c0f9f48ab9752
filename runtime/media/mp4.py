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
    :class:`Mp4Writer` is the same writer fed a clip at a time.
    """
    frames = _check_frames(frames)
    with Mp4Writer(path, fps=fps, audio=audio, overwrite=overwrite, crf=crf) as writer:
        writer.write(frames)
    return writer.dest


class Mp4Writer:
    """The MP4 of :func:`write_mp4`, encoded as frames arrive, so a long video never sits in memory.

    ``write(frames)`` takes uint8 ``[n, H, W, 3]`` chunks (all of one size) and encodes them at once,
    the audio interleaved up to the frames written so far; ``close()`` ends both streams at
    n_frames / fps (``-shortest``: frames past the audio's end are dropped as they arrive) and renames
    the temp file into place. Used as a context manager, an exception inside the block (including
    KeyboardInterrupt) calls ``abort()``: the temp file is removed and ``path`` is untouched. The
    bytes equal those of :func:`write_mp4` on the concatenated frames.
    """

    def __init__(self, path: PathLike, fps: int = VIDEO_FPS, audio: AudioClip | PathLike | bytes | None = None,
                 overwrite: bool = False, crf: int = 10):
        self.dest = Path(path)
        self.rate_v = Fraction(fps).limit_denominator(1001)
        if self.rate_v <= 0:
            raise InputError(f"fps is {fps}; pass a positive frame rate")
        _check_destination(self.dest, overwrite)
        self.overwrite, self.crf = overwrite, crf
        self.frames_written = 0
        self.max_frames: int | None = None
        self._pcm = self._rate_a = None
        if audio is not None:
            if not isinstance(audio, AudioClip):
                audio = load_audio(audio)  # a path or bytes works too
            self._pcm, self._rate_a = _mux_audio(audio)
            self.max_frames = int(Fraction(self._pcm.shape[1]) * self.rate_v / self._rate_a)
            if self.max_frames == 0:
                raise InputError(f"audio lasts {self._pcm.shape[1] / self._rate_a * 1000:.1f} ms, shorter than "
                                 "one video frame; pass longer audio")
        self._a_pos = 0
        self._out = self._v = self._a = None
        self._state = "open"
        self._tmp = _create_temp(self.dest)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False

    def write(self, frames: np.ndarray) -> None:
        """Encode uint8 ``[n, H, W, 3]`` frames now (those past the audio's end are dropped)."""
        self._guard(self._write, frames)

    def close(self) -> Path:
        """Finish both streams, sync, and rename the temp file to ``path``; returns ``path``."""
        if self._state == "closed":
            return self.dest
        self._guard(self._finish)
        self._state = "closed"
        return self.dest

    def abort(self) -> None:
        """Drop the partial file (idempotent); ``path`` is left as it was."""
        if self._state != "open":
            return
        self._state = "aborted"
        if self._out is not None:
            try:
                self._out.close()
            except Exception:  # the container is being thrown away; its own error is not the story
                pass
        _remove_quietly(self._tmp)

    # -------------------------------------------------------------------------------------
    def _guard(self, fn, *args) -> None:
        if self._state != "open":
            raise OutputError(f"{self.dest}: the MP4 writer is already {self._state}; open a new one")
        try:
            fn(*args)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, (InputError, OutputError)) or not isinstance(exc, Exception):
                raise  # our own errors, KeyboardInterrupt, SystemExit: propagate as they are
            raise _output_error(exc, self.dest) from exc

    def _open(self, height: int, width: int) -> None:
        out = av.open(str(self._tmp), mode="w", format="mp4")
        self._out = out
        v = out.add_stream("libx264", rate=self.rate_v, options={"crf": str(int(self.crf)), "preset": "medium"})
        v.width, v.height, v.pix_fmt = width, height, "yuv420p"
        if self._pcm is not None:
            # Named layout: the aac encoder rejects FFmpeg's unnamed "2 channels" layouts.
            self._a = out.add_stream("aac", rate=self._rate_a, layout="mono" if self._pcm.shape[0] == 1 else "stereo")
            self._a.bit_rate = 192000
        # Every stream is configured above, before the first mux opens the encoders.
        self._v = v

    def _write(self, frames: np.ndarray) -> None:
        frames = _check_frames(frames)
        if self._out is None:
            self._open(frames.shape[1], frames.shape[2])
        elif frames.shape[1:3] != (self._v.height, self._v.width):
            raise InputError(f"video frames are {frames.shape[2]}x{frames.shape[1]} after "
                             f"{self._v.width}x{self._v.height}; every chunk must have the same size")
        if self.max_frames is not None:
            frames = frames[: self.max_frames - self.frames_written]
        for rgb in frames:
            vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            vf.pts = self.frames_written
            _mux(self._out, self._v.encode(vf))
            self.frames_written += 1
            if self._a is not None:  # interleave audio with video by time so the muxer's queue stays small
                self._write_audio(self._audio_end(), final=False)

    def _finish(self) -> None:
        if self.frames_written == 0:
            raise InputError("no video frames to write; generate at least one frame")
        if self._a is not None:
            self._write_audio(self._audio_end(), final=True)
        _mux(self._out, self._v.encode(None))
        if self._a is not None:
            _mux(self._out, self._a.encode(None))
        self._out.close()
        _fsync(self._tmp)
        _publish(self._tmp, self.dest, self.overwrite)

    def _audio_end(self) -> int:
        return int(Fraction(self.frames_written) * self._rate_a / self.rate_v)

    def _write_audio(self, end: int, final: bool) -> None:
        # Whole AAC frames while frames arrive; the last, shorter one only when the video ends.
        chunk = 1024
        while self._a_pos + chunk <= end or (final and self._a_pos < end):
            part = np.ascontiguousarray(self._pcm[:, self._a_pos: min(self._a_pos + chunk, end)])
            af = av.AudioFrame.from_ndarray(part, format="fltp", layout=self._a.layout.name)
            af.sample_rate = self._rate_a
            af.pts = self._a_pos
            _mux(self._out, self._a.encode(af))
            self._a_pos += part.shape[1]


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
