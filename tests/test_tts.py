"""Tests for runtime.tts (espeak-ng for real; CosyVoice through a stand-in package)."""
from __future__ import annotations

import logging
import shutil
import sys
import types
import wave
from pathlib import Path

import numpy as np
import pytest

from runtime import tts
from runtime.errors import BackendUnavailable, InputError, OutputError
from runtime.media import load_audio
from runtime.tts import CosyVoiceTTS, EspeakTTS, TTSBackend, select_tts, synthesize_to_file


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng not installed (apt-get install espeak-ng)")


def speech_fraction(wav: np.ndarray, rate: int) -> float:
    """Share of 20 ms windows that are clearly not silent."""
    win = rate // 50
    n = len(wav) // win
    rms = np.sqrt((wav[: n * win].reshape(n, win) ** 2).mean(axis=1))
    return float((rms > 0.02).mean())


class SineTTS(TTSBackend):
    name = "sine"

    def __init__(self, seconds=0.5, rate=22050):
        self.seconds, self.rate, self.calls = seconds, rate, []

    def synthesize(self, text, prompt_audio=None, prompt_text=None):
        self.calls.append((text, prompt_audio, prompt_text))
        t = np.arange(int(self.seconds * self.rate)) / self.rate
        return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), self.rate


# ------------------------------------------------------------------------------------------
# espeak-ng


@needs_espeak
def test_espeak_speaks_a_sentence(tmp_path):
    backend = select_tts(prefer="espeak")
    assert isinstance(backend, EspeakTTS)
    out = synthesize_to_file(backend, "Hello there. This sentence is spoken by the offline speech engine.",
                             tmp_path / "tts.wav")
    assert out == tmp_path / "tts.wav"
    clip = load_audio(out)
    assert clip.native_duration_s > 2.0  # ~14 words at 175 wpm
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        rate = w.getframerate()
    assert 0.3 < speech_fraction(clip.native[0], rate) < 1.0  # words and pauses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tts.wav"]


@needs_espeak
def test_espeak_short_text_and_longer_text_scale(tmp_path):
    backend = EspeakTTS()
    short, rate = backend.synthesize("Hi.")
    long_, _ = backend.synthesize("Hi. " + "One two three four five six seven eight nine ten. " * 2)
    assert len(short) / rate > 0.1 and len(long_) > 4 * len(short)


@needs_espeak
def test_espeak_ignores_prompt_with_a_note(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="runtime.tts"):
        wav, rate = EspeakTTS().synthesize("Testing the prompt note.", prompt_audio="x.wav", prompt_text="hi")
    assert len(wav) / rate > 0.5
    assert "ignoring the TTS prompt" in caplog.text


@needs_espeak
def test_espeak_chinese_text_uses_mandarin():
    text = "收到好友从远方寄来的生日礼物。"
    wav, rate = EspeakTTS().synthesize(text)
    assert len(wav) / rate > 0.5 and speech_fraction(wav, rate) > 0.3
    assert np.array_equal(wav, EspeakTTS(voice="cmn").synthesize(text)[0])
    english = EspeakTTS(voice="en-us").synthesize(text)[0]
    assert english.shape != wav.shape or not np.array_equal(english, wav)


@needs_espeak
def test_espeak_leading_dash_is_text_not_option():
    wav, rate = EspeakTTS().synthesize("-v is not an option here")
    assert len(wav) / rate > 0.5


@needs_espeak
def test_espeak_errors():
    with pytest.raises(InputError, match="no voice 'xx-nonexistent'"):
        EspeakTTS(voice="xx-nonexistent").synthesize("hello")
    with pytest.raises(InputError, match="empty"):
        EspeakTTS().synthesize("   ")


def test_espeak_missing_binary(monkeypatch):
    monkeypatch.setattr(tts, "_espeak_binary", lambda: None)
    with pytest.raises(BackendUnavailable, match="apt-get install espeak-ng"):
        EspeakTTS()


# ------------------------------------------------------------------------------------------
# selection


def test_select_tts_nothing_available(monkeypatch, tmp_path):
    monkeypatch.setattr(tts, "_espeak_binary", lambda: None)
    monkeypatch.setattr(tts, "_cosyvoice_importable", lambda repo=None: False)
    with pytest.raises(BackendUnavailable) as info:
        select_tts(cosyvoice_dir=tmp_path)
    msg = str(info.value)
    assert "apt-get install espeak-ng" in msg and "CosyVoice" in msg and "\n" not in msg
    with pytest.raises(BackendUnavailable, match="apt-get install espeak-ng"):
        select_tts(prefer="espeak")
    with pytest.raises(BackendUnavailable, match="not importable"):
        select_tts(prefer="cosyvoice", cosyvoice_dir=tmp_path)
    with pytest.raises(BackendUnavailable, match="no CosyVoice model folder"):
        select_tts(prefer="cosyvoice")
    with pytest.raises(InputError, match="unknown TTS backend"):
        select_tts(prefer="festival")


def test_select_tts_prefers_cosyvoice_when_ready(monkeypatch, tmp_path):
    monkeypatch.setattr(tts, "_espeak_binary", lambda: "/usr/bin/espeak-ng")
    monkeypatch.setattr(tts, "_cosyvoice_importable", lambda repo=None: True)
    assert isinstance(select_tts(cosyvoice_dir=tmp_path), CosyVoiceTTS)
    assert isinstance(select_tts(), EspeakTTS)  # no model folder -> espeak
    assert isinstance(select_tts(prefer="espeak", cosyvoice_dir=tmp_path), EspeakTTS)
    assert isinstance(select_tts(cosyvoice_dir=tmp_path / "missing"), EspeakTTS)


# ------------------------------------------------------------------------------------------
# CosyVoice glue, with a stand-in `cosyvoice` package (the real one needs weights + network)


def install_fake_cosyvoice(monkeypatch, new_api: bool):
    calls = []

    class CosyVoice2:
        sample_rate = 24000

        def __init__(self, model_dir):
            calls.append(("init", model_dir))

        def _chunks(self):
            import torch
            return [{"tts_speech": torch.full((1, 2400), 0.25)}, {"tts_speech": torch.full((1, 1200), -0.25)}]

        if new_api:
            def inference_zero_shot(self, tts_text, prompt_text, prompt_wav, zero_shot_spk_id="", stream=False):
                calls.append(("zero_shot", tts_text, prompt_text, prompt_wav))
                yield from self._chunks()

            def inference_cross_lingual(self, tts_text, prompt_wav, zero_shot_spk_id="", stream=False):
                calls.append(("cross_lingual", tts_text, prompt_wav))
                yield from self._chunks()
        else:
            def inference_zero_shot(self, tts_text, prompt_text, prompt_speech_16k, stream=False):
                calls.append(("zero_shot", tts_text, prompt_text, prompt_speech_16k))
                yield from self._chunks()

            def inference_cross_lingual(self, tts_text, prompt_speech_16k, stream=False):
                calls.append(("cross_lingual", tts_text, prompt_speech_16k))
                yield from self._chunks()

    pkg = types.ModuleType("cosyvoice")
    cli = types.ModuleType("cosyvoice.cli")
    mod = types.ModuleType("cosyvoice.cli.cosyvoice")
    mod.CosyVoice2 = CosyVoice2
    pkg.cli, cli.cosyvoice = cli, mod
    for name, m in [("cosyvoice", pkg), ("cosyvoice.cli", cli), ("cosyvoice.cli.cosyvoice", mod)]:
        monkeypatch.setitem(sys.modules, name, m)
    return calls


def prompt_wav(tmp_path: Path) -> Path:
    path = tmp_path / "prompt.wav"
    synthesize_to_file(SineTTS(seconds=1.0, rate=22050), "x", path)
    return path


@pytest.mark.parametrize("new_api", [False, True])
def test_cosyvoice_modes(monkeypatch, tmp_path, new_api):
    calls = install_fake_cosyvoice(monkeypatch, new_api)
    prompt = prompt_wav(tmp_path)
    backend = CosyVoiceTTS(tmp_path)
    wav, rate = backend.synthesize("target text", prompt_audio=prompt, prompt_text="prompt words")
    assert rate == 24000 and wav.shape == (3600,) and wav[0] == 0.25 and wav[-1] == -0.25
    assert calls[0] == ("init", str(tmp_path))
    assert calls[1][:3] == ("zero_shot", "target text", "prompt words")
    backend.synthesize("other text", prompt_audio=prompt)
    assert calls[2][:2] == ("cross_lingual", "other text")
    assert sum(c[0] == "init" for c in calls) == 1  # model loaded once
    if new_api:
        assert calls[1][3] == str(prompt)
    else:  # the 16 kHz [1, n] tensor the 2024 API expects
        assert tuple(calls[1][3].shape) == (1, 16000)


def test_cosyvoice_needs_prompt_and_model_dir(monkeypatch, tmp_path):
    install_fake_cosyvoice(monkeypatch, new_api=True)
    with pytest.raises(InputError, match="tts_prompt_audio"):
        CosyVoiceTTS(tmp_path).synthesize("hello")
    with pytest.raises(BackendUnavailable, match="not found"):
        CosyVoiceTTS(tmp_path / "missing")


def test_cosyvoice_import_is_lazy(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cosyvoice", None)  # makes `import cosyvoice` fail
    backend = CosyVoiceTTS(tmp_path)  # constructing does not import
    with pytest.raises(BackendUnavailable, match="cannot import CosyVoice"):
        backend.synthesize("hello", prompt_audio=prompt_wav(tmp_path))


# ------------------------------------------------------------------------------------------
# writing


def test_synthesize_to_file_writes_exact_pcm(tmp_path):
    backend = SineTTS(seconds=0.5, rate=22050)
    out = synthesize_to_file(backend, "hi", tmp_path / "tts.wav", prompt_text="p")
    with wave.open(str(out)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 22050, 11025)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    expected, _ = backend.synthesize("hi")
    np.testing.assert_array_equal(pcm, np.round(expected * 32767).astype(np.int16))
    assert backend.calls[0] == ("hi", None, "p")
    clip = load_audio(out)  # usable as --audio
    assert abs(clip.duration_s - 0.5) < 1 / 16


def test_synthesize_to_file_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "tts.wav"
    out.write_bytes(b"old")
    synthesize_to_file(SineTTS(), "hi", out)
    assert out.read_bytes()[:4] == b"RIFF"

    class Broken(TTSBackend):
        def synthesize(self, text, prompt_audio=None, prompt_text=None):
            return np.array([np.nan], np.float32), 16000

    with pytest.raises(InputError, match="no usable audio"):
        synthesize_to_file(Broken(), "hi", out)
    assert out.read_bytes()[:4] == b"RIFF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tts.wav"]


def test_synthesize_to_file_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tts.os, "replace", boom)
    with pytest.raises(OutputError, match="No space left"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "tts.wav")
    assert list(tmp_path.iterdir()) == []


def test_synthesize_to_file_bad_paths(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "nope" / "tts.wav")
    with pytest.raises(InputError, match="prompt audio"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "tts.wav", prompt_audio=tmp_path / "missing.wav")
