"""ONNX Runtime backends: the exported FP16 DiT graph (CUDA EP with IO binding and CUDA graphs on a GPU) and the
four FP32 VAE graphs in the chunk loop of ``GraphVAE``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from runtime import lora
from runtime.backends.static_inputs import StaticInputs, shape_key
from runtime.backends.vae_graphs import VAE_GRAPHS, GraphVAE
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.manifest import check_onnx, checkpoint_identity, io_mismatch
from runtime.models.dit import ClipConditions, WanS2VDiT
from runtime.quoting import shown

_ORT_TO_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
                 "tensor(int64)": torch.int64}
_TORCH_TO_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
_ORT_TO_NAME = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
                "tensor(int64)": "int64", "tensor(int32)": "int32"}


def onnx_path_in(engines_dir: str | Path) -> Path:
    return Path(engines_dir) / "onnx" / "dit" / "model.onnx"


def vae_onnx_path_in(engines_dir: str | Path, graph: str) -> Path:
    return Path(engines_dir) / "onnx" / "vae" / f"{graph}.onnx"


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("backend onnxruntime needs the onnxruntime package (onnxruntime-gpu on a GPU); "
                                 "pip install onnxruntime-gpu") from None
    return ort


def open_session(path: str | Path, device: torch.device, cuda_graph: bool = False, optimize: bool = True,
                 rebuild: str = "python -m export.build"):
    """An ONNX Runtime session on ``path`` for ``device``; a graph ONNX Runtime refuses (corrupt, unsupported op,
    missing external data) is one line naming the file and the re-export command."""
    ort = import_ort()
    opts = ort.SessionOptions()
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable("backend onnxruntime on a GPU needs onnxruntime-gpu with the CUDA execution "
                                     "provider; pip install onnxruntime-gpu")
        providers = [("CUDAExecutionProvider", {"device_id": str(device.index or 0),
                                                "enable_cuda_graph": "1" if cuda_graph else "0"}),
                     "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as err:  # onnxruntime's own Fail/InvalidGraph/InvalidProtobuf/… (pybind classes), or OSError
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise EngineMismatch(f"{shown(path)}: ONNX Runtime could not load the graph ({type(err).__name__}: {why}); "
                             f"re-export with: {rebuild}") from None


def session_io(session) -> dict:
    """Names, dtypes and shapes (-1 = dynamic) of a session's inputs and outputs."""
    def entry(a):
        return {"name": a.name, "dtype": _ORT_TO_NAME.get(a.type, a.type),
                "shape": [d if isinstance(d, int) else -1 for d in a.shape]}
    return {"inputs": [entry(a) for a in session.get_inputs()], "outputs": [entry(a) for a in session.get_outputs()]}


class OrtDiT:
    name = "onnxruntime"

    def __init__(self, model: WanS2VDiT, onnx_path: str | Path, cuda_graph: bool = True, optimize: bool = True,
                 rebuild: str = "python -m export.build"):
        self.model = model
        self.device = model.patch_embedding.weight.device
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.session = open_session(onnx_path, self.device, self.cuda_graph, optimize, rebuild)
        self.inputs = [(i.name, _ORT_TO_TORCH[i.type]) for i in self.session.get_inputs()]
        self.output = self.session.get_outputs()[0].name
        self._bindings: dict[tuple, tuple] = {}
        self._ort = import_ort()

    @classmethod
    def from_engines(cls, model: WanS2VDiT, engines_dir: str | Path, checkpoint: str | None = None,
                     loras=()) -> "OrtDiT":
        path = onnx_path_in(engines_dir)
        rebuild = (f"python -m export.build --precision fp16 --ckpt_dir {shown(checkpoint or 'CKPT')} "
                   f"--out {shown(engines_dir)} "
                   f"--onnx-only --components dit{lora.flags(loras)}")
        if not path.is_file():
            raise BackendUnavailable(f"no exported DiT at {shown(path)}; export it with: {rebuild}")
        request = {"kind": "onnx", "component": "dit", "precision": "fp16"}
        if checkpoint:
            request["checkpoint"] = checkpoint_identity(checkpoint)
        request["loras"] = lora.identity(loras)
        manifest = check_onnx(path, engines_dir, request, rebuild)  # before the session reads the file
        backend = cls(model, path, rebuild=rebuild)
        why = io_mismatch(manifest["io"], backend.io())
        if why:
            raise EngineMismatch(f"{shown(path)}: the graph does not have the I/O its manifest records ({why}); "
                                 f"re-export with: {rebuild}")
        return backend

    def io(self) -> dict:
        """Names, dtypes and shapes (-1 = dynamic) of the session's inputs and outputs."""
        return session_io(self.session)

    def forward(self, x: torch.Tensor, t_freq: torch.Tensor, cond: ClipConditions) -> torch.Tensor:
        dtypes = [dt for _, dt in self.inputs]
        if self.device.type != "cuda":
            feeds = [t.to(dt).contiguous().numpy() for t, dt in zip((x, t_freq, *cond.as_tuple()), dtypes)]
            out = self.session.run([self.output], {n: f for (n, _), f in zip(self.inputs, feeds)})[0]
            return torch.from_numpy(out)
        key = shape_key(x, t_freq, cond)
        if key not in self._bindings:
            self._bindings[key] = self._bind(StaticInputs(x, t_freq, cond, dtypes), len(self._bindings) + 1)
        io, static, out, run_opts = self._bindings[key]
        static.load(x, t_freq, cond)  # the bound (and captured) addresses stay the same
        torch.cuda.synchronize(self.device)  # ORT runs on its own stream: the inputs must be written
        self.session.run_with_iobinding(io, run_opts)
        return out.clone()

    def _bind(self, static: StaticInputs, graph_id: int):
        b, _, f, h, w = static.tensors[0].shape
        out = torch.empty((b, self.model.cfg.out_dim, f, h, w), dtype=torch.float32, device=self.device)
        io = self.session.io_binding()
        idx = self.device.index or 0
        for (name, dtype), t in zip(self.inputs, static.tensors):
            io.bind_input(name, "cuda", idx, _TORCH_TO_NP[dtype], tuple(t.shape), t.data_ptr())
        io.bind_output(self.output, "cuda", idx, np.float32, tuple(out.shape), out.data_ptr())
        run_opts = self._ort.RunOptions()
        if self.cuda_graph:
            run_opts.add_run_config_entry("gpu_graph_id", str(graph_id))
        return io, static, out, run_opts


# ------------------------------------------------------------------------------------------ the VAE
class SessionGraph:
    """One VAE graph as a callable over an ONNX Runtime session: tensors in, float32 tensors on ``device`` out.

    On a GPU the tensors pass through host memory (the VAE graphs run a few dozen times per clip; IO binding as
    in ``OrtDiT`` would need every output shape ahead of the call)."""

    def __init__(self, session, device: torch.device):
        self.session, self.device = session, device
        self.names = [i.name for i in session.get_inputs()]

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: t.detach().to("cpu", torch.float32).contiguous().numpy() for n, t in zip(self.names, tensors)}
        return [torch.from_numpy(o).to(self.device) for o in self.session.run(None, feeds)]


def ort_vae(vae, engines_dir: str | Path, checkpoint: str | None = None) -> GraphVAE:
    """The VAE over its four exported FP32 graphs, each checked against its manifest before a session opens."""
    device = vae.conv2.weight.device
    rebuild = (f"python -m export.build --ckpt_dir {shown(checkpoint or 'CKPT')} --out {shown(engines_dir)} "
               "--onnx-only "
               "--components vae")
    graphs = {}
    for name in VAE_GRAPHS:
        path = vae_onnx_path_in(engines_dir, name)
        if not path.is_file():
            raise BackendUnavailable(f"no exported VAE graph at {shown(path)}; export it with: {rebuild}")
        request = {"kind": "onnx", "component": f"vae_{name}", "precision": "fp32"}
        if checkpoint:
            request["checkpoint"] = checkpoint_identity(checkpoint)
        manifest = check_onnx(path, engines_dir, request, rebuild)
        session = open_session(path, device, rebuild=rebuild)
        why = io_mismatch(manifest["io"], session_io(session))
        if why:
            raise EngineMismatch(f"{shown(path)}: the graph does not have the I/O its manifest records ({why}); "
                                 f"re-export with: {rebuild}")
        graphs[name] = SessionGraph(session, device)
    return GraphVAE(vae, graphs, "onnxruntime")
