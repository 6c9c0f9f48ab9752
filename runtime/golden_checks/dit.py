"""Golden parity of the S2V DiT: first/later clip at every timestep stored in ``dit_io``."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.config import DiTConfig
from runtime.golden import Case, compare
from runtime.models.dit import load_dit

TOL = 1e-4


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    spec = manifest["dit"]
    cfg = DiTConfig.from_dict(spec["config"], source=f"{golden_dir}/manifest.json[dit]")
    model = load_dit(golden_dir / "dit_weights.safetensors", dtype=torch.float32, config=cfg)
    io = load_file(str(golden_dir / "dit_io.safetensors"))
    motion_frames = int(spec.get("motion_frames", 73))
    b = lambda name: io[name].unsqueeze(0)  # noqa: E731 - the golden tensors are stored without batch dim
    audio = io["audio_input"] if io["audio_input"].dim() == 4 else io["audio_input"].unsqueeze(0)
    cases = []
    for key in sorted(io):
        m = re.fullmatch(r"out_(first|later)_clip_t(\d+)", key)
        if not m:
            continue
        first, t = m.group(1) == "first", int(m.group(2))
        out = model(b("x"), t, b("context"), b("ref_latents"), None if first else b("motion_latents"),
                    b("cond_states"), audio, motion_frames=motion_frames)
        cases.append(compare("dit", key.removeprefix("out_"), out[0], io[key], TOL))
    if not cases:
        raise ValueError("dit_io.safetensors has no out_{first,later}_clip_t* tensors")
    return cases
