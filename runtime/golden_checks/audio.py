"""Golden parity of the audio resampling: 50 -> 30 Hz interpolation and the 16 fps clip bucketing.

Cases are discovered from the key names in ``audio_bucket.safetensors``: ``interp_in``/``interp_out``
and, per (T, F), ``in_{T}_{F}`` -> ``out_{T}_{F}`` plus the clip count ``clips_{T}_{F}``.
"""
from __future__ import annotations

import re
from pathlib import Path

from safetensors.torch import load_file

from runtime.golden import Case, compare
from runtime.models.audio import bucket_audio, interpolate_50_to_30

TOL = 1e-6  # the reference ops are reproduced one for one: expect exact equality
FPS = 16  # the official S2V sample_fps the golden data was made with


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    io = load_file(str(golden_dir / "audio_bucket.safetensors"))
    cases: list[Case] = []
    if "interp_in" in io:
        cases.append(compare("audio", "interp_50_to_30", interpolate_50_to_30(io["interp_in"]), io["interp_out"], TOL,
                             note=f"T {io['interp_in'].shape[1]} -> {io['interp_out'].shape[1]}"))
    for key in sorted(io):
        m = re.fullmatch(r"in_(\d+)_(\d+)", key)
        if not m:
            continue
        suffix, frames = f"{m.group(1)}_{m.group(2)}", int(m.group(2))
        out, clips = bucket_audio(io[key], fps=FPS, batch_frames=frames, m=0)
        cases.append(compare("audio", f"bucket_{suffix}", out, io[f"out_{suffix}"], TOL))
        ref_clips = int(io[f"clips_{suffix}"].reshape(-1)[0])
        exact = clips == ref_clips
        cases.append(Case("audio", f"clips_{suffix}", 0.0 if exact else float("inf"), 0.0 if exact else float("inf"),
                          0.0, note=f"{clips} vs {ref_clips}"))
    if not cases:
        raise ValueError("audio_bucket.safetensors has neither interp_in nor in_{T}_{F} tensors")
    return cases
