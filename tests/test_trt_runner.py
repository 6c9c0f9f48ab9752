"""The TensorRT runner's CPU-side logic, with fake engines (no TensorRT engine can run without a GPU here).

Every ``Fake*`` object below stands in for TensorRT or for a GPU: ``FakeTensorRT`` is a module-shaped stand-in for
``tensorrt`` whose "engine" only records what the runner binds; ``FakeExecution`` engines compute their outputs
with the PyTorch model so the runner's buffers, input order and loops can be compared with PyTorch. Nothing here
says anything about a real engine's numbers; those are checked on a GPU (tests/test_export.py).
"""
from __future__ import annotations

import pytest
import torch

from runtime.backends.trt_backend import _INPUTS, EngineGraph, TrtDiT, TRTEngine
from runtime.backends.vae_graphs import VAE_GRAPHS, GraphVAE
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.tiny import tiny_dit, tiny_vae
from tests.conftest import step_inputs


# ------------------------------------------------------------------------------------------ fakes
class FakeDataType:
    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return f"DataType.{self.name}"


class FakeStream:
    cuda_stream = 0


class FakeContext:
    """Records the profile, input shapes and addresses; infers output shapes with the engine's rule."""

    def __init__(self, engine: "FakeCudaEngine"):
        self.engine, self.profile, self.shapes, self.addresses, self.profile_calls = engine, None, {}, {}, 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile, self.profile_calls = index, self.profile_calls + 1
        return True

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        lo, hi = self.engine.profiles[self.profile][name]
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.engine.rule(name, self.shapes)


class FakeCudaEngine:
    def __init__(self, tensors, rule, profiles):
        self.tensors, self.rule, self.profiles = tensors, rule, profiles  # tensors: (name, mode, dtype, shape)
        self.num_io_tensors = len(tensors)
        self.context = None

    def _get(self, name):
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def get_tensor_mode(self, name):
        return self._get(name)[1]

    def get_tensor_dtype(self, name):
        return FakeDataType(self._get(name)[2])

    def get_tensor_shape(self, name):
        return self._get(name)[3]

    def create_execution_context(self):
        self.context = FakeContext(self)
        return self.context


class FakeTensorRT:
    """Module-shaped stand-in for ``tensorrt``: ``Runtime(...).deserialize_cuda_engine`` returns ``engine`` (None:
    a plan the runtime refuses)."""

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class TensorIOMode:
        INPUT, OUTPUT = "INPUT", "OUTPUT"

    def __init__(self, engine: FakeCudaEngine | None):
        fake = self

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan: bytes):
                fake.plan = plan
                return engine

        self.Runtime = Runtime


IN, OUT = FakeTensorRT.TensorIOMode.INPUT, FakeTensorRT.TensorIOMode.OUTPUT


def two_input_engine(tmp_path, profiles=None):
    """x [B, 4, N] float32 and scale [B] half → y [B, 4, N] float32, z [B] half (N dynamic)."""
    tensors = [("x", IN, "FLOAT", [-1, 4, -1]), ("scale", IN, "HALF", [-1]),
               ("y", OUT, "FLOAT", [-1, 4, -1]), ("z", OUT, "HALF", [-1])]

    def rule(name, shapes):
        return shapes["x"] if name == "y" else shapes["scale"]

    profiles = profiles or [{"x": ((1, 4, 1), (2, 4, 8)), "scale": ((1,), (2,))},
                            {"x": ((1, 4, 9), (2, 4, 64)), "scale": ((1,), (2,))}]
    fake = FakeCudaEngine(tensors, rule, profiles)
    (tmp_path / "engine.plan").write_bytes(b"fake plan")
    return TRTEngine(FakeTensorRT(fake), tmp_path / "engine.plan", device="cpu", stream=FakeStream()), fake


# ------------------------------------------------------------------------------------------ TRTEngine
def test_runner_reads_binding_names_dtypes_and_shapes(tmp_path):
    engine, _ = two_input_engine(tmp_path)
    assert engine.inputs == ["x", "scale"] and engine.outputs == ["y", "z"]
    assert engine.io() == {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4, -1]},
                                      {"name": "scale", "dtype": "float16", "shape": [-1]}],
                           "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4, -1]},
                                       {"name": "z", "dtype": "float16", "shape": [-1]}]}
    assert engine.torch_dtype("scale") == torch.float16 and engine.torch_dtype("y") == torch.float32


def test_runner_prepares_inputs_in_the_engine_dtypes(tmp_path):
    engine, _ = two_input_engine(tmp_path)
    x = torch.randn(5, 4, 2).transpose(0, 2)          # [2, 4, 5], not contiguous
    scale = torch.tensor([0.1, 3.0], dtype=torch.float64)
    feeds = engine.prepare([x, scale])
    assert list(feeds) == ["x", "scale"]
    assert feeds["x"].is_contiguous() and feeds["x"].dtype == torch.float32 and torch.equal(feeds["x"], x)
    assert feeds["scale"].dtype == torch.float16 and torch.equal(feeds["scale"], scale.half())
    ready = torch.randn(1, 4, 3)
    assert engine.prepare([ready, torch.ones(1, dtype=torch.float16)])["x"] is ready  # no copy when already right
    with pytest.raises(ValueError, match="takes 2 inputs"):
        engine.prepare([x])


def test_runner_binds_shapes_addresses_and_allocates_outputs(tmp_path):
    engine, fake = two_input_engine(tmp_path)
    feeds = engine.prepare([torch.randn(2, 4, 6), torch.ones(2)])
    outputs = engine.bind(feeds, profile=0)
    ctx = fake.context
    assert ctx.profile == 0 and ctx.shapes == {"x": (2, 4, 6), "scale": (2,)}
    assert outputs["y"].shape == (2, 4, 6) and outputs["y"].dtype == torch.float32
    assert outputs["z"].shape == (2,) and outputs["z"].dtype == torch.float16
    assert ctx.addresses == {"x": feeds["x"].data_ptr(), "scale": feeds["scale"].data_ptr(),
                             "y": outputs["y"].data_ptr(), "z": outputs["z"].data_ptr()}
    given = {"y": torch.empty(2, 4, 6)}                 # a persistent output buffer is bound, not replaced
    out2 = engine.bind(feeds, given, profile=0)
    assert out2["y"] is given["y"] and ctx.addresses["y"] == given["y"].data_ptr() and ctx.profile_calls == 1
    engine.bind(engine.prepare([torch.randn(1, 4, 20), torch.ones(1)]), profile=1)  # switching profile: once
    assert ctx.profile == 1 and ctx.profile_calls == 2 and ctx.shapes["x"] == (1, 4, 20)
    with pytest.raises(ValueError, match="no tensor for engine input"):
        engine.bind({"x": feeds["x"]})


def test_runner_refuses_a_shape_outside_the_profile_in_one_line(tmp_path):
    engine, _ = two_input_engine(tmp_path)
    with pytest.raises(BackendUnavailable, match=r"input x of shape \(2, 4, 30\) is outside optimization profile 0") as err:
        engine.bind(engine.prepare([torch.randn(2, 4, 30), torch.ones(2)]), profile=0)
    assert "\n" not in str(err.value) and "export.build" in str(err.value)


def test_a_plan_the_runtime_refuses_is_one_line_naming_it(tmp_path):
    (tmp_path / "engine.plan").write_bytes(b"not a plan")
    with pytest.raises(EngineMismatch, match=r"engine\.plan: the TensorRT runtime could not deserialize") as err:
        TRTEngine(FakeTensorRT(None), tmp_path / "engine.plan", device="cpu", stream=FakeStream())
    assert "\n" not in str(err.value) and "python -m export.build" in str(err.value)


# ------------------------------------------------------------------------------------------ TrtDiT
class FakeExecutionDiTEngine:
    """Stands in for a DiT ``TRTEngine`` on the CPU: the real engine's input dtypes (FP16 activations), ``capture``
    keeps the bound buffers, ``replay`` writes ``model.step`` of those buffers into the bound velocity."""

    inputs = list(_INPUTS)
    outputs = ["velocity"]
    HALF = {"context", "audio_tokens", "pose", "extra"}

    def __init__(self, model):
        self.model, self.captured, self.replays = model, {}, 0

    def torch_dtype(self, name):
        return torch.float16 if name in self.HALF else torch.float32

    def capture(self, key, feeds, outputs, profile=0):
        assert list(feeds) == list(_INPUTS)
        self.captured[key] = (feeds, outputs, profile)

    def replay(self, key):
        feeds, outputs, _ = self.captured[key]
        self.replays += 1
        outputs["velocity"].copy_(self.model.step(*(feeds[n].float() for n in _INPUTS)))


def dit_profiles(later_extra_min: int):
    def r(lo, hi):
        return {"min": lo, "opt": hi, "max": hi}
    first = {"batch": r(1, 2), "frames": r(1, 8), "grid_h": r(1, 16), "grid_w": r(1, 16), "extra": r(1, later_extra_min - 1)}
    later = {**first, "extra": r(later_extra_min, 10_000)}
    return [first, later]


def test_trt_dit_selects_the_profile_and_binds_persistent_inputs_in_engine_dtypes():
    model = tiny_dit()
    x, t, cond = step_inputs(model, 3, 8, 12, motion=True, batch=2, seed=1)
    x1, t1, cond1 = step_inputs(model, 3, 8, 12, motion=False, batch=1, seed=2)
    assert cond1.extra.shape[1] < cond.extra.shape[1]
    engine = FakeExecutionDiTEngine(model)
    dit = TrtDiT(model, engine, dit_profiles(cond.extra.shape[1]))
    assert dit.profile_for(x1, cond1) == 0 and dit.profile_for(x, cond) == 1

    static, out = dit.buffers(x, t, cond)
    assert [b.dtype for b in static.tensors] == [engine.torch_dtype(n) for n in _INPUTS]
    assert out["velocity"].shape == (2, model.cfg.out_dim, 3, 8, 12) and out["velocity"].dtype == torch.float32

    def expected(x, t, cond):  # the engine computes on the FP16-rounded activations it is given
        return model.step(x, t, *(c.half().float() if n in engine.HALF else c for n, c in zip(_INPUTS[2:], cond.as_tuple())))

    v = dit.forward(x, t, cond)
    torch.testing.assert_close(v, expected(x, t, cond), rtol=0, atol=0)
    x2 = torch.randn_like(x)
    v2 = dit.forward(x2, t, cond)                      # same shape: no new capture, the new x is loaded
    torch.testing.assert_close(v2, expected(x2, t, cond), rtol=0, atol=0)
    assert len(engine.captured) == 1 and engine.replays == 2 and not torch.equal(v, v2)
    assert v.data_ptr() != v2.data_ptr()               # results are copies, not the bound buffer
    dit.forward(x1, t1, cond1)                         # another shape: its own buffers, the first-clip profile
    assert len(engine.captured) == 2 and [p for *_, p in engine.captured.values()] == [1, 0]


def test_trt_dit_refuses_a_shape_outside_every_profile_before_allocating():
    model = tiny_dit()
    x, t, cond = step_inputs(model, 3, 8, 12, motion=True, batch=1)
    engine = FakeExecutionDiTEngine(model)
    profiles = dit_profiles(cond.extra.shape[1])
    profiles[1]["grid_w"] = {"min": 1, "opt": 4, "max": 4}
    with pytest.raises(BackendUnavailable, match=r"'grid_w': 6, 'extra': \d+\} is outside every profile of engine engines/dit/abc"
                       ) as err:
        TrtDiT(model, engine, profiles, folder="engines/dit/abc").forward(x, t, cond)
    assert "\n" not in str(err.value) and not engine.captured


# ------------------------------------------------------------------------------------------ the VAE engines
class FakeExecutionVAEEngine:
    """Stands in for one VAE ``TRTEngine``: the real input/output names; ``run`` computes the PyTorch VAE's chunk
    function on the prepared inputs."""

    def __init__(self, vae, graph: str):
        self.vae, self.graph, self.runs = vae, graph, []
        n_in = {"decoder_first": 1, "encoder_first": 1}.get(graph, 33 if graph == "decoder_step" else 25)
        first = "z" if graph.startswith("decoder") else "video"
        self.inputs = [first] + [f"cache_{i}" for i in range(n_in - 1)]
        n_cache = 32 if graph.startswith("decoder") else 24
        self.outputs = ["video" if first == "z" else "z"] + [f"new_cache_{i}" for i in range(n_cache)]

    def prepare(self, tensors):
        return dict(zip(self.inputs, (t.float().contiguous() for t in tensors)))

    def run(self, feeds, outputs=None, profile=0):
        self.runs.append({k: tuple(v.shape) for k, v in feeds.items()})
        args = [feeds[n] for n in self.inputs]
        fn = getattr(self.vae, self.graph.replace("decoder", "decode").replace("encoder", "encode"))
        out, caches = fn(args[0], args[1:]) if self.graph.endswith("step") else fn(args[0])
        return dict(zip(self.outputs, (out, *caches)))


def vae_profile(lo=32, hi=256):
    return {"height": {"min": lo, "opt": 64, "max": hi}, "width": {"min": lo, "opt": 64, "max": hi}}


def test_vae_engine_graphs_run_the_chunk_loop_like_the_pytorch_vae():
    vae = tiny_vae()
    engines = {g: FakeExecutionVAEEngine(vae, g) for g in VAE_GRAPHS}
    graphs = GraphVAE(vae, {g: EngineGraph(e, vae_profile(), f"vae_{g}") for g, e in engines.items()}, "tensorrt")
    z = torch.randn(1, 16, 3, 4, 6)
    torch.testing.assert_close(graphs.decode(z), vae.decode_chunked(z), rtol=0, atol=0)
    assert len(engines["decoder_first"].runs) == 1 and len(engines["decoder_step"].runs) == 2
    assert engines["decoder_step"].runs[0]["z"] == (1, 16, 1, 4, 6)  # one latent per step, caches carried
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    torch.testing.assert_close(graphs.encode(video), vae.encode_chunked(video), rtol=0, atol=0)
    assert [r["video"][2] for r in engines["encoder_first"].runs + engines["encoder_step"].runs] == [1, 4, 4]


def test_vae_engine_refuses_a_size_outside_its_profile_in_one_line():
    vae = tiny_vae()
    graph = EngineGraph(FakeExecutionVAEEngine(vae, "decoder_first"), vae_profile(hi=128), "vae_decoder_first")
    with pytest.raises(BackendUnavailable, match=r"width 192 is outside the VAE engine vae_decoder_first's profile "
                                                 r"\(32-128\)") as err:
        graph(torch.randn(1, 16, 1, 8, 24))  # latents: 8 × the latent width in pixels
    assert "\n" not in str(err.value)
    graph(torch.randn(1, 16, 1, 8, 16))
