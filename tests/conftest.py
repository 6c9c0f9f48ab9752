from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
GOLDEN = SHARED / "golden"
SAMPLES = SHARED / "samples"


@pytest.fixture(autouse=True)
def _no_grad_and_threads():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def golden_or_skip() -> Path:
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip(f"golden reference data not found at {GOLDEN}")
    return GOLDEN


def samples_or_skip() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample media not found at {SAMPLES}")
    return SAMPLES


def write_inputs(folder: Path) -> tuple[Path, Path]:
    """A real reference image and a 1 s speech-like wav, for CLI cases that must get past the input checks."""
    import wave

    import numpy as np

    from runtime.demo import demo_image, demo_speech

    image, audio = folder / "face.png", folder / "speech.wav"
    demo_image().save(image)
    wav, rate = demo_speech(1.0)
    with wave.open(str(audio), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((wav * 32767).astype("<i2").tobytes())
    return image, audio
