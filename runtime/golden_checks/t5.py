"""Golden parity of the UMT5 encoder: Wan-layout weights loaded into transformers, all positions compared."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.golden import Case, compare
from runtime.models.text import WanT5Config, load_umt5_encoder

TOL = 1e-4


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    cfg = WanT5Config.from_dict(manifest["t5"]["config"], source=f"{golden_dir}/manifest.json[t5]")
    model = load_umt5_encoder(golden_dir / "t5_weights.safetensors", cfg, dtype=torch.float32, device="cpu")
    io = load_file(str(golden_dir / "t5_io.safetensors"))
    with torch.no_grad():
        hidden = model(input_ids=io["ids"], attention_mask=io["mask"]).last_hidden_state
    cases = [compare("t5", "hidden_all_positions", hidden, io["hidden"], TOL)]
    # The trimmed rows are what the pipeline uses; report them on their own so a padding-only
    # discrepancy cannot hide a real one (or the reverse).
    lengths = io["mask"].gt(0).sum(dim=1).tolist()
    real = lambda h: torch.cat([row[:n] for row, n in zip(h, lengths)])  # noqa: E731
    cases.append(compare("t5", "hidden_trimmed", real(hidden), real(io["hidden"]), TOL,
                         note=f"lengths {lengths}"))
    return cases
