"""TensorRT DiT backend: an engine from ``engines/dit/<key>/`` (built by ``python -m export.build`` with TensorRT
10/11 or TensorRT-RTX), one execution context, ``execute_async_v3`` captured as a CUDA graph per shape.
The runtime is imported lazily; manifests are checked by ``runtime.engines`` before anything loads."""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.backends.static_inputs import StaticInputs, shape_key
from runtime.engines import checkpoint_identity, io_mismatch, select_engine
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.models.dit import ClipConditions, WanS2VDiT
from runtime.trt_runtime import (INSTALL, RTX_COMPUTE_CAPABILITIES, TRTEngine, check_device, import_runtime,
                                 installed_runtimes)

_INPUTS = ("x", "t_freq") + ClipConditions.names()


class TrtDiT:
    name = "tensorrt"

    def __init__(self, model: WanS2VDiT, folder: Path, manifest: dict, engines_dir: str | Path, rebuild: str):
        self.model, self.folder, self.manifest = model, folder, manifest
        self.device = model.patch_embedding.weight.device
        refit = None
        if manifest.get("flags", {}).get("strip_plan"):  # weights come from the ONNX graph, checked like the plan
            from runtime.engines import check_onnx

            refit = Path(engines_dir) / manifest["onnx_path"]
            check_onnx(refit, engines_dir, {"onnx_sha256": manifest["onnx_sha256"]}, rebuild)
        self.engine = TRTEngine(import_runtime(manifest["runtime"]), folder / "engine.plan", onnx_for_refit=refit,
                                device=self.device.index or 0)
        why = io_mismatch(manifest["io"], self.engine.io())
        if why:
            raise EngineMismatch(f"engine {folder} does not have the I/O its manifest records ({why}); rebuild with: {rebuild}")
        self.profiles = manifest["profiles"]
        self._buffers: dict[tuple, tuple] = {}

    @classmethod
    def from_engines(cls, model: WanS2VDiT, engines_dir: str | Path, checkpoint: str | None = None,
                     loras=()) -> "TrtDiT":
        from runtime import lora

        runtimes = installed_runtimes()
        if not runtimes:
            raise BackendUnavailable("backend tensorrt needs TensorRT 10/11 or TensorRT-RTX; install one with: "
                                     f"{INSTALL['tensorrt-rtx']}, or {INSTALL['tensorrt']}")
        cc, gpu = gpu_of(model.patch_embedding.weight.device)
        runtimes = usable_runtimes(runtimes, cc, gpu)
        request = {"kind": "engine", "component": "dit", "precision": "fp16", "runtimes": runtimes,
                   "compute_capability": cc}
        if checkpoint:
            request["checkpoint"] = checkpoint_identity(checkpoint)
        request["loras"] = lora.identity(loras)
        rebuild = (f"python -m export.build --precision fp16 --ckpt_dir {checkpoint or 'CKPT'} --out {engines_dir}"
                   f"{lora.flags(loras)}")
        folder, manifest = select_engine(engines_dir, "dit", request, rebuild)
        return cls(model, folder, manifest, engines_dir, rebuild)

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


def gpu_of(device: torch.device) -> tuple[str, str]:
    """(compute capability "major.minor", name) of the model's GPU."""
    if device.type != "cuda":
        raise BackendUnavailable("backend tensorrt needs a CUDA GPU (--device cuda)")
    props = torch.cuda.get_device_properties(device)
    return f"{props.major}.{props.minor}", props.name


def usable_runtimes(runtimes: dict[str, str], cc: str, gpu: str) -> dict[str, str]:
    """The installed runtimes that can run engines on this GPU; with only TensorRT-RTX installed, a GPU it does
    not support is refused in one line before any engine is looked at."""
    if "tensorrt" not in runtimes:
        check_device("tensorrt-rtx", cc, gpu)
        return runtimes
    return {k: v for k, v in runtimes.items() if k == "tensorrt" or cc in RTX_COMPUTE_CAPABILITIES}
