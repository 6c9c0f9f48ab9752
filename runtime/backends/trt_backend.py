"""The TensorRT side in one file: which runtime is importable and runs on this GPU, the engine runner, and the
backends over it (the DiT step, the VAE graphs).

Two runtimes load the same kind of plan file through the same Python API: TensorRT 10.x/11.x (module
``tensorrt``) and TensorRT-RTX (module ``tensorrt_rtx_bindings``, PyPI ``tensorrt-rtx-cu13-*``). A plan only
loads in the runtime (and version) that built it; the manifest says which. Both are imported lazily.

- ``TRTEngine``: one engine, one execution context, torch tensors as I/O, optional CUDA-graph capture per shape.
- ``TrtDiT``: the DiT engine from ``engines/dit/<key>/``, ``execute_async_v3`` captured as a CUDA graph per shape.
- ``trt_vae``: the four FP32 VAE engines (``engines/vae_<graph>/<key>/``) in the chunk loop of ``GraphVAE``.

Manifests are checked by ``runtime.manifest`` before any plan is deserialized.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch

from runtime import lora
from runtime.backends.static_inputs import StaticInputs, shape_key
from runtime.backends.vae_graphs import VAE_GRAPHS, GraphVAE
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.manifest import check_onnx, checkpoint_identity, io_mismatch, select_engine
from runtime.models.dit import ClipConditions, WanS2VDiT
from runtime.quoting import shown

# ------------------------------------------------------------------------------------------ runtime discovery
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
INSTALL = {"tensorrt": "pip install tensorrt-cu13 (TensorRT >= 10.15 or 11.x, from NVIDIA's package index)",
           "tensorrt-rtx": 'pip install -e ".[rtx]" (TensorRT-RTX, from PyPI)'}
# The GPUs TensorRT-RTX targets (its ComputeCapability enum: SM75 … SM121); it refuses 9.0 and 10.x
# (H100/H200, B200/B300), where TensorRT 10/11 is the runtime to use.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
          "INT8": "int8", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8e4m3fn"}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
                "int32": torch.int32}


def import_runtime(name: str):
    """The module of runtime ``name`` ("tensorrt" or "tensorrt-rtx"), or BackendUnavailable saying how to get it."""
    try:
        return importlib.import_module(MODULES[name])
    except Exception as err:  # ImportError, or the PyPI stub failing to fetch its libraries
        raise BackendUnavailable(f"{name} is not importable here ({type(err).__name__}); install it with: "
                                 f"{INSTALL[name]}") from None


def installed_runtimes() -> dict[str, str]:
    """Importable TensorRT runtimes and their versions, e.g. ``{"tensorrt-rtx": "1.7.1.116"}``."""
    found = {}
    for name in MODULES:
        try:
            found[name] = import_runtime(name).__version__
        except BackendUnavailable:
            pass
    return found


def check_device(runtime: str, cc: str, gpu: str) -> None:
    """Refuse, in one line, a GPU that ``runtime`` cannot run engines on (``cc`` like "9.0")."""
    if runtime == "tensorrt-rtx" and cc not in RTX_COMPUTE_CAPABILITIES:
        raise BackendUnavailable(f"TensorRT-RTX does not run on compute capability {cc} ({gpu}): use --backend "
                                 "torch-graph, or TensorRT 10/11 (pip install tensorrt-cu13) and rebuild the engines")


def dtype_name(trt, dtype) -> str:
    return DTYPES.get(str(dtype).rsplit(".", 1)[-1], str(dtype))


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


def engine_request(component: str, precision: str, device: torch.device, checkpoint: str | None) -> dict:
    """What an engine for ``component`` must match on this machine (runtime and version, this GPU, checkpoint)."""
    runtimes = installed_runtimes()
    if not runtimes:
        raise BackendUnavailable("backend tensorrt needs TensorRT 10/11 or TensorRT-RTX; install one with: "
                                 f"{INSTALL['tensorrt-rtx']}, or {INSTALL['tensorrt']}")
    cc, gpu = gpu_of(device)
    request = {"kind": "engine", "component": component, "precision": precision,
               "runtimes": usable_runtimes(runtimes, cc, gpu), "compute_capability": cc}
    if checkpoint:
        request["checkpoint"] = checkpoint_identity(checkpoint)
    return request


# ------------------------------------------------------------------------------------------ the engine runner
class TRTEngine:
    """One engine, one execution context, torch tensors as I/O, optional CUDA-graph capture per shape.

    ``stream``: the CUDA stream to enqueue on (default: a new one on ``device``)."""

    def __init__(self, trt, plan_path: str | Path, onnx_for_refit: str | Path | None = None,
                 device: int | str | torch.device = 0, stream=None):
        self.trt = trt
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{shown(plan_path)}: the TensorRT runtime could not deserialize the engine (see the log "
                                 "above); rebuild with: python -m export.build")
        if onnx_for_refit is not None:  # stripped plan: put the weights back from the ONNX we already keep
            refitter = trt.Refitter(self.engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(onnx_for_refit)):
                raise EngineMismatch(f"refit of {shown(plan_path)} from {shown(onnx_for_refit)} failed; rebuild with: "
                                     "python -m export.build")
            if not refitter.refit_cuda_engine():
                raise EngineMismatch(f"refit of {shown(plan_path)} failed; rebuild with: python -m export.build")
        self.context = self.engine.create_execution_context()
        self.stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._graphs: dict = {}
        self._profile = None

    def io(self) -> dict:
        """Names, dtypes and (profile-free, -1 = dynamic) shapes of the engine's inputs and outputs."""
        def entry(n):
            return {"name": n, "dtype": dtype_name(self.trt, self.engine.get_tensor_dtype(n)),
                    "shape": list(self.engine.get_tensor_shape(n))}
        return {"inputs": [entry(n) for n in self.inputs], "outputs": [entry(n) for n in self.outputs]}

    def torch_dtype(self, name: str) -> torch.dtype:
        return TORCH_DTYPES[dtype_name(self.trt, self.engine.get_tensor_dtype(name))]

    def prepare(self, tensors) -> dict[str, torch.Tensor]:
        """Inputs in the engine's input order → ``{name: tensor}`` in each input's dtype, contiguous, on the
        engine's device (copies only where needed)."""
        tensors = list(tensors)
        if len(tensors) != len(self.inputs):
            raise ValueError(f"the engine takes {len(self.inputs)} inputs ({', '.join(self.inputs)}), got {len(tensors)}")
        return {n: t.to(self.device, self.torch_dtype(n)).contiguous() for n, t in zip(self.inputs, tensors)}

    def bind(self, feeds: dict, outputs: dict | None = None, profile: int = 0) -> dict[str, torch.Tensor]:
        """Select ``profile``, set every input's shape and address, and the outputs' addresses; outputs not given
        are allocated at the shapes the context infers from the inputs. Returns the outputs by name."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"no tensor for engine input(s) {', '.join(missing)}")
        if self._profile != profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        for name in self.inputs:
            t = feeds[name]
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise BackendUnavailable(f"input {name} of shape {tuple(t.shape)} is outside optimization profile "
                                         f"{profile} of the engine; rebuild with wider profiles (python -m export.build)")
            self.context.set_tensor_address(name, t.data_ptr())
        outputs = dict(outputs or {})
        for name in self.outputs:
            if name not in outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT could not infer the shape of output {name} ({shape})")
                outputs[name] = torch.empty(shape, dtype=self.torch_dtype(name), device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def run(self, feeds: dict, outputs: dict | None = None, profile: int = 0) -> dict[str, torch.Tensor]:
        """Bind and enqueue once on the engine's stream (the caller's stream waits for it); returns the outputs."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        outputs = self.bind(feeds, outputs, profile)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outputs

    def capture(self, key, feeds: dict, outputs: dict, profile: int = 0):
        """Capture one enqueue into a CUDA graph for these persistent buffers (one warm-up run first)."""
        self.run(feeds, outputs, profile)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed during capture")
        self._graphs[key] = graph
        return graph

    def replay(self, key) -> None:
        """Replay the graph captured for ``key`` on the engine's stream, ordered after and before the caller's."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            self._graphs[key].replay()
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def load_engine(folder: Path, manifest: dict, engines_dir: str | Path, rebuild: str, device: torch.device) -> TRTEngine:
    """The engine of a selected ``folder`` (refitted from its ONNX graph when the plan is stripped), its I/O checked
    against the manifest."""
    refit = None
    if manifest.get("flags", {}).get("strip_plan"):  # weights come from the ONNX graph, checked like the plan
        refit = Path(engines_dir) / manifest["onnx_path"]
        check_onnx(refit, engines_dir, {"onnx_sha256": manifest["onnx_sha256"]}, rebuild)
    engine = TRTEngine(import_runtime(manifest["runtime"]), folder / "engine.plan", onnx_for_refit=refit,
                       device=device.index or 0)
    why = io_mismatch(manifest["io"], engine.io())
    if why:
        raise EngineMismatch(f"engine {shown(folder)} does not have the I/O its manifest records ({why}); "
                             f"rebuild with: {rebuild}")
    return engine


# ------------------------------------------------------------------------------------------ the DiT
_INPUTS = ("x", "t_freq") + ClipConditions.names()


class TrtDiT:
    """``forward(x, t_freq, cond) -> velocity`` through ``engine`` (a ``TRTEngine``); ``profiles``: the manifest's
    optimization profiles (``{"batch": {"min", "max"}, "frames": …, "grid_h", "grid_w", "extra"}`` each)."""

    name = "tensorrt"

    def __init__(self, model: WanS2VDiT, engine, profiles: list[dict], folder: Path | str = "engine"):
        self.model, self.engine, self.profiles, self.folder = model, engine, profiles, folder
        self.device = model.patch_embedding.weight.device
        self._buffers: dict[tuple, tuple] = {}

    @classmethod
    def from_engines(cls, model: WanS2VDiT, engines_dir: str | Path, checkpoint: str | None = None,
                     loras=()) -> "TrtDiT":
        device = model.patch_embedding.weight.device
        request = engine_request("dit", "fp16", device, checkpoint)
        request["loras"] = lora.identity(loras)
        rebuild = (f"python -m export.build --precision fp16 --ckpt_dir {shown(checkpoint or 'CKPT')} "
                   f"--out {shown(engines_dir)}"
                   f"{lora.flags(loras)}")
        folder, manifest = select_engine(engines_dir, "dit", request, rebuild)
        return cls(model, load_engine(folder, manifest, engines_dir, rebuild, device), manifest["profiles"], folder)

    def profile_for(self, x: torch.Tensor, cond: ClipConditions) -> int:
        """The first optimization profile whose ranges hold this call's batch, frames, patch grid and extra tokens."""
        b, _, f, h, w = x.shape
        val = {"batch": b, "frames": f, "grid_h": h // 2, "grid_w": w // 2, "extra": cond.extra.shape[1]}
        for i, p in enumerate(self.profiles):
            if all(p[k]["min"] <= v <= p[k]["max"] for k, v in val.items()):
                return i
        raise BackendUnavailable(f"shape {val} is outside every profile of engine {self.folder}; rebuild with wider "
                                 "profiles (python -m export.build)")

    def buffers(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> tuple[StaticInputs, dict]:
        """Persistent inputs (in the engine's input dtypes) and the velocity buffer for one shape."""
        static = StaticInputs(x, t_freq, cond, [self.engine.torch_dtype(n) for n in _INPUTS])
        b, _, f, h, w = x.shape
        out = {"velocity": torch.empty((b, self.model.cfg.out_dim, f, h, w), device=self.device, dtype=torch.float32)}
        return static, out

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> torch.Tensor:
        key = shape_key(x, t_freq, cond)
        if key not in self._buffers:
            profile = self.profile_for(x, cond)  # before any allocation: a shape outside is refused at once
            static, out = self.buffers(x, t_freq, cond)
            self.engine.capture(key, dict(zip(_INPUTS, static.tensors)), out, profile=profile)
            self._buffers[key] = (static, out)
        static, out = self._buffers[key]
        static.load(x, t_freq, cond)
        self.engine.replay(key)
        return out["velocity"].clone()


# ------------------------------------------------------------------------------------------ the VAE
class EngineGraph:
    """One VAE graph as a callable over a ``TRTEngine`` with one profile of pixel ``height``/``width`` ranges."""

    def __init__(self, engine, profile: dict, name: str):
        self.engine, self.profile, self.name = engine, profile, name

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        first = tensors[0]
        scale = 8 if self.engine.inputs[0] == "z" else 1  # latents are 1/8 of the pixel size
        size = {"height": first.shape[-2] * scale, "width": first.shape[-1] * scale}
        for k, v in size.items():
            r = self.profile[k]
            if not r["min"] <= v <= r["max"]:
                raise BackendUnavailable(f"{k} {v} is outside the VAE engine {self.name}'s profile "
                                         f"({r['min']}-{r['max']}); rebuild the engines for this size (python -m export.build)")
        outputs = self.engine.run(self.engine.prepare(tensors))
        return [outputs[n] for n in self.engine.outputs]


def trt_vae(vae, engines_dir: str | Path, checkpoint: str | None = None) -> GraphVAE:
    """The VAE over its four FP32 engines (built by ``export.build`` with the DiT's)."""
    device = vae.conv2.weight.device
    rebuild = (f"python -m export.build --ckpt_dir {shown(checkpoint or 'CKPT')} --out {shown(engines_dir)} "
               "--components vae")
    graphs = {}
    for name in VAE_GRAPHS:
        component = f"vae_{name}"
        folder, manifest = select_engine(engines_dir, component, engine_request(component, "fp32", device, checkpoint),
                                         rebuild)
        graphs[name] = EngineGraph(load_engine(folder, manifest, engines_dir, rebuild, device), manifest["profiles"][0],
                                   component)
    return GraphVAE(vae, graphs, "tensorrt")
