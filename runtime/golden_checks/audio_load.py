"""Golden parity of the audio loading: what the official ``librosa.load(path, sr=16000)`` hands wav2vec2.

``manifest["audio_load"]["cases"]`` names each source file (beside the manifest), its reference tensor in
``audio_load.safetensors`` and the expected 16 kHz length; the file is loaded with
:func:`runtime.media.load_audio`, exactly as the pipeline does.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from runtime.golden import Case, compare, failed
from runtime.media import FEATURE_SAMPLE_RATE, load_audio

TOL = 1e-5  # same decoder scaling, channel mean and soxr "HQ": expect float32 rounding at most


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    spec = manifest["audio_load"]
    ref = load_file(str(golden_dir / spec["file"]))
    cases: list[Case] = []
    for case in spec["cases"]:
        name = Path(case["file"]).stem
        source = golden_dir / case["file"]
        if not source.is_file():
            cases.append(failed("audio_load", name, f"{source} not found"))
            continue
        clip = load_audio(source, FEATURE_SAMPLE_RATE)
        want = ref[case["tensor"]].reshape(-1)
        note = f"{case['native_rate']} Hz x{case['channels']} -> {len(clip.samples)} samples"
        if len(clip.samples) != int(case["samples_16k"]):
            note += f" (expected {case['samples_16k']})"
        cases.append(compare("audio_load", name, clip.samples.copy(), want, TOL, note=note))
    if not cases:
        raise ValueError("manifest audio_load lists no cases")
    return cases
