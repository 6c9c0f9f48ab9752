"""Media in/out: reference image, driving audio, pose video, final MP4.

Everything decodes and encodes through PyAV (bundled FFmpeg) and Pillow, so no ffmpeg binary,
librosa or decord is needed. Where that differs from the official code it is said below:

* Audio: the official code uses ``librosa.load(sr=16000)`` (channel mean, then soxr_hq resampling).
  We also average channels first, then resample with FFmpeg's swresample (``av.AudioResampler``);
  the two resamplers differ slightly (rel. L2 0.6 % on samples/talk.wav, 1.3 % on sing.MP3), never
  in length (ceil(n * 16000 / rate), as librosa). Native-rate decoding matches librosa to 3e-6.
* Pose frames: decord's frame selection and its RGB conversion (FFmpeg swscale) are reproduced;
  checked bit-identical to decord 0.6.0 on samples/pose.mp4 (yuv420p) and golden/e2e_pose.mkv.
* Output: one PyAV pass replaces the official two ffmpeg runs (imageio encode, then mux with
  ``-shortest``); see :func:`write_mp4`.

Every user-fixable problem raises :class:`InputError` / :class:`OutputError` with a one-line
message naming the problem and the fix.
"""
from __future__ import annotations

import errno
import io
import logging
import os
import secrets
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

import av
import numpy as np
from PIL import Image

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# Smallest accepted image side: the model works on multiples of 64 px; anything under 16 px is
# almost certainly a wrong file (an icon, a 1x1 tracking pixel) rather than a face.
MIN_IMAGE_SIDE = 16
# Largest accepted image (pixels). 160 MP covers 12000x9000 (108 MP) photos while bounding the
# decoded RGB buffer to ~480 MB; Pillow's own bomb guard (2 x 89.5 MP) would refuse at 179 MP.
MAX_IMAGE_PIXELS = 160_000_000

FEATURE_SAMPLE_RATE = 16000
VIDEO_FPS = 16
# Audio shorter than one video frame cannot drive even a single frame.
MIN_AUDIO_SECONDS = 1.0 / VIDEO_FPS

# Rates FFmpeg's native AAC encoder accepts; anything else is resampled to 48 kHz for the mux.
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


# --------------------------------------------------------------------------------------------
# Images


def load_image(src: Any, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Load a reference image as an RGB ``PIL.Image``.

    ``src``: a path, encoded bytes, a PIL image, or a uint8 numpy array (HxW, HxWx1, HxWx3, HxWx4).
    Alpha is dropped (not composited), as the official ``Image.open(p).convert('RGB')`` does;
    EXIF orientation is *not* applied, also as official. 16-bit greyscale is scaled to 8 bits
    (plain ``convert('RGB')`` would clip it to white).

    Memory: the pixel count is checked from the header *before* decoding, so a bomb never
    allocates. Accepted images are decoded at full size (exact, like official); pass
    ``draft=(w, h)`` to let JPEGs decode at a 1/2, 1/4 or 1/8 DCT scale that still covers
    (w, h) -- much less memory for huge photos, pixels differ slightly from a full decode + resize.
    """
    if isinstance(src, Image.Image):
        _check_image_size(src.size, "image")
        return _to_rgb(src, "image")
    if isinstance(src, np.ndarray):
        return _image_from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise InputError("image bytes are empty; pass the contents of a PNG/JPEG/WebP file")
        return _decode_image(io.BytesIO(data), "image bytes", draft)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        _check_readable_file(path, "image")
        with open(path, "rb") as fh:
            return _decode_image(fh, str(path), draft)
    raise InputError(f"unsupported image source of type {type(src).__name__}; "
                     "pass a path, bytes, a PIL image or a uint8 numpy array")


def _decode_image(fh, name: str, draft: tuple[int, int] | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own, documented limit; Pillow's warning band (89-179 MP) is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
            _check_image_size(im.size, name)
            if draft is not None:
                im.draft(None, (int(draft[0]), int(draft[1])))
            im.load()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name} is larger than {MAX_IMAGE_PIXELS:,} pixels; "
                         "downscale it before use") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name} is not a readable image; pass a PNG, JPEG or WebP file") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise many types on corrupt data (OSError, SyntaxError, ...)
        raise InputError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                         "re-export the image as PNG or JPEG") from None
    return _to_rgb(im, name)


def _check_image_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise InputError(f"{name} is {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side; "
                         "use a real photo of the subject")
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {w}x{h} px, more than {MAX_IMAGE_PIXELS:,} pixels; "
                         "downscale it before use")


def _image_from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise InputError(f"image array has dtype {a.dtype}; convert it to uint8 (0-255) first")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"image array has shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    _check_image_size((a.shape[1], a.shape[0]), "image array")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a), mode=mode), "image array")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    try:
        if im.mode.startswith("I;16") or im.mode == "I":
            arr = np.asarray(im, dtype=np.int64)
            if im.mode != "I" or arr.max(initial=0) > 255:
                arr = arr >> 8  # 16-bit samples -> 8 bits
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
        if im.mode == "La":  # premultiplied alpha has no direct path to RGB in Pillow
            im = im.convert("LA")
        if im.mode == "RGB":
            # fromarray() images share the caller's numpy buffer (readonly); detach them.
            return im.copy() if im.readonly else im
        return im.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"{name} has pixel mode {im.mode!r} that cannot be converted to RGB "
                         f"({exc}); re-export it as 8-bit RGB PNG or JPEG") from None


# --------------------------------------------------------------------------------------------
# Audio


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


# --------------------------------------------------------------------------------------------
# Pose video


def read_pose_frames(path: PathLike, num_frames: int, fps: int = VIDEO_FPS) -> np.ndarray:
    """Frames of a pose video as uint8 ``[N, H, W, 3]``, N <= num_frames.

    As official ``read_last_n_frames(..., reverse=True)``: interval = max(1, round(src_fps / fps))
    (Python round, half to even; src_fps is the stream's average frame rate), indices
    0, interval, 2*interval, ... below the frame count, at most ``num_frames``. The caller
    resizes, crops and pads (official pads with -1 frames).
    """
    path = Path(path)
    _check_readable_file(path, "pose video")
    if num_frames <= 0:
        raise InputError(f"num_frames is {num_frames}; ask for at least one pose frame")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream; pass a pose video (mp4/mkv)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            src_fps = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not src_fps:
                log.warning("%s has no frame rate; assuming %s fps (every frame used)", path, fps)
                src_fps = fps
            interval = max(1, round(float(src_fps) / fps))
            for index, frame in enumerate(container.decode(stream)):
                if index % interval:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a readable video ({type(exc).__name__}: {exc}); "
                         "re-encode it as H.264 mp4") from None
    if not frames:
        raise InputError(f"{path} contains no decodable frames; pass a non-empty pose video")
    return np.stack(frames)


# --------------------------------------------------------------------------------------------
# MP4 output


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
    if pcm.shape[0] > 2:
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


def _check_destination(dest: Path, overwrite: bool) -> None:
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it or choose another path")
    if dest.is_dir():
        raise OutputError(f"output path {dest} is a directory; give a file name ending in .mp4")
    if dest.exists() and not overwrite:
        raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; fix its permissions or choose another path")


def _create_temp(dest: Path) -> Path:
    # O_EXCL with 0o666 lets the umask set the final file's permissions, unlike mkstemp's 0o600.
    for _ in range(16):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(exc, dest) from exc
    raise OutputError(f"cannot create a temporary file beside {dest}; clean up stale .part files")


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dest)
        return
    # link() fails if dest appeared meanwhile, so a concurrent writer is never clobbered.
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True") from None
    except OSError:  # filesystem without hard links
        if dest.exists():
            raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True") from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", path, exc)


def _output_error(exc: BaseException, dest: Path) -> OutputError:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"disk full or file too large while writing {dest}; free space or choose another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"no permission to write {dest}; fix the directory permissions or choose another path")
    return OutputError(f"writing {dest} failed ({type(exc).__name__}: {exc}); check the path and free space")


# --------------------------------------------------------------------------------------------
# Probe


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


# --------------------------------------------------------------------------------------------


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{what} path {path} is a directory; pass a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file {path} is not readable; fix its permissions")
    if path.stat().st_size == 0:
        raise InputError(f"{what} file {path} is empty (0 bytes); pass a complete file")
