"""Driving-audio loading: the official ``librosa.load(sr=16000)`` waveform, bounded decoding, many channels,
and the pose-frame pixel cap (CPU, a few seconds)."""
from __future__ import annotations

import inspect
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import soxr

from runtime.errors import InputError
from runtime.media import audio as A
from runtime.media import load_audio, pose, probe_mp4, read_pose_frames, write_mp4
from tests.conftest import golden_dir
from tests.test_media import encode_audio, indexed_video, tone


def pcm_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    """int16 wav written by the standard library (any channel count and rate, as the header says)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(pcm.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(pcm.T, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# ------------------------------------------------------------------------------------------ parity


def test_golden_audio_load_matches_librosa():
    """What the official librosa.load(path, sr=16000) returned, for 44.1 kHz and 22.05 kHz stereo wavs."""
    from runtime.golden_checks.audio_load import check

    folder = golden_dir()
    manifest = json.loads((folder / "manifest.json").read_text())
    if "audio_load" not in manifest:
        pytest.skip("this golden folder has no audio_load component")
    cases = check(folder, manifest)
    assert len(cases) == len(manifest["audio_load"]["cases"]) >= 2
    for case in cases:
        assert case.passed and case.rel_l2 <= 1e-5, case  # measured 0 (bit-identical)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 24000, 44100, 48000, 96000])
@pytest.mark.parametrize("n", [1001, 44100, 123457])
def test_resampling_is_soxr_hq_with_librosas_length(rate, n):
    x = np.random.default_rng(n + rate).standard_normal(n).astype(np.float32) * 0.1
    y = A._resample_mono(x, rate, 16000)
    want_len = int(math.ceil(n * 16000 / rate))
    assert y.dtype == np.float32 and len(y) == want_len
    ref = soxr.resample(x, rate, 16000, quality="soxr_hq")  # librosa's res_type="soxr_hq" spelling
    k = min(len(ref), want_len)
    assert np.array_equal(y[:k], ref[:k]) and not y[k:].any()  # then zero-padded (librosa.util.fix_length)


def test_in_memory_waveform_is_resampled_like_a_file(tmp_path):
    # the TTS path hands the float waveform over in memory: it must see the same resampler as a file
    pcm = tone(1.2, 24000, 1)
    clip = load_audio(pcm[0], src_rate=24000)
    np.testing.assert_array_equal(clip.samples, A._resample_mono(pcm[0], 24000, 16000))


# ------------------------------------------------------------------------------------------ bounded work


def forbid_decoding(monkeypatch):
    def boom(frame):
        raise AssertionError("a sample was decoded before the duration was checked")

    monkeypatch.setattr(A, "_frame_to_planar", boom)


def test_wav_claiming_1_hz_is_refused_before_decoding(tmp_path, monkeypatch):
    # 25 KB of samples declared at 1 Hz: 12,500 s (3.5 h) of "audio" that would resample to 200 M samples
    path = pcm_wav(tmp_path / "slow.wav", np.random.default_rng(0).uniform(-0.5, 0.5, (1, 12500)), 1)
    assert path.stat().st_size < 26_000
    forbid_decoding(monkeypatch)
    with pytest.raises(InputError) as err:
        load_audio(path)
    msg = str(err.value)
    assert "12500 s" in msg and "600 s limit" in msg and "--max_audio_s 12540" in msg and "max_audio_s=" in msg
    with pytest.raises(InputError, match="--max_audio_s"):
        A.probe_audio(path)


def test_declared_duration_checked_for_compressed_audio(tmp_path, monkeypatch):
    path = encode_audio(tmp_path / "long.flac", tone(12.0, 8000, 1), 8000, "flac", "flac")
    assert abs(A.probe_audio(path, None) - 12.0) < 0.1
    forbid_decoding(monkeypatch)
    with pytest.raises(InputError, match=r"lasts 12 s, longer than the 5 s limit"):
        load_audio(path, max_seconds=5)


def test_decoding_stops_at_the_limit_when_no_duration_is_declared(tmp_path, monkeypatch):
    path = encode_audio(tmp_path / "long.flac", tone(30.0, 8000, 1), 8000, "flac", "flac")
    monkeypatch.setattr(A, "_probe", lambda *a, **k: None)  # a stream that declares nothing (or lies)
    decoded = []
    real = A._frame_to_planar
    monkeypatch.setattr(A, "_frame_to_planar", lambda f: decoded.append(f.samples) or real(f))
    with pytest.raises(InputError, match="lasts more than 5 s, longer than the 5 s limit"):
        load_audio(path, max_seconds=5)
    assert 5 * 8000 < sum(decoded) <= 5 * 8000 + max(decoded)  # stopped right after the limit, not at 30 s


def test_sample_budget_bounds_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "MAX_NATIVE_SAMPLES", 10_000)
    path = pcm_wav(tmp_path / "a.wav", tone(1.0, 16000, 1), 16000)
    forbid_decoding(monkeypatch)
    with pytest.raises(InputError, match="more than 10,000 samples"):
        load_audio(path)


def test_limit_applies_to_arrays_and_can_be_lifted(tmp_path):
    pcm = tone(3.0, 8000, 1)
    with pytest.raises(InputError, match="--max_audio_s 60"):
        load_audio(pcm, src_rate=8000, max_seconds=2)
    assert load_audio(pcm, src_rate=8000, max_seconds=None).duration_s == 3.0
    for bad in (0, -1, float("nan"), float("inf"), "10"):
        with pytest.raises(InputError, match="max_seconds"):
            load_audio(pcm, src_rate=8000, max_seconds=bad)


def test_defaults_agree():
    from runtime.generate import build_parser
    from runtime.pipeline import S2VPipeline

    default = inspect.signature(S2VPipeline.generate).parameters["max_audio_s"].default
    assert default == A.DEFAULT_MAX_AUDIO_S == build_parser().parse_args([]).max_audio_s


def test_cli_long_audio_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from runtime import pipeline
    from runtime.generate import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the audio was checked")

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", no_load)
    path = pcm_wav(tmp_path / "long.wav", tone(3.0, 8000, 1), 8000)
    out = tmp_path / "o.mp4"
    rc = main(["--audio", str(path), "--max_audio_s", "2", "--save_file", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert rc == 2 and len(err) == 1 and "--max_audio_s 60" in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.wav"]
    for bad in ("0", "-3", "nan", "inf"):
        assert main(["--max_audio_s", bad, "--save_file", str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
        assert len(err) == 1 and "--max_audio_s" in err[0], err


def test_library_argument_reaches_the_loader(monkeypatch):
    from runtime import pipeline

    seen = {}

    def fake_load(src, *a, max_seconds=None, **k):
        seen["max_seconds"] = max_seconds
        raise InputError("stop here")

    monkeypatch.setattr("runtime.media.load_audio", fake_load)
    pipe = object.__new__(pipeline.S2VPipeline)
    pipe.name, pipe.parallel = "tiny", None
    with pytest.raises(InputError, match="stop here"):
        pipeline.S2VPipeline.generate(pipe, np.zeros((64, 64, 3), np.uint8), "a.wav", max_audio_s=7.5)
    assert seen["max_seconds"] == 7.5


# ------------------------------------------------------------------------------------------ channels


def test_sixteen_channels_are_mixed_not_a_late_key_error(tmp_path):
    pcm = np.random.default_rng(1).uniform(-0.4, 0.4, (16, 16000)).astype(np.float32)
    path = pcm_wav(tmp_path / "c16.wav", pcm, 16000)
    clip = load_audio(path)
    assert clip.channels == 16
    as_read = (np.clip(pcm, -1, 1) * 32767).astype(np.int16) / 32768
    np.testing.assert_allclose(clip.samples, as_read.mean(axis=0), atol=1e-6)  # librosa's plain mean
    frames = np.zeros((16, 64, 64, 3), np.uint8)
    out = write_mp4(tmp_path / "o.mp4", frames, audio=clip)
    info = probe_mp4(out)
    assert info["audio"]["channels"] == 1 and info["video"]["frames"] == 16, info


# ------------------------------------------------------------------------------------------ pose pixel cap


def test_pose_frames_get_the_image_pixel_cap(tmp_path, monkeypatch):
    path = indexed_video(tmp_path / "p.mkv", 16, 4)  # 32x32 frames
    assert read_pose_frames(path, 4).shape == (4, 32, 32, 3)
    monkeypatch.setattr(pose, "MAX_IMAGE_PIXELS", 32 * 32 - 1)
    with pytest.raises(InputError, match=r"32x32 px frames, more than 1,023 pixels"):
        read_pose_frames(path, 4)
