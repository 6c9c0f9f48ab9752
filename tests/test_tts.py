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


def test_espeak_refuses_a_voice_prompt():
    # espeak-ng cannot clone a voice: speaking in another voice than asked for would be a silent substitution.
    backend = EspeakTTS(binary="/nonexistent/espeak-ng")
    for kwargs in (dict(prompt_audio="x.wav"), dict(prompt_text="hi"), dict(prompt_audio="x.wav", prompt_text="hi")):
        with pytest.raises(InputError, match="cannot clone a voice"):
            backend.synthesize("Testing the prompt.", **kwargs)


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


def test_synthesize_to_file_never_clobbers_and_cleans_up(tmp_path):
    out = tmp_path / "tts.wav"
    out.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists"):
        synthesize_to_file(SineTTS(), "hi", out)
    assert out.read_bytes() == b"old"
    # a symlink is an existing name too: it is neither followed nor replaced
    target = tmp_path / "elsewhere.txt"
    target.write_bytes(b"keep")
    link = tmp_path / "link.wav"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="already exists"):
        synthesize_to_file(SineTTS(), "hi", link)
    assert target.read_bytes() == b"keep" and link.is_symlink()
    link.unlink(), target.unlink()

    synthesize_to_file(SineTTS(), "hi", out, overwrite=True)
    assert out.read_bytes()[:4] == b"RIFF"

    class Broken(TTSBackend):
        def synthesize(self, text, prompt_audio=None, prompt_text=None):
            return np.array([np.nan], np.float32), 16000

    with pytest.raises(InputError, match="no usable audio"):
        synthesize_to_file(Broken(), "hi", out, overwrite=True)
    assert out.read_bytes()[:4] == b"RIFF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tts.wav"]


def test_synthesize_to_file_race_with_a_file_that_appears_meanwhile(tmp_path, monkeypatch):
    out = tmp_path / "tts.wav"

    class Racer(SineTTS):
        def synthesize(self, *a, **k):
            out.write_bytes(b"theirs")  # another process creates the name while we synthesize
            return super().synthesize(*a, **k)

    with pytest.raises(OutputError, match="already exists"):
        synthesize_to_file(Racer(), "hi", out)
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tts.wav"]


def test_synthesize_to_file_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tts.os, "link", boom)
    monkeypatch.setattr(tts.os, "replace", boom)
    with pytest.raises(OutputError, match="disk full"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "tts.wav")
    assert list(tmp_path.iterdir()) == []


def test_synthesize_to_file_bad_paths(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "nope" / "tts.wav")
    with pytest.raises(InputError, match="prompt audio"):
        synthesize_to_file(SineTTS(), "hi", tmp_path / "tts.wav", prompt_audio=tmp_path / "missing.wav")


# ------------------------------------------------------------------------------------------
# the official layout (./CosyVoice checkout + ./CosyVoice2-0.5B) and refusing to substitute a voice


FAKE_CHECKOUT_MODULE = """
import numpy as np

class CosyVoice2:
    sample_rate = 24000

    def __init__(self, model_dir):
        self.model_dir = model_dir

    def inference_zero_shot(self, tts_text, prompt_text, prompt_wav, stream=False):
        yield {"tts_speech": np.full((1, 4800), 0.125, np.float32)}

    def inference_cross_lingual(self, tts_text, prompt_wav, stream=False):
        yield {"tts_speech": np.full((1, 2400), -0.125, np.float32)}
"""


@pytest.fixture
def official_layout_dir(tmp_path, monkeypatch):
    """./CosyVoice (a checkout whose package is not installed) + ./CosyVoice2-0.5B in the current folder."""
    pkg = tmp_path / "CosyVoice" / "cosyvoice" / "cli"
    pkg.mkdir(parents=True)
    (tmp_path / "CosyVoice" / "third_party" / "Matcha-TTS").mkdir(parents=True)
    for d in (pkg.parent, pkg):
        (d / "__init__.py").write_text("")
    (pkg / "cosyvoice.py").write_text(FAKE_CHECKOUT_MODULE)
    (tmp_path / "CosyVoice2-0.5B").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m == "cosyvoice" or m.startswith("cosyvoice.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [m for m in sys.modules if m == "cosyvoice" or m.startswith("cosyvoice.")]:
        del sys.modules[name]


def test_official_layout_is_found_and_used(official_layout_dir, caplog):
    model_dir, repo_dir = tts.official_layout()
    assert (model_dir, repo_dir) == (official_layout_dir / "CosyVoice2-0.5B", official_layout_dir / "CosyVoice")
    with caplog.at_level(logging.INFO, logger="runtime.tts"):
        backend = select_tts(cosyvoice_dir=model_dir, cosyvoice_repo=repo_dir)
    assert isinstance(backend, CosyVoiceTTS)
    assert "TTS voice engine: CosyVoice2" in caplog.text
    prompt = prompt_wav(official_layout_dir)
    wav, rate = backend.synthesize("target", prompt_audio=prompt, prompt_text="prompt words")
    assert rate == 24000 and wav.shape == (4800,) and wav[0] == np.float32(0.125)  # from the checkout's module
    assert sys.modules["cosyvoice.cli.cosyvoice"].__file__.startswith(str(official_layout_dir / "CosyVoice"))
    assert str(repo_dir / "third_party" / "Matcha-TTS") in sys.path  # as the official load_tts


def test_voice_prompt_never_falls_back_to_espeak(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(tts, "_espeak_binary", lambda: "/usr/bin/espeak-ng")
    monkeypatch.setattr(tts, "_cosyvoice_importable", lambda repo=None: False)
    model_dir, repo_dir = tts.official_layout(tmp_path)
    with caplog.at_level(logging.INFO, logger="runtime.tts"):
        assert isinstance(select_tts(cosyvoice_dir=model_dir, cosyvoice_repo=repo_dir), EspeakTTS)
    assert "TTS voice engine: espeak-ng" in caplog.text and "CosyVoice not found" in caplog.text
    with pytest.raises(BackendUnavailable) as info:
        select_tts(cosyvoice_dir=model_dir, cosyvoice_repo=repo_dir, voice_prompt=True)
    msg = str(info.value)
    assert "\n" not in msg and "--tts_prompt_audio" in msg and "./CosyVoice" in msg and "not found" in msg
    model_dir.mkdir()  # model present but no importable package / checkout
    with pytest.raises(BackendUnavailable, match="not importable"):
        select_tts(cosyvoice_dir=model_dir, cosyvoice_repo=repo_dir, voice_prompt=True)
    with pytest.raises(InputError, match="cannot clone"):
        select_tts(prefer="espeak", voice_prompt=True)


def run_cli(args, capsys):
    from runtime.generate import main

    rc = main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if not line.startswith("[")]  # drop log lines


@pytest.mark.parametrize("extra,needle", [
    (["--tts_prompt_audio", "PROMPT"], "needs CosyVoice"),
    (["--tts_prompt_audio", "PROMPT", "--tts_prompt_text", "words"], "needs CosyVoice"),
    (["--tts_prompt_text", "words"], "needs --tts_prompt_audio"),
    (["--tts_prompt_audio", "missing.wav"], "file not found"),
])
def test_cli_voice_prompt_without_cosyvoice_is_one_line(tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tts, "_espeak_binary", lambda: "/usr/bin/espeak-ng")  # would be a fallback: must not be
    monkeypatch.setattr(tts, "_cosyvoice_importable", lambda repo=None: False)
    prompt = prompt_wav(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    extra = [str(prompt) if a == "PROMPT" else a for a in extra]
    rc, err = run_cli(["--enable_tts", "--tts_text", "hello", "--save_file", "out.mp4", *extra], capsys)
    assert rc == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_cli_tts_leaves_an_existing_tts_wav_alone(tmp_path, monkeypatch, capsys, caplog):
    # the old CLI wrote <stem>.tts.wav beside the output, replacing and then deleting a user's file of that name
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "out.tts.wav"
    mine.write_bytes(b"my recording")
    backend = SineTTS(seconds=1.0, rate=24000)
    monkeypatch.setattr(tts, "select_tts", lambda **kw: backend)
    rc, err = run_cli(["--enable_tts", "--tts_text", "hello", "--save_file", "out.mp4", "--size", "64*64",
                       "--sample_steps", "1", "--infer_frames", "16", "--base_seed", "1"], capsys)
    assert rc == 0, err
    assert mine.read_bytes() == b"my recording"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "out.tts.wav"]
    assert backend.calls == [("hello", None, None)]
    assert load_audio(tmp_path / "out.mp4").native_rate in (24000, 48000)  # the synthesized speech is muxed
