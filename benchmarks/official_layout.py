"""A DiT written in the official checkpoint layout (``config.json`` + safetensors, sharded with an index), for the
tests and the benchmarks that load a folder as a user's would be loaded."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from runtime import checkpoint as ckpt


def save_dit(model, folder: str | Path, shards: int = 1, dtype: torch.dtype | None = None,
             shard_bytes: int | None = None) -> Path:
    """Write ``model`` (its official key names: the state-dict hooks split a fused QKV) as one file (``shards`` 1),
    ``shards`` shards of equal tensor counts, or shards of at most ``shard_bytes`` each. Each shard is copied to
    the host as it is written, so a 14B model on the GPU is never held twice on the host."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ckpt.DIT_CONFIG).write_text(json.dumps({"_class_name": "WanModel_S2V", **model.cfg.to_official_dict()},
                                                     indent=2))
    state = model.state_dict()
    names = list(state)

    def host(names_: list[str]) -> dict[str, torch.Tensor]:
        return {k: (state[k].to(dtype) if dtype else state[k]).detach().to("cpu", copy=True).contiguous()
                for k in names_}

    if shard_bytes is None and shards <= 1:
        save_file(host(names), str(folder / ckpt.DIT_SINGLE))
        return folder
    if shard_bytes is None:
        per = -(-len(names) // shards)
        groups = [names[i * per:(i + 1) * per] for i in range(shards)]
    else:
        groups, size = [[]], 0
        for name in names:
            n = state[name].numel() * state[name].element_size()
            if groups[-1] and size + n > shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
    weight_map = {}
    for i, part in enumerate(groups):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(host(part), str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (folder / ckpt.DIT_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder
