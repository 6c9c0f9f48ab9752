"""Tests for runtime.media (image, audio, pose loading; the MP4 writer) (CPU, a few seconds)."""
from __future__ import annotations

import errno
import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.media import mp4
from runtime.errors import InputError, OutputError
from runtime.media import AudioClip, load_audio, load_image, probe_mp4, read_pose_frames, write_mp4
from tests.conftest import golden_dir, png_bytes, wav_bytes

FRAME_S = 1 / 16


# ------------------------------------------------------------------------------------------
# synthetic media helpers


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 440.0) -> np.ndarray:
    """float32 [channels, n]; channel c at freq*(c+1) so channels differ."""
    t = np.arange(int(round(seconds * rate))) / rate
    return np.stack([0.5 * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def encode_audio(path: Path, pcm: np.ndarray, rate: int, codec: str, fmt: str | None = None,
                 video: bool = False) -> Path:
    """Encode float [C, n] with PyAV (optionally next to a small video stream)."""
    layout = "mono" if pcm.shape[0] == 1 else "stereo"
    with av.open(str(path), "w", format=fmt) as out:
        v = None
        if video:
            v = out.add_stream("mpeg4", rate=16)
            v.width, v.height, v.pix_fmt = 64, 64, "yuv420p"
        a = out.add_stream(codec, rate=rate, layout=layout)
        sample_fmt = a.codec_context.codec.audio_formats[0].name
        if v is not None:
            for i in range(int(pcm.shape[1] / rate * 16)):
                f = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 8 * i % 256, np.uint8), format="rgb24")
                f.pts = i
                out.mux(v.encode(f))
            out.mux(v.encode(None))
        resampler = av.AudioResampler(format=sample_fmt, layout=layout, rate=rate)
        src = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm), format="fltp", layout=layout)
        src.sample_rate, src.pts = rate, 0
        for f in resampler.resample(src) + resampler.resample(None):
            out.mux(a.encode(f))
        out.mux(a.encode(None))
    return path


def indexed_video(path: Path, fps, n: int) -> Path:
    """Lossless video whose frame i is filled with value i (so sampled indices are visible)."""
    with av.open(str(path), "w", format="matroska") as out:
        s = out.add_stream("ffv1", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt = 32, 32, "bgr0"
        for i in range(n):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i, np.uint8), format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


def gray_jpeg(w: int, h: int, with_data: bool = True) -> bytes:
    """A valid mid-grey baseline JPEG of any size, built without holding its pixels.

    One-symbol Huffman tables make every 8x8 block two bits (DC diff 0, EOB), so the entropy
    data is just zero bytes: a 12000x9000 image is 422 kB to build, and decodes to grey 128.
    """
    def seg(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    one_symbol = bytes([1] + [0] * 15) + b"\x00"
    head = (b"\xff\xd8" + seg(0xDB, b"\x00" + b"\x01" * 64)
            + seg(0xC0, struct.pack(">BHHB", 8, h, w, 1) + b"\x01\x11\x00")
            + seg(0xC4, b"\x00" + one_symbol + b"\x10" + one_symbol)
            + seg(0xDA, b"\x01\x01\x00\x00\x3f\x00"))
    blocks = ((w + 7) // 8) * ((h + 7) // 8)
    return head + (b"\x00" * ((2 * blocks + 7) // 8) + b"\xff\xd9" if with_data else b"")


def png_header_only(w: int, h: int) -> bytes:
    """PNG signature + IHDR + a stub IDAT: enough for Pillow to report the size, nothing to decode."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 4) + b"IDAT" + b"\x00" * 4 + struct.pack(">I", zlib.crc32(b"IDAT\x00\x00\x00\x00"))
    return b"\x89PNG\r\n\x1a\n" + chunk + idat


def empty_wav(rate: int = 16000) -> bytes:
    """A well-formed PCM wav header with a zero-length data chunk."""
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", 0))


# ------------------------------------------------------------------------------------------
# files like the official examples, made here (the real example media are not part of the project), plus the
# golden folder's own files: talk.wav is the official examples/talk.wav (44.1 kHz stereo 16-bit speech)


def camera_jpeg(path: Path, w: int = 416, h: int = 552) -> Path:
    """A portrait JPEG as a camera writes it (EXIF, an ICC profile, 4:2:0, textured pixels), like i2v_input.JPG."""
    from PIL import ImageCms

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    smooth = np.stack([128 + 90 * np.sin(x / 37 + c) * np.cos(y / 53 - c) for c in range(3)], axis=-1)
    grain = np.random.default_rng(5).normal(0, 12, (h, w, 3))
    im = Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: as stored
    exif[0x0131] = "test camera"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im.save(path, format="JPEG", quality=92, exif=exif, icc_profile=icc, dpi=(72, 72))
    return path


def landscape_png(path: Path, w: int = 1280, h: int = 720) -> Path:
    """A landscape 8-bit RGB PNG of the official pose.png's size (a photo there; a drawn figure here)."""
    from PIL import ImageDraw

    im = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(im)
    joints = [(640, 150), (640, 260), (540, 270), (480, 400), (740, 270), (800, 400), (590, 480), (690, 480),
              (580, 640), (700, 640)]
    for k, (a, b) in enumerate([(0, 1), (1, 2), (2, 3), (1, 4), (4, 5), (1, 6), (1, 7), (6, 8), (7, 9)]):
        draw.line([joints[a], joints[b]], fill=(255 - 25 * k, 40 * k % 256, 28 * k), width=9)
    for x, y in joints:
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=(255, 0, 0))
    im.save(path)
    return path


def song(seconds: float, rate: int = 44100) -> np.ndarray:
    """Stereo notes with an attack/decay envelope (a stand-in for sing.MP3)."""
    t = np.arange(int(round(seconds * rate))) / rate
    notes = 220 * 2 ** (np.floor(t * 3) % 12 / 12)
    env = np.exp(-4 * (t * 3 % 1))
    left = 0.4 * env * np.sin(2 * np.pi * np.cumsum(notes) / rate)
    return np.stack([left, 0.8 * left + 0.05 * np.sin(2 * np.pi * 3 * notes * t)]).astype(np.float32)


def moving_bar_video(path: Path, fps: int, n: int, w: int = 160, h: int = 96) -> Path:
    """An MPEG-4 Part 2 MP4 (the codec of the official pose.mp4) whose frames all differ: a bar moving right."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            frame = np.zeros((h, w, 3), np.uint8)
            frame[:, (3 * i) % (w - 12):(3 * i) % (w - 12) + 12] = (40 + 4 * i % 200, 200, 90)
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts = i
            out.mux(s.encode(f))
        out.mux(s.encode(None))
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    """The example-like files by role, made once per module."""
    d = tmp_path_factory.mktemp("media")
    prompt = d / "prompt_16k_mono.wav"
    prompt.write_bytes(wav_bytes(song(3.5, 16000)[0] * 0.7 + 0.05 * tone(3.5, 16000)[0], 16000))
    return {
        "photo.jpg": camera_jpeg(d / "photo.jpg"),
        "landscape.png": landscape_png(d / "landscape.png"),
        "e2e_ref.png": golden_dir() / "e2e_ref.png",
        "talk.wav": golden_dir() / "talk.wav",
        "song.mp3": encode_audio(d / "song.mp3", song(7.3), 44100, "libmp3lame", "mp3"),
        "prompt_16k_mono.wav": prompt,
        "pose_50fps.mp4": moving_bar_video(d / "pose_50fps.mp4", 50, 50),
    }


# ------------------------------------------------------------------------------------------
# images


@pytest.mark.parametrize("name", ["photo.jpg", "landscape.png", "e2e_ref.png"])
def test_load_image_sample_files(media, name):
    path = media[name]
    im = load_image(path)
    with Image.open(path) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert im.mode == "RGB"
    assert np.array_equal(np.asarray(im), expected)
    # bytes and str paths give the same pixels
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), expected)
    assert np.array_equal(np.asarray(load_image(str(path))), expected)


def test_load_image_arrays():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    gray = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[..., None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(gray[..., None])), np.repeat(gray[..., None], 3, axis=2))
    rgba = rng.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgba)), rgba[..., :3])  # alpha dropped, as official
    # a non-contiguous view works too
    assert np.array_equal(np.asarray(load_image(rgb[:, ::-1])), rgb[:, ::-1])


@pytest.mark.parametrize("mode,fill,expected", [
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
    ("LA", (77, 5), (77, 77, 77)),
    ("L", 200, (200, 200, 200)),
    ("1", 1, (255, 255, 255)),
    ("I;16", 40000, (156, 156, 156)),  # 16-bit scaled to 8 bits, not clipped to white
    ("I", 51400, (200, 200, 200)),
    ("La", (90, 255), (90, 90, 90)),
])
def test_load_image_pil_modes(mode, fill, expected):
    im = load_image(Image.new(mode, (17, 19), fill))
    assert im.mode == "RGB" and im.size == (17, 19)
    assert im.getpixel((3, 4)) == expected


def test_load_image_palette_png_roundtrip():
    pal = Image.new("P", (32, 32))
    pal.putpalette([0, 0, 0, 250, 10, 20] + [0] * (256 * 3 - 6))
    pal.paste(1, (0, 0, 16, 32))
    im = load_image(png_bytes(pal))
    assert im.getpixel((1, 1)) == (250, 10, 20) and im.getpixel((20, 1)) == (0, 0, 0)


def test_load_image_minimum_side_boundary():
    assert load_image(np.zeros((16, 16, 3), np.uint8)).size == (16, 16)
    with pytest.raises(InputError, match="15x100 px"):
        load_image(png_bytes(Image.new("RGB", (15, 100))))
    with pytest.raises(InputError, match="minimum"):
        load_image(np.zeros((8, 8, 3), np.uint8))


def test_load_image_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(InputError, match="empty"):
        load_image(b"")
    with pytest.raises(InputError, match="dtype"):
        load_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(InputError, match="shape"):
        load_image(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(InputError, match="unsupported image source"):
        load_image(12345)


def test_load_image_truncated_jpeg():
    data = gray_jpeg(640, 640)
    assert load_image(data).size == (640, 640)
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(data[:400])


def test_load_image_truncated_sample(media):
    data = media["photo.jpg"].read_bytes()
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_image(data[: len(data) // 3])


def test_load_image_one_line_messages(tmp_path):
    for bad in (tmp_path / "missing.jpg", b"garbage" * 10, np.zeros((4, 4), np.uint8)):
        with pytest.raises(InputError) as info:
            load_image(bad)
        assert "\n" not in str(info.value) and ";" in str(info.value)  # problem; fix


def test_load_image_huge_12000x9000(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(gray_jpeg(12000, 9000))
    im = load_image(path, draft=(1280, 720))  # 1/8 DCT scale still covers the request
    assert im.size == (1500, 1125) and im.mode == "RGB" and im.getpixel((700, 500)) == (128, 128, 128)
    im = load_image(path)  # full size is accepted too (~430 MB while it lives)
    assert im.size == (12000, 9000) and im.getpixel((11999, 8999)) == (128, 128, 128)
    del im


def test_load_image_bomb_refused_before_decoding():
    # Between our limit (160 MP) and Pillow's own error (179 MP): our check must fire.
    with pytest.raises(InputError, match="13000x13000 px, more than"):
        load_image(png_header_only(13000, 13000))
    # Above Pillow's limit its DecompressionBombError is translated too. No pixel data is given,
    # so reaching the decoder would be a "truncated" error instead.
    with pytest.raises(InputError, match="larger than|more than"):
        load_image(gray_jpeg(20000, 10000, with_data=False))
    with pytest.raises(InputError, match="more than"):
        load_image(Image.new("1", (16, 10_000_001)))


# ------------------------------------------------------------------------------------------
# audio


def container_duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return c.duration / av.time_base


@pytest.mark.parametrize("name,seconds", [("talk.wav", 5.0), ("song.mp3", 7.3), ("prompt_16k_mono.wav", 3.5)])
def test_load_audio_samples(media, name, seconds):
    path = media[name]
    clip = load_audio(path)
    assert clip.samples.dtype == np.float32 and clip.samples.ndim == 1 and clip.sample_rate == 16000
    assert abs(clip.duration_s - seconds) < 0.1
    assert abs(clip.duration_s - container_duration(path)) <= FRAME_S
    assert abs(clip.native_duration_s - container_duration(path)) <= FRAME_S
    assert len(clip.samples) == math.ceil(clip.native.shape[1] * 16000 / clip.native_rate)
    assert clip.source == path
    assert 0.01 < float(np.abs(clip.samples).max()) <= 1.0
    assert not clip.samples.flags.writeable  # frozen clip: shared arrays cannot be mutated


def test_load_audio_16k_mono_is_exact(media):
    path = media["prompt_16k_mono.wav"]
    clip = load_audio(path)
    assert clip.native_rate == 16000 and clip.channels == 1
    assert np.array_equal(clip.samples, clip.native[0])
    assert np.array_equal(load_audio(path.read_bytes()).samples, clip.samples)


def test_load_audio_downmix_is_channel_mean():
    left = tone(0.5, 16000, 1)[0]
    pcm = np.stack([left, np.zeros_like(left)])
    clip = load_audio(wav_bytes(pcm, 16000))
    expected = (left * 32767).astype(np.int16) / 32768 / 2  # int16 as written, then (L + R) / 2
    np.testing.assert_allclose(clip.samples, expected, atol=1e-6)


def test_load_audio_resamples_a_tone():
    clip = load_audio(tone(1.0, 44100, 2, freq=300.0), src_rate=44100)
    assert len(clip.samples) == 16000
    spectrum = np.abs(np.fft.rfft(clip.samples[1000:15000]))
    peak_hz = np.argmax(spectrum) * 16000 / 14000
    assert abs(peak_hz - 300) < 3 or abs(peak_hz - 600) < 3  # the two channels' tones survive


def test_load_audio_arrays():
    pcm = tone(0.25, 16000, 2)
    a = load_audio(pcm, src_rate=16000)
    b = load_audio(pcm.T.copy(), src_rate=16000)  # [n, C] layout
    c = load_audio((pcm * 32767).astype(np.int16), src_rate=16000)
    assert np.array_equal(a.samples, b.samples)
    np.testing.assert_allclose(a.samples, pcm.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(c.samples, a.samples, atol=1e-4)
    assert a.source is None and a.channels == 2
    assert load_audio(a) is a
    with pytest.raises(InputError, match="src_rate"):
        load_audio(pcm)
    with pytest.raises(InputError, match="NaN"):
        load_audio(np.full(4000, np.nan, np.float32), src_rate=16000)
    with pytest.raises(InputError, match="dtype"):
        load_audio(np.zeros(4000, np.complex64), src_rate=16000)


@pytest.mark.parametrize("codec,fmt,suffix", [
    ("aac", "ipod", "m4a"), ("flac", "flac", "flac"), ("libopus", "ogg", "ogg"),
    ("libmp3lame", "mp3", "mp3"), ("pcm_s16le", "wav", "wav"),
])
def test_load_audio_formats(tmp_path, codec, fmt, suffix):
    rate = 48000 if codec == "libopus" else 44100
    path = encode_audio(tmp_path / f"a.{suffix}", tone(0.75, rate, 2), rate, codec, fmt)
    clip = load_audio(path)
    assert abs(clip.duration_s - 0.75) <= FRAME_S
    assert clip.native_rate == rate and clip.channels == 2
    assert float(np.abs(clip.samples).max()) > 0.2


def test_load_audio_from_video_file(tmp_path):
    path = encode_audio(tmp_path / "clip.mkv", tone(1.0, 22050, 1), 22050, "pcm_s16le", "matroska", video=True)
    with av.open(str(path)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
    clip = load_audio(path)
    assert abs(clip.duration_s - 1.0) <= FRAME_S and clip.native_rate == 22050


def test_load_audio_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(InputError, match="not decodable"):
        load_audio(b"\x00\x01garbage" * 100)
    with pytest.raises(InputError, match="empty"):
        load_audio(b"")
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(InputError, match="no audio samples"):
        load_audio(empty_wav())
    with pytest.raises(InputError, match="shorter than one video frame"):
        load_audio(wav_bytes(tone(0.05, 16000), 16000))
    with pytest.raises(InputError, match="no audio stream"):
        load_audio(indexed_video(tmp_path / "silent.mkv", 16, 4))


def test_load_audio_one_frame_is_enough():
    clip = load_audio(wav_bytes(tone(1 / 16, 16000), 16000))
    assert len(clip.samples) == 1000


# ------------------------------------------------------------------------------------------
# pose video


@pytest.mark.parametrize("fps,interval", [(16, 1), (24, 2), (25, 2), (30, 2), (40, 2), (50, 3), (56, 4), (8, 1)])
def test_read_pose_interval(tmp_path, fps, interval):
    # round() is Python's half-to-even: 24/16 = 1.5 -> 2, 40/16 = 2.5 -> 2, 56/16 = 3.5 -> 4.
    path = indexed_video(tmp_path / "v.mkv", fps, 60)
    frames = read_pose_frames(path, 1000)
    expected = list(range(0, 60, interval))
    assert [int(f[0, 0, 0]) for f in frames] == expected
    capped = read_pose_frames(path, 5)
    assert [int(f[0, 0, 0]) for f in capped] == expected[:5]


def test_read_pose_sample_mp4(media):
    path = media["pose_50fps.mp4"]  # 50 frames at 50 fps -> interval 3 -> 17 frames
    frames = read_pose_frames(path, 1000)
    assert frames.shape == (17, 96, 160, 3) and frames.dtype == np.uint8
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for _, f in zip(range(7), c.decode(video=0))]
    assert np.array_equal(frames[0], decoded[0]) and np.array_equal(frames[2], decoded[6])
    assert not np.array_equal(frames[1], decoded[1])
    assert read_pose_frames(path, 10).shape[0] == 10


def test_read_pose_golden_mkv():
    path = golden_dir() / "e2e_pose.mkv"  # lossless, 16 fps, 40 frames
    frames = read_pose_frames(path, 64)
    assert frames.shape == (40, 100, 140, 3)
    with av.open(str(path)) as c:
        last = list(c.decode(video=0))[-1].to_ndarray(format="rgb24")
    assert np.array_equal(frames[-1], last)


def test_read_pose_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_pose_frames(tmp_path / "missing.mp4", 10)
    (tmp_path / "a.wav").write_bytes(wav_bytes(tone(0.5, 16000), 16000))
    with pytest.raises(InputError, match="no video stream"):
        read_pose_frames(tmp_path / "a.wav", 10)
    (tmp_path / "bad.mp4").write_bytes(os.urandom(5000))
    with pytest.raises(InputError, match="not a readable video"):
        read_pose_frames(tmp_path / "bad.mp4", 10)
    with pytest.raises(InputError, match="at least one"):
        read_pose_frames(indexed_video(tmp_path / "v.mkv", 16, 3), 0)


def test_iter_pose_frames_one_at_a_time(media, tmp_path):
    """The frames read_pose_frames stacks, handed out one by one; a caller may stop
    early, and the errors come at the first frame asked for."""
    import gc

    from runtime.media import iter_pose_frames

    path = media["pose_50fps.mp4"]
    stacked = read_pose_frames(path, 1000)
    it = iter_pose_frames(path, 1000)
    first = next(it)
    assert first.shape == (96, 160, 3) and first.dtype == np.uint8 and np.array_equal(first, stacked[0])
    rest = list(it)
    assert len(rest) == len(stacked) - 1 and all(np.array_equal(a, b) for a, b in zip(rest, stacked[1:]))
    early = iter_pose_frames(path, 1000)
    next(early)
    early.close()  # the container is closed by the generator's cleanup
    gc.collect()
    with pytest.raises(InputError, match="does not exist"):
        next(iter_pose_frames(tmp_path / "missing.mp4", 10))
    with pytest.raises(InputError, match="at least one"):
        next(iter_pose_frames(path, 0))


# ------------------------------------------------------------------------------------------
# MP4 writer


def ramp_frames(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    """Frame i is a flat grey of level 10 + 12*i (distinct after lossy coding)."""
    return np.stack([np.full((h, w, 3), 10 + 12 * (i % 20), np.uint8) for i in range(n)])


def clip_of(seconds: float, rate: int = 44100, channels: int = 2) -> AudioClip:
    rng = np.random.default_rng(1)
    pcm = (0.3 * rng.standard_normal((channels, int(round(seconds * rate))))).astype(np.float32)
    return load_audio(pcm, src_rate=rate)


def only_file(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_mp4_audio_shorter_than_video(tmp_path):
    out = tmp_path / "out.mp4"
    audio = clip_of(0.75)
    assert write_mp4(out, ramp_frames(16), audio=audio) == out
    info = probe_mp4(out)
    v, a = info["video"], info["audio"]
    assert [s["type"] for s in info["streams"]] == ["video", "audio"]
    assert (v["codec"], v["pix_fmt"], v["fps"], v["width"], v["height"]) == ("h264", "yuv420p", 16.0, 64, 64)
    assert v["frames"] == 12  # floor(0.75 * 16)
    assert (a["codec"], a["sample_rate"], a["channels"], a["layout"]) == ("aac", 44100, 2, "stereo")
    assert abs(a["duration_s"] - 0.75) <= FRAME_S and abs(v["duration_s"] - 0.75) <= FRAME_S
    assert 150_000 < a["bit_rate"] < 240_000
    assert only_file(tmp_path) == ["out.mp4"]


def test_write_mp4_video_shorter_than_audio(tmp_path):
    out = tmp_path / "out.mp4"
    write_mp4(out, ramp_frames(8), audio=clip_of(1.0, 48000, 1))
    info = probe_mp4(out)
    assert info["video"]["frames"] == 8
    a = info["audio"]
    assert (a["sample_rate"], a["channels"], a["layout"]) == (48000, 1, "mono")
    assert abs(a["duration_s"] - 0.5) <= FRAME_S  # trimmed like ffmpeg -shortest
    assert a["samples"] < 0.5 * 48000 + 1024


def test_write_mp4_frames_in_order_and_accurate(tmp_path):
    out = tmp_path / "out.mp4"
    frames = ramp_frames(10)
    write_mp4(out, frames)
    info = probe_mp4(out)
    assert info["audio"] is None and info["video"]["frames"] == 10
    with av.open(str(out)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.abs(decoded.astype(int) - frames).max() <= 3  # crf 10: near-lossless flat frames


def test_write_mp4_profile_and_crf_matter(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    write_mp4(tmp_path / "hq.mp4", frames)
    write_mp4(tmp_path / "lq.mp4", frames, crf=40)
    assert probe_mp4(tmp_path / "hq.mp4")["video"]["profile"] == "High"
    assert (tmp_path / "hq.mp4").stat().st_size > 2 * (tmp_path / "lq.mp4").stat().st_size


@pytest.mark.parametrize("rate,channels,out_rate,out_channels", [(37000, 1, 48000, 1), (16000, 6, 16000, 2)])
def test_write_mp4_unusual_audio(tmp_path, rate, channels, out_rate, out_channels):
    out = tmp_path / "out.mp4"
    write_mp4(out, ramp_frames(8), audio=clip_of(0.5, rate, channels))
    a = probe_mp4(out)["audio"]
    assert (a["sample_rate"], a["channels"]) == (out_rate, out_channels)
    assert abs(a["duration_s"] - 0.5) <= FRAME_S


def test_write_mp4_keeps_sample_audio(tmp_path, media):
    out = tmp_path / "talk.mp4"
    audio = load_audio(media["talk.wav"])
    write_mp4(out, ramp_frames(100, 32, 32), audio=audio)  # 6.25 s of video, 5.02 s of audio
    info = probe_mp4(out)
    assert info["video"]["frames"] == 80
    assert (info["audio"]["sample_rate"], info["audio"]["channels"]) == (44100, 2)
    assert abs(info["audio"]["duration_s"] - 5.0) <= FRAME_S
    with av.open(str(out)) as c:
        got = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    # The edit list removes AAC priming, so the decoded signal lines up with the source.
    n = 80 * 44100 // 16
    err = np.linalg.norm(got[:, :n] - audio.native[:, :n]) / np.linalg.norm(audio.native[:, :n])
    assert err < 0.2
    # a path is accepted as the audio too
    write_mp4(tmp_path / "by_path.mp4", ramp_frames(16, 32, 32), audio=media["talk.wav"])
    assert probe_mp4(tmp_path / "by_path.mp4")["audio"]["channels"] == 2


def test_write_mp4_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")
    muxed = []
    real_mux = mp4._mux
    monkeypatch.setattr(mp4, "_mux", lambda o, p: (muxed.append(1), real_mux(o, p)))
    with pytest.raises(OutputError, match="already exists"):
        write_mp4(out, ramp_frames(2))
    assert muxed == []  # refused up front, before spending time encoding
    assert out.read_bytes() == b"precious" and only_file(tmp_path) == ["out.mp4"]
    write_mp4(out, ramp_frames(2), overwrite=True)
    assert probe_mp4(out)["video"]["frames"] == 2 and only_file(tmp_path) == ["out.mp4"]


def test_write_mp4_bad_destinations(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_mp4(tmp_path / "no" / "such" / "dir.mp4", ramp_frames(2))
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        write_mp4(tmp_path / "d.mp4", ramp_frames(2), overwrite=True)
    assert only_file(tmp_path) == ["d.mp4"]


def test_write_mp4_unwritable_dir(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # root ignores permission bits; sysfs refuses new files even for root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("running as root and no /sys to provide an unwritable directory")
        with pytest.raises(OutputError, match="permission"):
            write_mp4(Path("/sys") / "out.mp4", ramp_frames(2))
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_mp4(ro / "out.mp4", ramp_frames(2))
    finally:
        ro.chmod(0o700)


def test_write_mp4_bad_frames(tmp_path):
    out = tmp_path / "out.mp4"
    for bad, msg in [(np.zeros((2, 64, 64, 3), np.float32), "uint8"), (np.zeros((2, 64, 64), np.uint8), "uint8"),
                     (np.zeros((0, 64, 64, 3), np.uint8), "no video frames"), (np.zeros((2, 63, 64, 3), np.uint8), "even")]:
        with pytest.raises(InputError, match=msg):
            write_mp4(out, bad)
    assert only_file(tmp_path) == []


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "No space left on device"), OutputError),
    (KeyboardInterrupt(), KeyboardInterrupt),
    (av.error.InvalidDataError(errno.EINVAL, "boom"), OutputError),
])
def test_write_mp4_failure_midway_leaves_nothing(tmp_path, monkeypatch, exc, expected):
    calls = {"n": 0}
    real_mux = mp4._mux

    def failing_mux(out, packets):
        calls["n"] += 1
        if calls["n"] == 6:
            raise exc
        real_mux(out, packets)

    monkeypatch.setattr(mp4, "_mux", failing_mux)
    out = tmp_path / "out.mp4"
    with pytest.raises(expected) as info:
        write_mp4(out, ramp_frames(16), audio=clip_of(1.0))
    assert calls["n"] == 6
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        assert "disk full" in str(info.value)
    assert only_file(tmp_path) == []


def test_write_mp4_failure_keeps_existing_file(tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"old")

    def failing_mux(out_, packets):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mp4, "_mux", failing_mux)
    with pytest.raises(OutputError, match="disk full"):
        write_mp4(out, ramp_frames(4), overwrite=True)
    assert out.read_bytes() == b"old" and only_file(tmp_path) == ["out.mp4"]


def test_write_mp4_real_write_error_in_ffmpeg(tmp_path):
    """A real failing write() inside FFmpeg (file size limit -> EFBIG) is cleaned up too."""
    if sys.platform != "linux":
        pytest.skip("uses RLIMIT_FSIZE")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from runtime.media import write_mp4
        from runtime.errors import OutputError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        frames = np.random.default_rng(0).integers(0, 256, (32, 128, 128, 3), dtype=np.uint8)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
        try:
            write_mp4({str(tmp_path / "out.mp4")!r}, frames)
        except OutputError as e:
            print("OutputError:", e)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "OutputError: disk full or file too large" in res.stdout, res.stdout + res.stderr
    assert only_file(tmp_path) == []


def decoded_rgb(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("seconds,rate,channels", [(0.75, 44100, 2), (3.0, 16000, 1), (1.3, 37000, 1)])
def test_mp4_writer_in_chunks_equals_write_mp4(tmp_path, seconds, rate, channels):
    """Fed clip by clip, the writer makes the file write_mp4 makes from all frames at once (-shortest included)."""
    frames, audio = ramp_frames(29), clip_of(seconds, rate, channels)
    whole = write_mp4(tmp_path / "whole.mp4", frames, audio=audio)
    with mp4.Mp4Writer(tmp_path / "chunks.mp4", audio=audio) as w:
        for i in range(0, 29, 8):
            w.write(frames[i:i + 8])
    expected = min(29, int(seconds * 16))
    assert w.frames_written == expected
    a, b = probe_mp4(whole), probe_mp4(tmp_path / "chunks.mp4")
    assert a["video"]["frames"] == b["video"]["frames"] == expected
    assert a["audio"]["samples"] == b["audio"]["samples"]
    assert a["audio"]["duration_s"] == pytest.approx(b["audio"]["duration_s"]) == pytest.approx(expected / 16, abs=FRAME_S)
    assert np.array_equal(decoded_rgb(whole), decoded_rgb(tmp_path / "chunks.mp4"))
    assert only_file(tmp_path) == ["chunks.mp4", "whole.mp4"]


def test_mp4_writer_error_inside_block_leaves_nothing(tmp_path):
    out = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        with mp4.Mp4Writer(out, audio=clip_of(2.0)) as w:
            w.write(ramp_frames(8))
            assert len(only_file(tmp_path)) == 1 and only_file(tmp_path)[0].endswith(".part")
            raise KeyboardInterrupt
    assert only_file(tmp_path) == []
    with pytest.raises(OutputError, match="already aborted"):
        w.write(ramp_frames(8))


def test_mp4_writer_refusals(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        mp4.Mp4Writer(out)  # before any frame is made
    with pytest.raises(InputError, match="same size"):
        with mp4.Mp4Writer(tmp_path / "a.mp4") as w:
            w.write(ramp_frames(2, 64, 64))
            w.write(ramp_frames(2, 32, 64))
    with pytest.raises(InputError, match="no video frames"):
        with mp4.Mp4Writer(tmp_path / "b.mp4"):
            pass
    assert only_file(tmp_path) == ["out.mp4"] and out.read_bytes() == b"precious"


def test_probe_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        probe_mp4(tmp_path / "x.mp4")
    (tmp_path / "x.mp4").write_bytes(b"not a movie" * 50)
    with pytest.raises(InputError, match="not a readable media file"):
        probe_mp4(tmp_path / "x.mp4")


# ------------------------------------------------------------------------------------------
# fuzz: any bytes either decode or raise InputError, nothing else


FUZZ = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _mutate(seed_bytes: bytes, data) -> bytes:
    buf = bytearray(seed_bytes)
    for _ in range(data.draw(st.integers(1, 20))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(buf)))
    return bytes(buf[:cut])


_PNG_SEED = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)))
_JPEG_SEED = gray_jpeg(32, 32)
_WAV_SEED = wav_bytes(tone(0.2, 16000, 2), 16000)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_random_bytes(blob):
    for fn in (load_image, load_audio):
        try:
            fn(blob)
        except InputError:
            pass


@FUZZ
@given(st.data())
def test_fuzz_mutated_files(data):
    for seed, fn in ((_PNG_SEED, load_image), (_JPEG_SEED, load_image), (_WAV_SEED, load_audio)):
        blob = _mutate(seed, data)
        try:
            out = fn(blob)
        except InputError:
            continue
        if fn is load_image:
            assert out.mode == "RGB"
        else:
            assert out.samples.dtype == np.float32 and np.isfinite(out.samples).all()
