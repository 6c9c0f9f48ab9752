"""TensorRT at run time: which runtime is importable, whether it runs on this GPU, and the engine runner.

Two runtimes load the same kind of plan file through the same Python API: TensorRT 10.x/11.x (module
``tensorrt``) and TensorRT-RTX (module ``tensorrt_rtx_bindings``, PyPI ``tensorrt-rtx-cu13-*``). A plan only
loads in the runtime (and version) that built it; the manifest says which. Both are imported lazily.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from runtime.errors import BackendUnavailable, EngineMismatch

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
INSTALL = {"tensorrt": "pip install tensorrt-cu13 (TensorRT >= 10.15 or 11.x, from NVIDIA's package index)",
           "tensorrt-rtx": 'pip install -e ".[rtx]" (TensorRT-RTX, from PyPI)'}
# The GPUs TensorRT-RTX targets (its ComputeCapability enum: SM75 … SM121); it refuses 9.0 and 10.x
# (H100/H200, B200/B300), where TensorRT 10/11 is the runtime to use.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
          "INT8": "int8", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8e4m3fn"}


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


class TRTEngine:
    """One engine, one execution context, torch tensors as I/O, optional CUDA-graph capture per shape."""

    def __init__(self, trt, plan_path: str | Path, onnx_for_refit: str | Path | None = None, device: int = 0):
        import torch

        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineMismatch(f"{plan_path}: the TensorRT runtime could not deserialize the engine (see the log "
                                 "above); rebuild with: python -m export.build")
        if onnx_for_refit is not None:  # stripped plan: put the weights back from the ONNX we already keep
            refitter = trt.Refitter(self.engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(onnx_for_refit)):
                raise EngineMismatch(f"refit of {plan_path} from {onnx_for_refit} failed; rebuild with: python -m export.build")
            if not refitter.refit_cuda_engine():
                raise EngineMismatch(f"refit of {plan_path} failed; rebuild with: python -m export.build")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=device)
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

    def torch_dtype(self, name: str):
        t = self.torch
        return {"float32": t.float32, "float16": t.float16, "bfloat16": t.bfloat16, "int64": t.int64,
                "int32": t.int32}[dtype_name(self.trt, self.engine.get_tensor_dtype(name))]

    def _bind(self, feeds: dict, outputs: dict, profile: int) -> None:
        if self._profile != profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        for name in self.inputs:
            t = feeds[name]
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        for name in self.outputs:
            self.context.set_tensor_address(name, outputs[name].data_ptr())

    def run(self, feeds: dict, outputs: dict, profile: int = 0) -> None:
        """Enqueue once on the engine's stream (the caller's stream waits for it)."""
        torch = self.torch
        self.stream.wait_stream(torch.cuda.current_stream())
        self._bind(feeds, outputs, profile)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, key, feeds: dict, outputs: dict, profile: int = 0):
        """Capture one enqueue into a CUDA graph for these persistent buffers (one warm-up run first)."""
        torch = self.torch
        self.run(feeds, outputs, profile)
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed during capture")
        self._graphs[key] = graph
        return graph

    def replay(self, key) -> None:
        self._graphs[key].replay()
