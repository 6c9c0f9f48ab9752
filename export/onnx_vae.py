"""Wan2.1 VAE → FP32 ONNX: encoder and decoder as a first-chunk graph and a step graph with explicit caches.

The official VAE decodes one latent frame per call (encoder: frame 0, then 4 frames per call) and carries
per-layer caches between calls. Exported here as pure functions of (chunk, caches) → (output, new caches)
with static cache shapes per resolution and dynamic height/width, so an engine runs the same loop.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn as nn

from runtime.backends.vae_graphs import VAE_GRAPHS as GRAPHS  # noqa: F401  (the names the runtime loads)
from runtime.models.vae import WanVAE


class _Graph(nn.Module):
    def __init__(self, vae: WanVAE, kind: str):
        super().__init__()
        self.vae, self.kind = vae, kind

    def forward(self, x, *caches):
        fn = {"decoder_first": lambda: self.vae.decode_first(x), "decoder_step": lambda: self.vae.decode_step(x, caches),
              "encoder_first": lambda: self.vae.encode_first(x), "encoder_step": lambda: self.vae.encode_step(x, caches)}
        out, new = fn[self.kind]()
        return (out, *new)


def example(vae: WanVAE, kind: str, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of one graph at pixel size height × width (caches from a real previous chunk)."""
    g = torch.Generator().manual_seed(seed)
    h, w = height // 8, width // 8
    dev = vae.conv2.weight.device
    if kind.startswith("decoder"):
        z0, z1 = (torch.randn(1, 16, 1, h, w, generator=g).to(dev) for _ in range(2))
        if kind == "decoder_first":
            return (z0,)
        return (z1, *vae.decode_first(z0)[1])
    f0 = (torch.rand(1, 3, 1, height, width, generator=g) * 2 - 1).to(dev)
    if kind == "encoder_first":
        return (f0,)
    chunk = (torch.rand(1, 3, 4, height, width, generator=g) * 2 - 1).to(dev)
    return (chunk, *vae.encode_first(f0)[1])


def io_names(vae: WanVAE, kind: str, n_inputs: int) -> tuple[list[str], list[str]]:
    first = "z" if kind.startswith("decoder") else "video"
    out = "video" if kind.startswith("decoder") else "z"
    n_cache = (32 if kind.startswith("decoder") else 24)
    ins = [first] + [f"cache_{i}" for i in range(n_inputs - 1)]
    return ins, [out] + [f"new_cache_{i}" for i in range(n_cache)]


def export_vae_graph(vae: WanVAE, kind: str, path: str | Path, height: int = 64, width: int = 96,
                     dynamic: bool = True, opset: int = 23) -> dict:
    """Export one VAE graph (FP32) to ``path`` atomically; dynamic pixel height/width (multiples of 8)."""
    from torch.export import Dim

    from export.files import staged

    path = Path(path)
    args = example(vae, kind, height, width)
    ins, outs = io_names(vae, kind, len(args))
    shapes = None
    if dynamic:
        # every spatial size is (pixel size)/s for the tensor's own stride s: express it through one Dim each
        hb, wb = Dim("h8", min=2, max=512), Dim("w8", min=2, max=512)
        shapes = []
        for t in args:
            s_h, s_w = height // t.shape[-2], width // t.shape[-1]
            shapes.append({3: (8 // s_h) * hb, 4: (8 // s_w) * wb})
        shapes = (shapes[0], tuple(shapes[1:])) if len(shapes) > 1 else (shapes[0],)
    t0 = time.perf_counter()
    with torch.no_grad():
        prog = torch.onnx.export(_Graph(vae, kind), args, input_names=ins, output_names=outs, opset_version=opset,
                                 dynamo=True, dynamic_shapes=shapes, optimize=True, external_data=False)
    with staged(path) as tmp:
        prog.save(str(tmp))
    import onnx

    graph = onnx.load(str(path))
    return {"graph": kind, "export_s": round(time.perf_counter() - t0, 2), "nodes": len(graph.graph.node),
            "onnx_bytes": path.stat().st_size}
