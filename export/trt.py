"""Engine builder for TensorRT 10.x/11.x (``tensorrt``) and TensorRT-RTX (``tensorrt_rtx_bindings``).

Both expose the same builder API; what differs sits in ``Flavor``:

- TensorRT 10/11 builds for the GPU it runs on (no GPU, no build), is asked for STRONGLY_TYPED on 10.x
  (11.x is always strongly typed) and keeps a timing cache between builds;
- TensorRT-RTX builds ahead of time, even on a machine without a GPU, for a list of compute capabilities
  (``set_compute_capability``; kernels are specialised on the target GPU at first run), is strongly typed,
  and has no timing cache (its timing-cache calls are no-ops).

The parser must take every node (``parse_from_file`` fails on the first unsupported one; its errors name
them), and the network's I/O is recorded so the manifest, the ONNX graph and the loaded engine can be compared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from export.files import read_regular, write_bytes
from runtime.errors import BackendUnavailable, ConfigError
from runtime.quoting import shown
from runtime.backends.trt_backend import INSTALL, MODULES, RTX_COMPUTE_CAPABILITIES, dtype_name, import_runtime

CHOICES = ("auto", "tensorrt", "tensorrt-rtx")


@dataclass
class Flavor:
    name: str          # "tensorrt" or "tensorrt-rtx"
    trt: object        # the imported module

    @property
    def version(self) -> str:
        return self.trt.__version__

    @property
    def rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def timing_cache(self) -> bool:
        return not self.rtx

    def network_flags(self) -> int:
        if self.rtx or int(self.version.split(".")[0]) >= 11:
            return 0  # strongly typed already: FP16 comes from the ONNX casts
        return 1 << int(self.trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)

    def set_targets(self, config, targets: list[str]) -> None:
        if not self.rtx:
            return  # TensorRT 10/11: the current GPU (checked by ``targets``)
        enum = self.trt.ComputeCapability
        config.num_compute_capabilities = len(targets)
        for i, cc in enumerate(targets):
            config.set_compute_capability(getattr(enum, "SM" + cc.replace(".", "")), i)


def select_flavor(choice: str = "auto") -> Flavor:
    """The runtime to build with: ``auto`` takes TensorRT 10/11 if importable, else TensorRT-RTX."""
    if choice not in CHOICES:
        raise ConfigError(f"--trt {choice!r}: choose one of {', '.join(CHOICES)}")
    names = ("tensorrt", "tensorrt-rtx") if choice == "auto" else (choice,)
    errors = []
    for name in names:
        try:
            return Flavor(name, import_runtime(name))
        except BackendUnavailable as err:
            errors.append(err)
    if choice == "auto":
        raise BackendUnavailable(f"neither TensorRT nor TensorRT-RTX is importable here; install one with: "
                                 f"{INSTALL['tensorrt-rtx']}, or {INSTALL['tensorrt']}")
    raise errors[0]


def available(choice: str = "auto") -> tuple[bool, str]:
    try:
        f = select_flavor(choice)
    except BackendUnavailable as err:
        return False, str(err)
    return True, f"{f.name} {f.version}"


def targets(flavor: Flavor, requested: str | None, gpu_cc: str | None) -> list[str]:
    """Compute capabilities to build for: ``requested`` ("8.6,8.9,12.0"), else the current GPU, else (RTX on a
    machine without a GPU) every consumer/workstation generation TensorRT-RTX runs on from Ampere on."""
    if requested:
        ccs = [c.strip() for c in requested.split(",") if c.strip()]
    elif gpu_cc:
        ccs = [gpu_cc]
    elif flavor.rtx:
        ccs = ["8.0", "8.6", "8.9", "12.0"]
    else:
        raise BackendUnavailable("TensorRT 10/11 builds engines only on the GPU they will run on and no GPU is "
                                 "visible here; build on the target GPU, or use --trt tensorrt-rtx "
                                 "--compute-capability 8.6,8.9,12.0")
    if flavor.rtx:
        bad = [c for c in ccs if c not in RTX_COMPUTE_CAPABILITIES]
        if bad:
            raise ConfigError(f"--compute-capability {','.join(bad)}: TensorRT-RTX builds for "
                              f"{', '.join(RTX_COMPUTE_CAPABILITIES)} only (9.0/10.x need --trt tensorrt)")
    elif ccs != [gpu_cc]:
        raise ConfigError(f"--compute-capability {','.join(ccs)}: TensorRT 10/11 builds for the GPU it runs on "
                          f"({gpu_cc or 'none here'}); use --trt tensorrt-rtx to build for other GPUs")
    return ccs


def _io(network, flavor: Flavor) -> dict:
    def entry(t):
        return {"name": t.name, "dtype": dtype_name(flavor.trt, t.dtype), "shape": list(t.shape)}
    return {"inputs": [entry(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [entry(network.get_output(i)) for i in range(network.num_outputs)]}


def parse(flavor: Flavor, onnx_path: str | Path, logger=None):
    """(builder, network, parser) for ``onnx_path``; raises naming the nodes the parser did not take."""
    trt = flavor.trt
    logger = logger or trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(flavor.network_flags())
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))  # resolves external data next to the graph
    if not ok or parser.num_errors:
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name() or e.node()} ({e.node_operator()}): {e.desc()}")
        raise ConfigError(f"{flavor.name} {flavor.version} could not parse {shown(onnx_path)}: " + " | ".join(errors[:3] or ["?"]))
    return builder, network, parser


def build_engine(flavor: Flavor, onnx_path: str | Path, plan_path: str | Path, profiles: list[dict[str, tuple]], *,
                 compute_capabilities: list[str], opt_level: int = 3, timing_cache: str | Path | None = None,
                 tf32: bool | None = None, strip_plan: bool = False, workspace_gib: float | None = None,
                 log_level: str = "ERROR") -> dict:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path`` (atomically); returns build stats and
    the network's I/O.

    profiles: one dict per optimization profile, ``input name -> (min, opt, max) shape``.
    tf32: for FP32 graphs (the VAE) say explicitly whether TF32 tensor cores may be used (None keeps the
    runtime's default). strip_plan: weights are left out of the plan (REFIT_IDENTICAL + STRIP_PLAN) and
    refitted from the ONNX at load time, so they are stored once.
    """
    trt = flavor.trt
    logger = trt.Logger(getattr(trt.Logger, log_level))
    t0 = time.perf_counter()
    builder, network, _parser = parse(flavor, onnx_path, logger)
    parse_s = time.perf_counter() - t0
    config = builder.create_builder_config()
    config.builder_optimization_level = int(opt_level)
    flavor.set_targets(config, compute_capabilities)
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
        if not prof:
            raise ConfigError(f"invalid optimization profile for {shown(onnx_path)}: {shapes}")
        config.add_optimization_profile(prof)
    if flavor.timing_cache and timing_cache:
        cache = config.create_timing_cache(read_regular(timing_cache) or b"")  # a planted symlink is not read
        config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ConfigError(f"{flavor.name} failed to build an engine from {shown(onnx_path)} (see the log above)")
    build_s = time.perf_counter() - t0
    write_bytes(plan_path, plan)
    if flavor.timing_cache and timing_cache:
        write_bytes(timing_cache, config.get_timing_cache().serialize())
    return {"parse_s": round(parse_s, 1), "build_s": round(build_s, 1), "plan_bytes": Path(plan_path).stat().st_size,
            "network_layers": network.num_layers, "io": _io(network, flavor)}


__all__ = ["CHOICES", "Flavor", "MODULES", "available", "build_engine", "parse", "select_flavor", "targets"]
