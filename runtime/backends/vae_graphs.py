"""The VAE through its exported graphs: the engine backends (``onnxruntime``, ``tensorrt``) run the four FP32 graphs
``export.build`` writes (encoder/decoder, each a first-chunk graph and a step graph with explicit caches) in the
same chunk loop as ``WanVAE.encode_chunked`` / ``decode_chunked``, one latent per step.

``GraphVAE`` has the interface the sampler uses (``cfg``, ``encode``, ``decode`` and their ``_chunked`` forms), so
it stands in for the PyTorch VAE; the graph runners are plain callables (tensors in graph-input order → tensors in
graph-output order), built by ``ort_backend`` (ONNX Runtime sessions) or ``trt_backend`` (engines).

The graphs were exported with batch 1, one latent per step (4 pixel frames for the encoder) and dynamic height and
width; a batch is run one video at a time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from runtime.models.vae import ENCODE_CHUNK, WanVAE

# The graph names, as ``export.build`` writes them (OUT/onnx/vae/<name>.onnx, OUT/vae_<name>/<key>/engine.plan).
VAE_GRAPHS = ("decoder_first", "decoder_step", "encoder_first", "encoder_step")

Graph = Callable[..., Sequence[torch.Tensor]]


class GraphVAE:
    """Encode/decode with ``graphs[name](*inputs) -> (output, *new_caches)``; float32 results on the VAE's device."""

    def __init__(self, vae: WanVAE, graphs: dict[str, Graph], name: str):
        missing = [g for g in VAE_GRAPHS if g not in graphs]
        if missing:
            raise ValueError(f"GraphVAE needs the graphs {', '.join(missing)}")
        self.vae, self.cfg, self.graphs, self.name = vae, vae.cfg, graphs, name
        self.device = vae.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # the graphs are FP32 whatever the PyTorch VAE's dtype

    def _run(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.graphs[name](*inputs)
        return out[0], tuple(out[1:])

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1] → latents [B, z, 1 + (T-1)//4, H/8, W/8] (frames past the last full chunk
        dropped, as ``WanVAE.encode``)."""
        n = WanVAE._check_video(video)
        out = []
        for b in range(video.shape[0]):
            v = video[b:b + 1].to(self.device, torch.float32)
            z, caches = self._run("encoder_first", v[:, :, :1].contiguous())
            zs = [z]
            for i in range(1, n):
                s = 1 + ENCODE_CHUNK * (i - 1)
                z, caches = self._run("encoder_step", v[:, :, s:s + ENCODE_CHUNK].contiguous(), *caches)
                zs.append(z)
            out.append(torch.cat([t.to(self.device, torch.float32) for t in zs], dim=2))
        return torch.cat(out)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latents [B, z, L, h, w] → video [B, 3, 1 + 4 (L-1), 8h, 8w] in [-1, 1] (the graphs clamp)."""
        self.vae._check_latent(z)
        out = []
        for b in range(z.shape[0]):
            lat = z[b:b + 1].to(self.device, torch.float32)
            frames, caches = self._run("decoder_first", lat[:, :, :1].contiguous())
            parts = [frames]
            for i in range(1, lat.shape[2]):
                frames, caches = self._run("decoder_step", lat[:, :, i:i + 1].contiguous(), *caches)
                parts.append(frames)
            out.append(torch.cat([t.to(self.device, torch.float32) for t in parts], dim=2))
        return torch.cat(out)

    # the sampler picks the whole-sequence form for small videos; the graphs only have the chunked one
    encode_chunked = encode
    decode_chunked = decode
