"""Inputs the project makes itself for the demo: a face-like picture and a short speech-like clip."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def demo_image(size: int = 256) -> Image.Image:
    """A cartoon face on a gradient background (deterministic)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    bg = np.stack([0.35 + 0.3 * yy, 0.45 + 0.2 * xx, 0.7 - 0.2 * yy], axis=-1)
    img = Image.fromarray((bg * 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    s = size / 256
    d.ellipse([68 * s, 40 * s, 188 * s, 200 * s], fill=(236, 196, 164))          # face
    d.pieslice([60 * s, 24 * s, 196 * s, 140 * s], 180, 360, fill=(70, 45, 30))  # hair
    for cx in (104, 152):                                                          # eyes
        d.ellipse([(cx - 10) * s, 100 * s, (cx + 10) * s, 114 * s], fill=(255, 255, 255))
        d.ellipse([(cx - 4) * s, 102 * s, (cx + 4) * s, 112 * s], fill=(40, 30, 20))
    d.line([128 * s, 116 * s, 122 * s, 146 * s, 130 * s, 148 * s], fill=(190, 140, 120), width=max(1, int(2 * s)))
    d.chord([104 * s, 150 * s, 152 * s, 178 * s], 0, 180, fill=(170, 60, 70))      # mouth
    d.rectangle([96 * s, 200 * s, 160 * s, 256 * s], fill=(60, 90, 140))           # shirt
    return img


def demo_speech(seconds: float = 3.0, rate: int = 16000) -> tuple[np.ndarray, int]:
    """Vowel-like syllables: a glottal pulse train shaped by two formants and a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.cumsum(f0) / rate * np.pi
    voice = sum(np.sin(k * phase) / k for k in range(1, 25))
    formants = sum(np.sin(2 * np.pi * f * t) for f in (700, 1200)) * 0.15 + 1.0
    envelope = np.clip(np.sin(2 * np.pi * 4 * t), 0, None) ** 0.7
    wav = voice * formants * envelope
    return (0.3 * wav / np.abs(wav).max()).astype(np.float32), rate


def save_wav(path, wav: np.ndarray, rate: int) -> None:
    """16-bit mono PCM WAV of samples in [-1, 1] (what ``demo_speech`` gives), for a request's audio file."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.asarray(wav) * 32767).astype("<i2").tobytes())
