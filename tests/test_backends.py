"""Every DiT backend agrees with the eager PyTorch reference on the tiny model (where it can run here)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.build import main as build_main
from runtime import S2VPipeline
from runtime.backends import make_backend
from runtime.demo import demo_image, demo_speech
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.models.dit import ClipConditions
from runtime.tiny import tiny_dit
from tests import conftest
from tests.conftest import mean_rel


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    assert build_main(["--ckpt_dir", "tiny", "--out", str(out), "--onnx-only", "--components", "dit,vae"]) == 0
    return out


def step_inputs(model, motion=True, batch=2, seed=0):
    return conftest.step_inputs(model, 3, 8, 12, motion=motion, batch=batch, seed=seed)


@pytest.mark.slow
def test_onnxruntime_backend_matches_torch(engines):
    model = tiny_dit()
    ref, ort_b = make_backend("torch", model), make_backend("onnxruntime", model, engines_dir=str(engines))
    for motion, batch in ((True, 2), (False, 1)):
        x, t, cond = step_inputs(model, motion, batch, seed=batch)
        assert mean_rel(ort_b.forward(x, t, cond).numpy(), ref.forward(x, t, cond).numpy()) <= 1e-2


def record(pipe) -> dict:
    """Spy on a pipeline: every DiT call's inputs and velocity, and the latents handed to the VAE decoder."""
    rec = {"calls": [], "latents": []}
    forward, decode = pipe.backend.forward, pipe.sampler._decode

    def spy_forward(x, t, cond):
        v = forward(x, t, cond)
        rec["calls"].append((x.clone(), t.clone(), cond, v.clone()))
        return v

    def spy_decode(latents):
        rec["latents"].append(latents.clone())
        return decode(latents)

    pipe.backend.forward, pipe.sampler._decode = spy_forward, spy_decode
    return rec


def rel_l2(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.slow
def test_onnxruntime_pipeline_end_to_end(engines):
    """The whole loop through ONNX Runtime (FP16 DiT graph, FP32 VAE graphs) against the float32 PyTorch pipeline.
    Tolerances a real error cannot pass: a 2 % velocity error already moves the tiny clip's latents by 9e-3 rel-L2."""
    from runtime.backends.vae_graphs import GraphVAE

    kw = dict(seed=3, sample_steps=3, infer_frames=16, progress=False)
    torch_pipe = S2VPipeline.from_pretrained("tiny", device="cpu")
    ort_pipe = S2VPipeline.from_pretrained("tiny", device="cpu", backend="onnxruntime", engines_dir=str(engines))
    assert isinstance(ort_pipe.sampler.vae, GraphVAE) and ort_pipe.sampler.vae.name == "onnxruntime"
    ref, got = record(torch_pipe), record(ort_pipe)
    a = torch_pipe.generate(demo_image(), demo_speech(1.0), **kw).frames.astype(np.float64)
    b = ort_pipe.generate(demo_image(), demo_speech(1.0), **kw).frames.astype(np.float64)
    assert a.shape == b.shape and len(got["calls"]) == len(ref["calls"]) == 3
    for x, t, cond, v in got["calls"]:  # each step's velocity against PyTorch on the same inputs (measured 3.3e-4)
        assert mean_rel(v, torch_pipe.backend.forward(x, t, cond)) <= 2e-3
    for la, lb in zip(ref["latents"], got["latents"], strict=True):  # measured 1.8e-4
        assert rel_l2(lb, la) <= 2e-3
    decoded = ort_pipe.sampler.vae.decode(got["latents"][0])  # the VAE graphs alone: FP32, ~1e-6
    assert rel_l2(decoded, torch_pipe.vae.decode(got["latents"][0])) <= 1e-5
    assert np.abs(a - b).mean() < 0.1  # grey levels (measured 0.004; a 10 % velocity error gives 0.8)


@pytest.mark.slow
def test_onnxruntime_vae_graphs_match_the_pytorch_vae(engines):
    """GraphVAE over the four exported FP32 graphs against the PyTorch VAE's whole-sequence encode/decode: a batch
    of two, frames past the last full chunk dropped, and another size than the export's (dynamic height/width)."""
    from runtime.backends import make_vae
    from runtime.tiny import tiny_vae

    vae = tiny_vae()
    graphs = make_vae("onnxruntime", vae, engines_dir=str(engines), checkpoint="tiny")
    g = torch.Generator().manual_seed(4)
    video = torch.rand(2, 3, 11, 64, 96, generator=g) * 2 - 1   # 11 frames: 3 latents, 2 frames dropped
    z = graphs.encode(video)
    ref = vae.encode(video)
    assert z.shape == ref.shape == (2, 16, 3, 8, 12) and rel_l2(z, ref) <= 1e-5
    lat = torch.randn(1, 16, 4, 16, 8, generator=g)             # 128×64 pixels
    frames = graphs.decode(lat)
    ref = vae.decode(lat)
    assert frames.shape == ref.shape == (1, 3, 13, 128, 64) and rel_l2(frames, ref) <= 1e-5
    assert type(graphs).encode_chunked is type(graphs).encode and graphs.cfg is vae.cfg


@pytest.mark.slow
def test_engine_backends_refuse_missing_or_foreign_vae_graphs(engines, tmp_path):
    """No VAE graphs, or graphs of another checkpoint: one line with the export command, never the PyTorch VAE."""
    from runtime.backends import make_vae
    from runtime.tiny import tiny_vae

    root = onnx_copy(engines, tmp_path)
    with pytest.raises(EngineMismatch, match="checkpoint=") as err:
        make_vae("onnxruntime", tiny_vae(), engines_dir=str(root), checkpoint=str(tmp_path))
    assert "\n" not in str(err.value) and "--components vae" in str(err.value)
    shutil.rmtree(root / "onnx" / "vae")
    with pytest.raises(BackendUnavailable, match=r"no exported VAE graph at .*decoder_first\.onnx; export it with: "
                                                 r"python -m export\.build .*--components vae"):
        S2VPipeline.from_pretrained("tiny", device="cpu", backend="onnxruntime", engines_dir=str(root))
    vae = tiny_vae()
    assert make_vae("torch", vae) is vae and make_vae("torch-graph", vae) is vae


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    model = tiny_dit()
    x, t, cond = step_inputs(model)
    ref = make_backend("torch", model).forward(x, t, cond)
    out = make_backend("torch-compile", tiny_dit()).forward(x, t, cond)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_unavailable_backends_are_one_line(tmp_path):
    model = tiny_dit()
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            make_backend("torch-graph", model)
    with pytest.raises(BackendUnavailable, match="export.build"):
        make_backend("onnxruntime", model, engines_dir=str(tmp_path))
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        make_backend("fastest", model)


def test_tensorrt_backend_without_any_runtime_says_how_to_install(monkeypatch, tmp_path):
    from runtime.backends import trt_backend

    monkeypatch.setattr(trt_backend, "MODULES", {"tensorrt": "no_such_tensorrt", "tensorrt-rtx": "no_such_rtx"})
    with pytest.raises(BackendUnavailable, match="pip install") as err:
        make_backend("tensorrt", tiny_dit(), engines_dir=str(tmp_path))
    assert "TensorRT-RTX" in str(err.value) and "\n" not in str(err.value)


def fake_gpu(monkeypatch, cc: str, name: str, runtimes: dict):
    from runtime.backends import trt_backend

    monkeypatch.setattr(trt_backend, "installed_runtimes", lambda: dict(runtimes))
    monkeypatch.setattr(trt_backend, "gpu_of", lambda device: (cc, name))


@pytest.mark.parametrize("cc,name", [("9.0", "NVIDIA H200"), ("10.0", "NVIDIA B200")])
def test_tensorrt_rtx_refuses_an_unsupported_gpu_in_one_line(monkeypatch, tmp_path, cc, name):
    fake_gpu(monkeypatch, cc, name, {"tensorrt-rtx": "1.7.1.116"})
    with pytest.raises(BackendUnavailable) as err:
        make_backend("tensorrt", tiny_dit(), engines_dir=str(tmp_path))
    assert str(err.value).startswith(f"TensorRT-RTX does not run on compute capability {cc} ({name}): use --backend "
                                     "torch-graph, or TensorRT 10/11")
    assert "\n" not in str(err.value)


def test_tensorrt_backend_picks_only_engines_this_gpu_can_run(monkeypatch, tmp_path):
    from runtime.backends.trt_backend import usable_runtimes

    both = {"tensorrt": "10.15.1", "tensorrt-rtx": "1.7.1.116"}
    assert usable_runtimes(both, "9.0", "NVIDIA H200") == {"tensorrt": "10.15.1"}
    assert usable_runtimes(both, "8.9", "RTX 4090") == both
    assert usable_runtimes({"tensorrt-rtx": "1.7.1.116"}, "12.0", "RTX 5090") == {"tensorrt-rtx": "1.7.1.116"}
    fake_gpu(monkeypatch, "8.9", "RTX 4090", {"tensorrt-rtx": "1.7.1.116"})  # supported GPU, no engine yet
    with pytest.raises(EngineMismatch, match="no dit engine .* build one with: python -m export.build"):
        make_backend("tensorrt", tiny_dit(), engines_dir=str(tmp_path))


# ------------------------------------------------------------------------------------------ ONNX manifests
def onnx_copy(engines, tmp_path) -> Path:
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst, symlinks=True)
    return dst


@pytest.mark.slow
def test_onnxruntime_backend_checks_the_onnx_manifest(engines, tmp_path):
    from runtime.manifest import onnx_manifest_path

    model = tiny_dit()
    root = onnx_copy(engines, tmp_path)
    graph = root / "onnx" / "dit" / "model.onnx"
    manifest = onnx_manifest_path(graph)
    good = manifest.read_text()
    assert make_backend("onnxruntime", model, engines_dir=str(root), checkpoint="tiny").io()["inputs"][0]["name"] == "x"

    def refused(match, fix="export.build"):
        with pytest.raises(EngineMismatch, match=match) as err:
            make_backend("onnxruntime", model, engines_dir=str(root), checkpoint="tiny")
        assert "\n" not in str(err.value) and fix in str(err.value)

    data = json.loads(good)
    manifest.write_text(json.dumps({k: v for k, v in data.items() if k != "key"}))
    refused("manifest has no key")
    manifest.write_text(json.dumps({**data, "checkpoint": "someone-else"}))
    refused("does not match its contents")
    manifest.unlink()
    refused("no manifest")
    from export.manifest import write_manifest  # a consistent manifest (valid key) whose I/O differs
    io = json.loads(json.dumps(data["io"]))
    io["inputs"][1]["shape"] = [-1, 128]
    write_manifest(manifest, {k: v for k, v in {**data, "io": io}.items() if k not in ("key", "written")})
    refused(r"does not have the I/O its manifest records \(input t_freq")
    manifest.write_text(good)
    data_file = root / "onnx" / "dit" / "model.onnx.data"
    blob = bytearray(data_file.read_bytes())
    blob[-1] ^= 1
    data_file.write_bytes(bytes(blob))
    refused("ONNX graph changed since it was built")
    outside = tmp_path / "outside.data"
    shutil.copy(engines / "onnx" / "dit" / "model.onnx.data", outside)
    data_file.unlink()
    data_file.symlink_to(outside)   # the right bytes, but outside the engines folder
    refused("leads out of the engines folder", fix="copy the file into the engines folder")
    data_file.unlink()
    shutil.copy(outside, data_file)
    make_backend("onnxruntime", model, engines_dir=str(root))  # checkpoint unknown: not compared
    with pytest.raises(EngineMismatch, match="checkpoint="):
        make_backend("onnxruntime", model, engines_dir=str(root), checkpoint=str(tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs a GPU (checked on the GPU machine)")
def test_graph_replay_equals_eager():
    model = tiny_dit(device="cuda")
    x, t, cond = step_inputs(model)
    eager = make_backend("torch", model).forward(x, t, cond)
    g = make_backend("torch-graph", tiny_dit(device="cuda"))
    for _ in range(2):
        torch.testing.assert_close(g.forward(x, t, cond), eager, atol=1e-4, rtol=1e-4)
    x2, t2, cond2 = step_inputs(model, seed=5)
    torch.testing.assert_close(g.forward(x2, t2, cond2), make_backend("torch", model).forward(x2, t2, cond2), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph loop needs a GPU (checked on the GPU machine)")
def test_graph_backend_pipeline_end_to_end_on_gpu():
    kw = dict(seed=2, sample_steps=4, infer_frames=16, progress=False)
    eager = S2VPipeline.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16, backend="torch")
    graph = S2VPipeline.from_pretrained("tiny", device="cuda", dtype=torch.bfloat16, backend="torch-graph")
    ref, got = record(eager), record(graph)
    a = eager.generate(demo_image(), demo_speech(1.5), **kw)
    b = graph.generate(demo_image(), demo_speech(1.5), **kw)   # 2 clips: first and later graphs, reused
    c = graph.generate(demo_image(), demo_speech(1.5), **kw)   # a second request replays the same graphs
    assert a.info["clips"] == 2 and len(graph.backend.graphs) == 2
    assert np.array_equal(b.frames, c.frames)
    # bf16 on both sides, compiled kernels round differently: each replayed step against eager on the same inputs
    # (a 10 % velocity error is 0.1), and the latents of both clips (a 10 % error moves them by ~4e-2 rel-L2)
    for x, t, cond, v in got["calls"][:len(ref["calls"])]:
        assert mean_rel(v, eager.backend.forward(x, t, cond)) <= 1e-2
    for la, lb in zip(ref["latents"], got["latents"][:len(ref["latents"])], strict=True):
        assert rel_l2(lb, la) <= 1e-2


def test_static_inputs_copy_conditions_once_per_clip():
    from runtime.backends.static_inputs import StaticInputs

    model = tiny_dit()
    x, t, cond = step_inputs(model)
    static = StaticInputs(x, t, cond)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(static.tensors, (x, t, *cond.as_tuple())))
    static.tensors[2].zero_()                 # if the same clip's conditions were copied again, this would be undone
    static.load(x + 1, t, cond)
    torch.testing.assert_close(static.tensors[0], x + 1)
    assert not static.tensors[2].any()
    x2, t2, cond2 = step_inputs(model, seed=7)  # a new clip: its conditions are copied in
    static.load(x2, t2, cond2)
    torch.testing.assert_close(static.tensors[2], cond2.context)  # the conditions follow x and t_freq, in field order


def test_sequence_parallel_ranks_compile_their_blocks():
    """Ulysses ranks compile their blocks like a single GPU (they agree with it on two H200s since RoPE is real)."""
    from runtime.parallel import SeqShard

    model = tiny_dit()
    model.set_sequence_shard(SeqShard(0, 2))
    model.compile_blocks()
    assert model.compiled and hasattr(model.blocks[0].forward, "_torchdynamo_orig_callable")


def test_auto_backend_is_the_graph_on_cuda_and_eager_elsewhere():
    """The default ``--backend auto``: the fastest path on CUDA, the float32 reference path on the CPU, eager when the
    DiT is offloaded (CUDA graphs would pin it); named backends pass through."""
    from runtime.backends import resolve_backend
    from runtime.pipeline import check_backend

    assert resolve_backend("auto", "cuda") == "torch-graph"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "torch-graph"
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("auto", "cuda", offload_model=True) == "torch"
    assert resolve_backend("torch-compile", "cuda") == "torch-compile"
    check_backend("auto", offload_model=True)  # auto never conflicts with offloading
    with pytest.raises(BackendUnavailable, match="choose one of: auto, torch"):
        check_backend("graph")
    pipe = S2VPipeline.from_pretrained("tiny", device="cpu")
    assert pipe.backend_name == "torch" and pipe.backend.name == "torch"


def test_graph_backend_drops_other_shapes_when_a_capture_runs_out_of_memory(monkeypatch):
    """A server meeting many resolutions: graphs are kept per shape until a capture hits OOM, then the others go
    and the capture is retried once; OOM with nothing to drop is raised. (Logic only: captures are faked.)"""
    from runtime.backends import torch_backend as tb

    state = {"oom": 0, "made": 0, "replays": 0, "pools": []}

    class FakeCaptured:
        def __init__(self, step, x, t_freq, cond, warmup, pool):
            state["pools"].append(pool)
            if state["oom"]:
                state["oom"] -= 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            state["made"] += 1
            self.first = (x * 2,)  # the warm-up forward on the call's own inputs: that call's result
            self.out = (x * 2,)
            self.inputs = type("I", (), {"load": lambda *a: None})()
            self.graph = type("G", (), {"replay": lambda *a: state.__setitem__("replays", state["replays"] + 1)})()

    monkeypatch.setattr(tb, "_Captured", FakeCaptured)
    monkeypatch.setattr(tb, "shape_key", lambda x, t, c: tuple(x.shape))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", next(handles)))
    g = object.__new__(tb.GraphDiT)  # the constructor needs CUDA; the cache logic does not
    def step(*args):
        raise AssertionError("captures are faked")

    g.model, g.warmup, g.graphs = type("M", (), {"step": staticmethod(step)})(), 0, tb.OrderedDict()
    g.pool = torch.cuda.graph_pool_handle()
    a, b, c = torch.ones(1, 2), torch.ones(1, 3), torch.ones(1, 4)
    torch.testing.assert_close(g.forward(a, None, None), a * 2)
    assert state["replays"] == 0  # a new shape's first call returns its warm-up output: no replay, no extra forward
    g.forward(b, None, None)
    g.forward(a, None, None)  # a becomes the most recently used
    assert list(g.graphs) == [("step", 1, 3), ("step", 1, 2)] and state["made"] == 2 and state["replays"] == 1
    assert state["pools"] == [("pool", 0)] * 2  # the graphs of every shape share one memory pool
    state["oom"] = 1
    torch.testing.assert_close(g.forward(c, None, None), c * 2)
    assert list(g.graphs) == [("step", 1, 4)] and state["made"] == 3
    assert state["pools"][2:] == [("pool", 0), ("pool", 1)]  # the retry captures into a fresh pool
    g.graphs.clear()
    state["oom"] = 1
    with pytest.raises(torch.cuda.OutOfMemoryError):
        g.forward(a, None, None)


def test_uncompile_blocks_restores_the_eager_model():
    """``benchmarks.inductor_options`` recompiles one model under several settings: ``uncompile_blocks`` must leave
    the blocks and the audio injection as they were before ``compile_blocks`` (nothing compiled yet here)."""
    from runtime.models import dit as dit_mod

    m = tiny_dit(torch.float32, "cpu")
    m.compile_blocks(options={"coordinate_descent_tuning": True})
    assert m.compiled and all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in m.blocks)
    assert m.audio_residual is not dit_mod.audio_residual
    m.uncompile_blocks()
    assert not m.compiled and m.audio_residual is dit_mod.audio_residual
    assert all("forward" not in b.__dict__ and not hasattr(b.forward, "_torchdynamo_orig_callable") for b in m.blocks)


@pytest.mark.slow
def test_export_with_a_lora_records_it_and_the_runtime_refuses_another_merge(tmp_path):
    """export.build --lora merges before export; the ONNX manifest records sha256 + strength; the onnxruntime
    backend runs it with the same merge (matching the merged PyTorch model) and refuses a run without it."""
    from runtime import lora
    from tests.test_lora import random_lora

    path = random_lora(tiny_dit(), tmp_path / "l.safetensors", scale=0.02)
    out = tmp_path / "eng"
    assert build_main(["--ckpt_dir", "tiny", "--out", str(out), "--onnx-only", "--components", "dit", "--no-validate",
                       "--lora", f"{path}:0.5"]) == 0
    manifest = json.loads((out / "onnx" / "dit" / "model.manifest.json").read_text())
    assert manifest["loras"] == lora.identity([lora.LoraSpec(path, 0.5)])
    merged = tiny_dit()
    specs = [lora.LoraSpec(path, 0.5)]
    lora.merge(merged, specs)
    x, t, cond = step_inputs(merged)
    ref = make_backend("torch", merged).forward(x, t, cond)
    got = make_backend("onnxruntime", merged, engines_dir=str(out), checkpoint="tiny", loras=specs).forward(x, t, cond)
    assert mean_rel(got.float().numpy(), ref.double().numpy()) < 2e-3
    with pytest.raises(EngineMismatch, match=r"merges no LoRA; rebuild with: python -m export.build"):
        make_backend("onnxruntime", tiny_dit(), engines_dir=str(out), checkpoint="tiny")
    with pytest.raises(EngineMismatch, match=r":0\.5 merged, this run merges .*:1;.* --lora .*l\.safetensors:1"):
        make_backend("onnxruntime", merged, engines_dir=str(out), checkpoint="tiny", loras=[lora.LoraSpec(path, 1.0)])
