"""TensorRT DiT backend: an engine from ``engines/dit/<key>/`` (built by ``python -m export.build``), one
execution context, ``execute_async_v3`` captured as a CUDA graph per shape. TensorRT is imported lazily."""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.backends.static_inputs import StaticInputs, shape_key
from runtime.errors import BackendUnavailable
from runtime.models.dit import ClipConditions, WanS2VDiT

_INPUTS = ("x", "t_freq") + ClipConditions.names()


class TrtDiT:
    name = "tensorrt"

    def __init__(self, model: WanS2VDiT, folder: Path, manifest: dict):
        from export.trt import TRTEngine

        self.model, self.folder, self.manifest = model, folder, manifest
        self.device = model.patch_embedding.weight.device
        strip = manifest.get("flags", {}).get("strip_plan")
        self.engine = TRTEngine(folder / "engine.plan", onnx_for_refit=manifest.get("onnx_path") if strip else None,
                                device=self.device.index or 0)
        self.profiles = manifest["profiles"]
        self._buffers: dict[tuple, tuple] = {}

    @classmethod
    def from_engines(cls, model: WanS2VDiT, engines_dir: str | Path, checkpoint: str | None = None) -> "TrtDiT":
        from export import trt as trtw
        from export.manifest import checkpoint_identity, read_manifest, select_engine

        trt = trtw.import_trt()
        if not torch.cuda.is_available():
            raise BackendUnavailable("backend tensorrt needs a CUDA GPU")
        props = torch.cuda.get_device_properties(0)
        request = {"component": "dit", "precision": "fp16", "tensorrt_version": trt.__version__, "gpu": props.name,
                   "compute_capability": f"{props.major}.{props.minor}"}
        if checkpoint:
            request["checkpoint"] = checkpoint_identity(checkpoint)
        rebuild = f"python -m export.build --precision fp16 --ckpt_dir {checkpoint or 'CKPT'} --out {engines_dir}"
        folder = select_engine(engines_dir, "dit", request, rebuild)
        return cls(model, folder, read_manifest(folder))

    def _profile_for(self, x: torch.Tensor, cond: ClipConditions) -> int:
        b, _, f, h, w = x.shape
        val = {"batch": b, "frames": f, "grid_h": h // 2, "grid_w": w // 2, "extra": cond.extra.shape[1]}
        for i, p in enumerate(self.profiles):
            if all(p[k]["min"] <= v <= p[k]["max"] for k, v in val.items()):
                return i
        raise BackendUnavailable(f"shape {val} is outside every profile of engine {self.folder}; rebuild with wider "
                                 "profiles (python -m export.build)")

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> torch.Tensor:
        key = shape_key(x, t_freq, cond)
        if key not in self._buffers:
            static = StaticInputs(x, t_freq, cond, [self.engine.torch_dtype(n) for n in _INPUTS])
            b, _, f, h, w = x.shape
            out = {"velocity": torch.empty((b, self.model.cfg.out_dim, f, h, w), device=self.device, dtype=torch.float32)}
            self.engine.capture(key, dict(zip(_INPUTS, static.tensors)), out, profile=self._profile_for(x, cond))
            self._buffers[key] = (static, out)
        static, out = self._buffers[key]
        static.load(x, t_freq, cond)
        self.engine.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.engine.stream):
            self.engine.replay(key)
        torch.cuda.current_stream().wait_stream(self.engine.stream)
        return out["velocity"].clone()
