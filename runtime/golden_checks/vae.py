"""VAE parity: this project's encode/decode (full-sequence and chunked) vs the official outputs.

Weights, latent statistics and channel widths come only from the golden folder and its manifest.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.golden import Case, compare
from runtime.models.vae import load_vae

TOL = 1e-4  # float32 rel-L2, far above float32 reordering noise (the golden report prints the observed value)


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    meta = manifest["vae"]
    weights = Path(golden_dir) / meta.get("weights", "vae_weights.safetensors")
    io = load_file(str(Path(golden_dir) / meta.get("io", "vae_io.safetensors")))
    vae = load_vae(weights, latent_mean=meta["mean"], latent_std=meta["std"])  # widths come from the file
    note = f"base_dim {vae.cfg.base_dim}"
    with torch.no_grad():
        return [
            compare("vae", "encode", vae.encode(io["video"]), io["latent"], TOL, note),
            compare("vae", "encode_chunked", vae.encode_chunked(io["video"]), io["latent"], TOL),
            compare("vae", "decode", vae.decode(io["latent"]), io["decoded"], TOL),
            compare("vae", "decode_chunked", vae.decode_chunked(io["latent"]), io["decoded"], TOL),
        ]
