"""Test helper: write a DiT in the official checkpoint layout (config.json + safetensors shards + index)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime import checkpoint as ckpt
from runtime.models.dit import WanS2VDiT


def save_dit(model: WanS2VDiT, folder: str | Path, shards: int = 1, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` in the official layout (config.json + safetensors shards + index)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "WanModel_S2V", **model.cfg.to_official_dict()}
    (folder / ckpt.DIT_CONFIG).write_text(json.dumps(cfg, indent=2))
    state = {k: (v.to(dtype) if dtype else v).contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    if shards <= 1:
        save_file(state, str(folder / ckpt.DIT_SINGLE))
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[i * per:(i + 1) * per]}
        save_file(part, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / ckpt.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder
