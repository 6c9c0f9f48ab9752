"""Thin TensorRT wrapper: build (strongly typed, profiles, timing cache), load, run, capture.

Written against the documented Python API of TensorRT 10.x (10.14+, for the ONNX ``Attention`` and
``RMSNormalization`` ops) and 11.x. ``tensorrt`` is imported lazily; without it, ``available()`` says why
and callers stop with one line instead of a traceback. Nothing here fakes a result.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from runtime.errors import BackendUnavailable

INSTALL_HINT = "pip install tensorrt-cu13 (TensorRT >= 10.15 or 11.x, from NVIDIA's package index)"


def import_trt():
    try:
        import tensorrt as trt  # noqa: F401
    except Exception as err:  # ImportError, or the PyPI stub failing to fetch its libraries
        raise BackendUnavailable(f"TensorRT is not importable here ({type(err).__name__}); install it with: {INSTALL_HINT}") from None
    return trt


def available() -> tuple[bool, str]:
    try:
        trt = import_trt()
    except BackendUnavailable as err:
        return False, str(err)
    return True, f"TensorRT {trt.__version__}"


def major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _network_flags(trt) -> int:
    # TensorRT 11 networks are always strongly typed; on 10.x ask for it so FP16 comes from the ONNX casts.
    if major(trt) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def build_engine(onnx_path: str | Path, plan_path: str | Path, profiles: list[dict[str, tuple]], *,
                 opt_level: int = 3, timing_cache: str | Path | None = None, tf32: bool | None = None,
                 strip_plan: bool = False, workspace_gib: float | None = None, log_level: str = "WARNING") -> dict:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path`` (atomically).

    profiles: one dict per optimization profile, ``input name -> (min, opt, max) shape``.
    tf32: for FP32 graphs (the VAE) say explicitly whether TF32 tensor cores may be used (None keeps
    TensorRT's default, which is on). strip_plan: weights are left out of the plan (REFIT_IDENTICAL +
    STRIP_PLAN) and refitted from the ONNX at load time, so they are stored once.
    """
    trt = import_trt()
    logger = trt.Logger(getattr(trt.Logger, log_level))
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the graph
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: " + " | ".join(errors[:3]))
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if tf32 is not None:
        (config.set_flag if tf32 else config.clear_flag)(trt.BuilderFlag.TF32)
    if strip_plan:
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    config.max_aux_streams = 0  # one stream: simplest to capture in a CUDA graph, lowest memory
    for shapes in profiles:
        prof = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            prof.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(prof)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    build_s = time.perf_counter() - t0
    plan_path = Path(plan_path)
    tmp = plan_path.with_name(f".{plan_path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            fh.write(memoryview(plan))
        os.replace(tmp, plan_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if timing_cache:
        serialized = config.get_timing_cache().serialize()
        tc = Path(timing_cache)
        tmp = tc.with_name(f".{tc.name}.partial")
        tmp.write_bytes(memoryview(serialized))
        os.replace(tmp, tc)
    return {"build_s": round(build_s, 1), "plan_bytes": plan_path.stat().st_size, "tensorrt_version": trt.__version__}


class TRTEngine:
    """One engine, one execution context, torch tensors as I/O, optional CUDA-graph capture per shape."""

    def __init__(self, plan_path: str | Path, onnx_for_refit: str | Path | None = None, device: int = 0):
        import torch

        trt = import_trt()
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self.logger)
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: TensorRT could not deserialize the engine")
        if onnx_for_refit is not None:  # stripped plan: put the weights back from the ONNX we already keep
            refitter = trt.Refitter(self.engine, self.logger)
            if not trt.OnnxParserRefitter(refitter, self.logger).refit_from_file(str(onnx_for_refit)):
                raise RuntimeError(f"refit from {onnx_for_refit} failed")
            if not refitter.refit_cuda_engine():
                raise RuntimeError("refit_cuda_engine failed")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=device)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._graphs: dict = {}
        self._profile = None

    def torch_dtype(self, name: str):
        t, trt = self.torch, self.trt
        return {trt.DataType.FLOAT: t.float32, trt.DataType.HALF: t.float16, trt.DataType.BF16: t.bfloat16,
                trt.DataType.INT64: t.int64, trt.DataType.INT32: t.int32}[self.engine.get_tensor_dtype(name)]

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
