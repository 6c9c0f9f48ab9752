"""DiT backends behind one interface: ``backend.forward(x, t_freq, cond) -> velocity`` (fp32).

``backend.model`` is the PyTorch ``WanS2VDiT``; per-clip conditioning (``model.prepare``) always runs in
PyTorch (once per clip), only the per-step transformer call is delegated:

- ``torch``: eager reference;
- ``torch-compile``: blocks under ``torch.compile``;
- ``torch-graph``: compiled blocks, the whole step captured as a CUDA graph per shape (CUDA only);
- ``onnxruntime``: the exported FP16 graph in ONNX Runtime (CUDA EP with IO binding and CUDA graphs on a GPU);
- ``tensorrt``: an engine built by ``python -m export.build`` (``trt_backend``: runtime, runner and backends);
- ``auto`` (the default): ``torch-graph`` on CUDA, ``torch`` on the CPU or with the DiT offloaded (``resolve_backend``).

The two engine backends also run the VAE through its exported FP32 graphs (``make_vae``).
"""
from __future__ import annotations

import torch

from runtime.backends.ort_backend import OrtDiT, ort_vae
from runtime.backends.torch_backend import CompiledDiT, GraphDiT, TorchDiT
from runtime.backends.trt_backend import TrtDiT, trt_vae
from runtime.errors import BackendUnavailable

BACKENDS = ("torch", "torch-compile", "torch-graph", "onnxruntime", "tensorrt")
CHOICES = ("auto",) + BACKENDS


def resolve_backend(name: str, device, offload_model: bool = False) -> str:
    """``auto`` → ``torch-graph`` on a CUDA device (compiled blocks replayed as a CUDA graph: the fastest exact path
    measured, after a compilation and capture per clip shape; docs/speed.md), else ``torch``: on the CPU (the float32 reference path the golden check runs) and when the DiT is offloaded
    between clips (CUDA graphs pin its weights on the GPU). A named backend is returned as is."""
    if name != "auto":
        return name
    return "torch-graph" if torch.device(device).type == "cuda" and not offload_model else "torch"


def make_backend(name: str, model, engines_dir: str = "engines", checkpoint: str | None = None, loras=()):
    """``loras``: the ``runtime.lora.LoraSpec`` list merged into ``model``; engine backends refuse engines built
    from another merge."""
    if name == "torch":
        return TorchDiT(model)
    if name == "torch-compile":
        return CompiledDiT(model)
    if name == "torch-graph":
        return GraphDiT(model)
    if name == "onnxruntime":
        return OrtDiT.from_engines(model, engines_dir, checkpoint, loras)
    if name == "tensorrt":
        return TrtDiT.from_engines(model, engines_dir, checkpoint, loras)
    raise BackendUnavailable(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")


def make_vae(name: str, vae, engines_dir: str = "engines", checkpoint: str | None = None):
    """The VAE the sampler runs: the PyTorch ``vae`` for the PyTorch backends; for ``onnxruntime`` and ``tensorrt``
    the FP32 VAE graphs (ONNX Runtime sessions, TensorRT engines) that ``export.build`` wrote with the DiT's, in the
    same chunk loop (``runtime.backends.vae_graphs.GraphVAE``). Missing or mismatching graphs are refused like the
    DiT's, never replaced by the PyTorch VAE."""
    if name == "onnxruntime":
        return ort_vae(vae, engines_dir, checkpoint)
    if name == "tensorrt":
        return trt_vae(vae, engines_dir, checkpoint)
    return vae
