"""``--enable_tts``: turn text into the driving audio before generation.

Official Wan2.2 clones CosyVoice from GitHub into ``./CosyVoice`` and downloads CosyVoice2-0.5B from
ModelScope into ``./CosyVoice2-0.5B`` at run time, puts the checkout (and its
``third_party/Matcha-TTS``) on ``sys.path``, then writes ``tts.wav``, which replaces ``--audio`` for
both the features and the final mux. Here the backend is pluggable:

* :class:`CosyVoiceTTS` -- the official path (zero-shot voice cloning when a prompt transcript is
  given, else cross-lingual), used when a CosyVoice model folder exists and ``cosyvoice`` is importable
  (installed, or from a checkout such as the official ``./CosyVoice``). Nothing is downloaded;
  ``cosyvoice`` is imported only when first used.
* :class:`EspeakTTS` -- offline ``espeak-ng`` (robotic, but real speech); it cannot clone a voice, so a
  voice prompt is refused rather than silently dropped.

:func:`official_layout` finds the official ``./CosyVoice`` + ``./CosyVoice2-0.5B``, :func:`select_tts`
picks a backend (and logs which), :func:`synthesize_to_file` writes a wav without clobbering.
"""
from __future__ import annotations

import abc
import importlib
import importlib.util
import inspect
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import wave
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .errors import BackendUnavailable, InputError, OutputError
from .media import load_audio
from .media.atomic import _create_temp, _output_error, _publish, _remove_quietly
from .quoting import shown

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

INSTALL_ESPEAK = "apt-get install espeak-ng"
INSTALL_COSYVOICE = ("install CosyVoice (its repo's requirements, e.g. requirements_s2v.txt) and download "
                     "iic/CosyVoice2-0.5B, then pass its folder as the CosyVoice model dir")


class TTSBackend(abc.ABC):
    """Text -> speech. ``synthesize`` returns (float32 mono waveform in [-1, 1], sample rate)."""

    name: str = "tts"

    @abc.abstractmethod
    def synthesize(self, text: str, prompt_audio: Optional[PathLike] = None,
                   prompt_text: Optional[str] = None) -> tuple[np.ndarray, int]:
        ...


def _check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InputError("TTS text is empty; pass the sentence to speak with --tts_text")
    return text.strip()


# --------------------------------------------------------------------------------------------
# espeak-ng

# Han, kana and hangul: espeak-ng's English voice would spell these out as "Chinese letter ...".
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def _espeak_binary() -> Optional[str]:
    return shutil.which("espeak-ng")


class EspeakTTS(TTSBackend):
    """Offline speech via the ``espeak-ng`` binary (``apt-get install espeak-ng``).

    ``voice``: an espeak-ng voice name (``espeak-ng --voices``); None picks ``cmn`` (Mandarin)
    for text with CJK characters, else ``en-us``. ``words_per_minute``: espeak's ``-s`` (default 175).
    """

    name = "espeak-ng"

    def __init__(self, voice: Optional[str] = None, words_per_minute: Optional[int] = None,
                 binary: Optional[str] = None):
        self.binary = binary or _espeak_binary()
        if not self.binary:
            raise BackendUnavailable(f"espeak-ng is not installed; run `{INSTALL_ESPEAK}`")
        self.voice = voice
        self.words_per_minute = words_per_minute

    def synthesize(self, text, prompt_audio=None, prompt_text=None):
        text = _check_text(text)
        if prompt_audio is not None or prompt_text is not None:
            # Speaking in another voice than the one asked for would be a silent substitution.
            raise InputError("espeak-ng cannot clone a voice; drop the voice prompt (--tts_prompt_audio/"
                             "--tts_prompt_text) or use CosyVoice")
        voice = self.voice or ("cmn" if _CJK.search(text) else "en-us")
        with tempfile.TemporaryDirectory(prefix="s2v-tts-") as tmp:
            out = Path(tmp) / "espeak.wav"
            # Text goes through stdin (-b 1: UTF-8) so a leading "-" is never read as an option.
            cmd = [self.binary, "-v", voice, "-b", "1", "--stdin", "-w", str(out)]
            if self.words_per_minute:
                cmd += ["-s", str(int(self.words_per_minute))]
            try:
                res = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True,
                                     timeout=60 + len(text) / 5)
            except subprocess.TimeoutExpired:
                raise BackendUnavailable("espeak-ng did not finish in time; shorten --tts_text") from None
            except OSError as exc:
                raise BackendUnavailable(f"cannot run espeak-ng ({exc}); reinstall it with `{INSTALL_ESPEAK}`") from None
            err = res.stderr.decode("utf-8", "replace").strip()
            if res.returncode != 0 or not out.is_file():
                if "voice does not exist" in err:
                    raise InputError(f"espeak-ng has no voice {voice!r}; pick one from `espeak-ng --voices`")
                first = err.splitlines()[0] if err else f"exit code {res.returncode}"
                raise BackendUnavailable(f"espeak-ng failed ({first}); check the install with `espeak-ng --version`")
            try:
                clip = load_audio(out)
            except InputError:
                raise InputError("espeak-ng produced no speech for this text; pass words to speak") from None
        return np.ascontiguousarray(clip.native.mean(axis=0), dtype=np.float32), clip.native_rate


# --------------------------------------------------------------------------------------------
# CosyVoice


def _cosyvoice_importable(repo_dir: Optional[PathLike] = None) -> bool:
    if repo_dir is not None and (Path(repo_dir) / "cosyvoice").is_dir():
        return True
    try:
        return importlib.util.find_spec("cosyvoice") is not None
    except (ImportError, ValueError):
        return False


class CosyVoiceTTS(TTSBackend):
    """Thin wrapper over CosyVoice2, as the official ``WanS2V.tts``.

    ``model_dir``: a local CosyVoice2-0.5B folder. ``repo_dir``: a CosyVoice checkout to put on
    ``sys.path`` (with its ``third_party/Matcha-TTS``) when the package is not installed.
    The model loads on the first ``synthesize``.
    """

    name = "cosyvoice"

    def __init__(self, model_dir: PathLike, repo_dir: Optional[PathLike] = None):
        self.model_dir = Path(model_dir)
        self.repo_dir = Path(repo_dir) if repo_dir is not None else None
        if not self.model_dir.is_dir():
            raise BackendUnavailable(f"CosyVoice model folder {self.model_dir} not found; "
                                     "download iic/CosyVoice2-0.5B into it")
        self._model = None

    def _load(self):
        if self._model is None:
            if self.repo_dir is not None and self.repo_dir.is_dir():  # as official load_tts: checkout + Matcha-TTS
                for p in (self.repo_dir, self.repo_dir / "third_party" / "Matcha-TTS"):
                    if str(p) not in sys.path:
                        sys.path.append(str(p))
            try:
                module = importlib.import_module("cosyvoice.cli.cosyvoice")
            except ImportError as exc:
                raise BackendUnavailable(f"cannot import CosyVoice ({exc}); {INSTALL_COSYVOICE}") from None
            self._model = module.CosyVoice2(str(self.model_dir))
        return self._model

    def synthesize(self, text, prompt_audio=None, prompt_text=None):
        text = _check_text(text)
        if prompt_audio is None:
            raise InputError("CosyVoice needs a voice prompt; pass --tts_prompt_audio (a 5-15 s recording)")
        prompt_path = Path(prompt_audio)
        model = self._load()
        zero_shot = prompt_text is not None and prompt_text.strip() != ""
        infer = model.inference_zero_shot if zero_shot else model.inference_cross_lingual
        prompt = self._prompt_argument(infer, prompt_path)
        chunks = infer(text, prompt_text, prompt) if zero_shot else infer(text, prompt)
        speech = [np.asarray(_to_numpy(c["tts_speech"]), dtype=np.float32).reshape(-1) for c in chunks]
        if not speech:
            raise InputError("CosyVoice produced no speech for this text; pass words to speak")
        return np.concatenate(speech), int(model.sample_rate)

    @staticmethod
    def _prompt_argument(infer, prompt_path: Path):
        # CosyVoice2 (2024) takes the prompt as a 16 kHz [1, n] tensor ("prompt_speech_16k");
        # later releases take the file path ("prompt_wav") and load it themselves.
        params = list(inspect.signature(infer).parameters)
        if "prompt_wav" in params:
            return str(prompt_path)
        import torch  # only on this path: CosyVoice itself needs torch anyway

        clip = load_audio(prompt_path, 16000)
        return torch.from_numpy(np.array(clip.samples))[None, :]


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------------------------


COSYVOICE_REPO = "CosyVoice"
COSYVOICE_MODEL = "CosyVoice2-0.5B"


def official_layout(root: Optional[PathLike] = None) -> tuple[Path, Path]:
    """The official places: ``(<root>/CosyVoice2-0.5B, <root>/CosyVoice)``, root = the current folder.

    The official ``WanS2V.load_tts`` uses exactly these relative paths (it downloads them when absent);
    this engine never downloads, it only looks.
    """
    base = Path.cwd() if root is None else Path(root)
    return base / COSYVOICE_MODEL, base / COSYVOICE_REPO


def select_tts(prefer: Optional[str] = None, cosyvoice_dir: Optional[PathLike] = None, *,
               cosyvoice_repo: Optional[PathLike] = None, voice: Optional[str] = None,
               voice_prompt: bool = False) -> TTSBackend:
    """Pick a TTS backend and log which one.

    ``prefer``: ``"cosyvoice"`` or ``"espeak"`` to insist on one, None for the best available
    (CosyVoice when ``cosyvoice_dir`` exists and ``cosyvoice`` is importable, directly or from the
    ``cosyvoice_repo`` checkout; else espeak-ng). ``voice_prompt``: the caller asked for a cloned voice
    (a prompt recording or transcript), which only CosyVoice can do: without it this raises
    :class:`BackendUnavailable` instead of falling back to espeak-ng.
    """
    if prefer not in (None, "cosyvoice", "espeak"):
        raise InputError(f"unknown TTS backend {prefer!r}; use 'cosyvoice' or 'espeak'")
    cosy_ready = (cosyvoice_dir is not None and Path(cosyvoice_dir).is_dir()
                  and _cosyvoice_importable(cosyvoice_repo))
    if voice_prompt and prefer == "espeak":
        raise InputError("espeak-ng cannot clone a voice; drop the voice prompt or use CosyVoice")
    if prefer == "cosyvoice" or voice_prompt or (prefer is None and cosy_ready):
        if not cosy_ready:
            what = ("no CosyVoice model folder given" if cosyvoice_dir is None else
                    f"CosyVoice model folder {cosyvoice_dir} not found" if not Path(cosyvoice_dir).is_dir()
                    else "the cosyvoice package is not importable"
                    + (f" (no {cosyvoice_repo}/cosyvoice either)" if cosyvoice_repo is not None else ""))
            if voice_prompt:
                raise BackendUnavailable(f"a voice prompt (--tts_prompt_audio/--tts_prompt_text) needs CosyVoice, "
                                         f"which is unavailable ({what}); put the CosyVoice checkout in ./{COSYVOICE_REPO} "
                                         f"and the model in ./{COSYVOICE_MODEL} as the official script does, "
                                         "or drop the voice prompt to use espeak-ng")
            raise BackendUnavailable(f"CosyVoice TTS unavailable ({what}); {INSTALL_COSYVOICE}")
        log.info("TTS voice engine: CosyVoice2 (model %s%s)", shown(cosyvoice_dir),
                 f", code from {shown(cosyvoice_repo)}" if cosyvoice_repo is not None and Path(cosyvoice_repo).is_dir() else "")
        return CosyVoiceTTS(cosyvoice_dir, cosyvoice_repo)
    if _espeak_binary():
        backend = EspeakTTS(voice=voice)
        log.info("TTS voice engine: espeak-ng (offline, voice %s)%s", voice or "by script",
                 "" if prefer == "espeak" else f"; CosyVoice not found at {shown(cosyvoice_dir)}")
        return backend
    if prefer == "espeak":
        raise BackendUnavailable(f"espeak-ng is not installed; run `{INSTALL_ESPEAK}`")
    raise BackendUnavailable(f"no TTS backend available; run `{INSTALL_ESPEAK}` for offline speech, "
                             f"or {INSTALL_COSYVOICE}")


def synthesize(backend: TTSBackend, text: str, prompt_audio: Optional[PathLike] = None,
               prompt_text: Optional[str] = None) -> tuple[np.ndarray, int]:
    """``backend.synthesize`` with its result checked: (float32 mono waveform, rate).

    The official script saves the float waveform (``torchaudio.save``: 32-bit float wav) and loads it
    again, so passing this waveform on in memory feeds the model the very same samples, no file needed.
    """
    if prompt_audio is not None and not Path(prompt_audio).is_file():
        raise InputError(f"TTS prompt audio {prompt_audio} does not exist; check --tts_prompt_audio")
    wav, rate = backend.synthesize(text, prompt_audio=prompt_audio, prompt_text=prompt_text)
    wav = np.asarray(wav, dtype=np.float32).reshape(-1)
    if wav.size == 0 or not np.isfinite(wav).all() or int(rate) <= 0:
        raise InputError(f"{backend.name} returned no usable audio for this text; try other wording")
    return wav, int(rate)


def synthesize_to_file(backend: TTSBackend, text: str, out_wav: PathLike,
                       prompt_audio: Optional[PathLike] = None,
                       prompt_text: Optional[str] = None, *, overwrite: bool = False) -> Path:
    """Speak ``text`` with ``backend`` into a 16-bit PCM mono wav at the backend's rate.

    The wav is written beside ``out_wav`` into an exclusively created, randomly named temporary file
    and then published under its name: a reader never sees half a file, and an existing file (even one
    that appears meanwhile) is never replaced unless ``overwrite=True``.
    """
    dest = Path(out_wav)
    if not dest.parent.is_dir():
        raise OutputError(f"directory {dest.parent} for the TTS wav does not exist; create it first")
    if dest.is_dir():
        raise OutputError(f"TTS output path {dest} is a directory; give a file name ending in .wav")
    if not overwrite and os.path.lexists(dest):
        raise OutputError(f"TTS output file {dest} already exists; delete it, choose another name or pass overwrite=True")
    wav, rate = synthesize(backend, text, prompt_audio, prompt_text)
    pcm = (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype("<i2")

    tmp = _create_temp(dest)  # exclusive (O_EXCL), randomly named, beside dest
    try:
        with open(tmp, "wb") as fh, wave.open(fh, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        _publish(tmp, dest, overwrite)  # never replaces a file that appeared meanwhile unless overwrite
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError):
            raise _output_error(exc, dest) from exc
        raise
    return dest
