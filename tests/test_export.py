"""ONNX export of the DiT (FP16, dynamic) and VAE (FP32), ONNX Runtime parity, op coverage, manifests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import manifest as mf
from export.build import EXIT_NO_TRT, main as build_main, mean_rel
from export.onnx_dit import INPUT_NAMES, example_inputs, export_dit, fp16_audit, graph_inputs, to_fp16
from export.onnx_vae import GRAPHS, _Graph, example
from export.profiles import covers, dit_profiles, extra_tokens, reachable_sizes
from export.trt_ops import SUPPORTED, check_graph
from runtime.config import DiTConfig
from runtime.errors import EngineMismatch
from runtime.models.dit import ClipConditions, build_dit
from runtime.tiny import tiny_vae

def half(ex):
    return graph_inputs(ex)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    assert build_main(["--precision", "fp16", "--ckpt_dir", "tiny", "--out", str(out), "--onnx-only"]) == 0
    return out


@pytest.fixture(scope="module")
def fp32_model():
    from runtime.tiny import tiny_dit

    return tiny_dit(torch.float32)


def test_dit_graph_is_fp16_dynamic_and_parser_clean(built):
    g = onnx.load(str(built / "onnx" / "dit" / "model.onnx"), load_external_data=False)
    rep = check_graph(g)
    assert rep.ok, rep.describe()
    assert rep.ops["Attention"] > 0 and rep.opset == 23
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in g.graph.input}
    assert dims["x"][0] == "batch" and dims["x"][2] == "frames" and "grid_h" in str(dims["x"][3])
    assert dims["extra"][1] == "extra" and dims["rope_extra"][0] == "extra"
    fp16_inits = sum(i.data_type == onnx.TensorProto.FLOAT16 for i in g.graph.initializer)
    assert fp16_inits > 0  # the transformer weights are FP16 in the graph
    report = json.loads((built / "export_report.json").read_text())
    assert report["dit_ort"]["mean_rel"] <= 1e-2 and report["fp16_audit"]["keep_fp32"] == []


@pytest.mark.parametrize("frames,lat_h,lat_w,motion,batch", [(3, 8, 12, True, 2), (5, 16, 8, False, 1),
                                                             (2, 16, 16, True, 1), (4, 8, 8, False, 2)])
def test_one_dit_graph_serves_every_clip_shape(built, fp32_model, frames, lat_h, lat_w, motion, batch):
    sess = ort.InferenceSession(str(built / "onnx" / "dit" / "model.onnx"), providers=["CPUExecutionProvider"])
    ex = example_inputs(fp32_model, frames, lat_h, lat_w, motion=motion, batch=batch, seed=11)
    ref = fp32_model.step(*ex).numpy()
    out = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, half(ex))})[0]
    assert out.shape == ref.shape
    assert mean_rel(out, ref) <= 1e-2


@pytest.mark.parametrize("kind", GRAPHS)
def test_vae_graphs_match_pytorch_at_other_sizes(built, kind):
    vae = tiny_vae()
    sess = ort.InferenceSession(str(built / "onnx" / "vae" / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    rep = check_graph(onnx.load(str(built / "onnx" / "vae" / f"{kind}.onnx")))
    assert rep.ok and "If" not in rep.ops, rep.describe()
    xs = example(vae, kind, 128, 64, seed=2)  # exported at 64×96: dynamic height/width
    ref = _Graph(vae, kind)(*xs)
    out = sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)})
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        r = r.numpy()
        assert o.shape == r.shape
        assert np.linalg.norm(o - r) <= 1e-4 * max(np.linalg.norm(r), 1e-12)


def test_fp16_audit_flags_out_of_range_weights_and_activations(fp32_model):
    model = build_dit(DiTConfig.tiny(), seed=3)
    with torch.no_grad():
        model.blocks[1].ffn[2].weight[0, 0] = 1e6       # a weight FP16 cannot hold
        model.blocks[2].ffn[0].bias.fill_(4e4)          # an activation near the FP16 limit
    ex = example_inputs(model, 2, 8, 8, motion=True)
    rep = fp16_audit(model, ex[0], ex[1], ClipConditions(*ex[2:]))
    assert "blocks.1.ffn.2.weight" in rep.weights_over_range
    assert {"blocks.1.ffn.2", "blocks.2.ffn.0"} <= set(rep.keep_fp32)
    to_fp16(model, rep.keep_fp32)
    assert model.blocks[1].ffn[2].weight.dtype == torch.float32 and model.blocks[0].ffn[2].weight.dtype == torch.float16
    clean = fp16_audit(build_dit(DiTConfig.tiny(), seed=3), ex[0], ex[1], ClipConditions(*ex[2:]))
    assert clean.keep_fp32 == [] and not clean.weights_over_range


def test_op_checker_rejects_unsupported_control_flow_and_double():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [3])
    nodes = [onnx.helper.make_node("Cast", ["x"], ["d"], to=onnx.TensorProto.DOUBLE),
             onnx.helper.make_node("StringNormalizer", ["d"], ["s"]),
             onnx.helper.make_node("NonZero", ["d"], ["y"])]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 23)])
    rep = check_graph(model)
    assert not rep.ok
    assert rep.unsupported == ("StringNormalizer",) and rep.discouraged == ("NonZero",) and rep.double_tensors
    assert SUPPORTED["Attention"] == "10.14" and SUPPORTED["RMSNormalization"] == "10.15"


# ------------------------------------------------------------------------------------------ profiles
def test_profiles_cover_the_target_size_rule():
    cfg = DiTConfig.s2v_14b()
    sizes = reachable_sizes()
    assert {(704, 1024), (1024, 704), (640, 1088), (448, 832), (704, 1280)} <= sizes
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 921600 for h, w in sizes)
    first, later = dit_profiles(cfg, sizes)
    assert extra_tokens(cfg, 704, 1024, True) == 7040 and extra_tokens(cfg, 704, 1024, False) == 2816
    for h, w in sizes:
        for frames in (12, 20):
            assert covers(later, frames, h // 16, w // 16, extra_tokens(cfg, h, w, True), batch=2)
            assert covers(first, frames, h // 16, w // 16, extra_tokens(cfg, h, w, False), batch=1)
    assert later.grid_h.opt == 44 and later.grid_w.opt == 64 and later.frames.opt == 20
    shapes = later.shapes(cfg)
    assert shapes["x"][1] == (2, 16, 20, 88, 128) and shapes["rope_extra"][1] == (7040, 64, 2)
    assert not covers(later, 21, 44, 64, 7040)  # 84+ pixel frames are outside the profile


# ------------------------------------------------------------------------------------------ manifests
def fields(**over):
    base = {"component": "dit", "precision": "fp16", "onnx_sha256": "ab" * 32, "checkpoint": "ck1",
            "tensorrt_version": "10.15.1", "gpu": "NVIDIA H200", "compute_capability": "9.0",
            "profiles": [{"name": "later"}], "flags": {"opt_level": 3}}
    return {**base, **over}


def test_engine_key_is_a_hash_of_the_build_inputs():
    assert mf.engine_key(fields()) == mf.engine_key(fields())
    for k, v in [("tensorrt_version", "11.4.0"), ("gpu", "NVIDIA H100"), ("onnx_sha256", "cd" * 32),
                 ("checkpoint", "ck2"), ("flags", {"opt_level": 5}), ("profiles", [])]:
        assert mf.engine_key(fields(**{k: v})) != mf.engine_key(fields())


@pytest.mark.parametrize("field,value", [("tensorrt_version", "11.4.0"), ("gpu", "NVIDIA H100 80GB HBM3"),
                                         ("compute_capability", "10.0"), ("onnx_sha256", "00" * 32),
                                         ("checkpoint", "other"), ("precision", "bf16")])
def test_mismatching_engine_is_refused_with_rebuild_command(tmp_path, field, value):
    folder = tmp_path / "dit" / mf.engine_key(fields())
    mf.write_manifest(folder, fields())
    (folder / "engine.plan").write_bytes(b"plan")
    rebuild = "python -m export.build --precision fp16 --ckpt_dir X --out Y"
    assert mf.select_engine(tmp_path, "dit", fields(), rebuild) == folder
    with pytest.raises(EngineMismatch) as err:
        mf.select_engine(tmp_path, "dit", {**fields(), field: value}, rebuild)
    msg = str(err.value)
    assert field in msg and rebuild in msg and "\n" not in msg


def test_missing_or_tampered_engine_is_refused(tmp_path):
    with pytest.raises(EngineMismatch, match="no dit engine"):
        mf.select_engine(tmp_path, "dit", fields(), "REBUILD")
    folder = tmp_path / "dit" / "k"
    path = mf.write_manifest(folder, fields())
    with pytest.raises(EngineMismatch, match="without engine.plan"):
        mf.select_engine(tmp_path, "dit", fields(), "REBUILD")
    (folder / "engine.plan").write_bytes(b"plan")
    data = json.loads(path.read_text())
    data["gpu"] = "edited"
    path.write_text(json.dumps(data))
    with pytest.raises(EngineMismatch, match="edited|does not match"):
        mf.select_engine(tmp_path, "dit", {k: v for k, v in fields().items() if k != "gpu"}, "REBUILD")


def test_onnx_hash_covers_external_data(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"graph")
    (tmp_path / "m.onnx.data").write_bytes(b"weights")
    h1 = mf.onnx_sha256(tmp_path / "m.onnx")
    (tmp_path / "m.onnx.data").write_bytes(b"weightz")
    assert mf.onnx_sha256(tmp_path / "m.onnx") != h1


# ------------------------------------------------------------------------------------------ TensorRT
def test_build_without_tensorrt_stops_after_onnx_with_one_line(tmp_path, capsys):
    from export import trt as trtw

    ok, why = trtw.available()
    if ok:
        pytest.skip(f"{why} is installed: the no-TensorRT path cannot be exercised here")
    code = build_main(["--ckpt_dir", "tiny", "--out", str(tmp_path), "--components", "dit", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_NO_TRT
    assert "engines not built" in err[-1] and "pip install" in err[-1]
    assert (tmp_path / "onnx" / "dit" / "model.onnx").is_file()


def test_tensorrt_engine_build_and_parity(built):
    from export import trt as trtw

    ok, why = trtw.available()
    if not ok or not torch.cuda.is_available():
        pytest.skip(f"needs TensorRT and a GPU: {why if not ok else 'no CUDA device'}")
    cfg = DiTConfig.tiny()
    profiles = dit_profiles(cfg, sizes={(64, 96), (128, 128)}, opt_size=(64, 96), frames=(16, 16))
    plan = built / "tiny_dit.plan"
    trtw.build_engine(built / "onnx" / "dit" / "model.onnx", plan, [p.shapes(cfg) for p in profiles], opt_level=1)
    assert Path(plan).stat().st_size > 0
