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
from export import trt as trtw
from export.build import EXIT_NO_TRT, main as build_main
from export.onnx_dit import INPUT_NAMES, example_inputs, export_dit, fp16_audit, graph_inputs, to_fp16
from export.onnx_vae import GRAPHS, _Graph, example
from export.profiles import covers, dit_profiles, extra_tokens, reachable_sizes
from export.trt_ops import SUPPORTED, check_graph
from runtime.config import DiTConfig
from runtime import manifest as eng
from runtime.errors import BackendUnavailable, ConfigError, EngineMismatch
from runtime.models.dit import ClipConditions, build_dit
from runtime.tiny import tiny_vae
from tests.conftest import mean_rel

def half(ex):
    return graph_inputs(ex)


RTX, RTX_WHY = trtw.available("tensorrt-rtx")
needs_rtx = pytest.mark.skipif(not RTX, reason=f"TensorRT-RTX not installed ({RTX_WHY}); pip install -e '.[rtx]'")
# Where the old exporter put fixed-name temporaries (and the report): a symlink planted there must not lead
# the export to write, move or delete anything outside the output folder.
PLANTED = {"onnx/dit/.model.onnx.partial": "dir", "onnx/vae/.decoder_first.onnx.partial": "file",
           "onnx/vae/.encoder_step.onnx.partial": "file", "onnx/vae/encoder_first.onnx": "file",
           "export_report.json": "file"}


VICTIMS: dict = {}


def plant_symlinks(out: Path, victims: Path) -> None:
    (victims / "dir").mkdir(parents=True)
    (victims / "dir" / "model.onnx").write_bytes(b"precious graph")
    (victims / "dir" / "keep.txt").write_text("precious")
    (victims / "file").write_text("precious file")
    for rel, target in PLANTED.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).symlink_to(victims / target)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The README's command on this CPU: ONNX + (with TensorRT-RTX installed) real DiT and VAE engines,
    into an output folder with symlinks planted at the old temporary names."""
    out, victims = tmp_path_factory.mktemp("export"), tmp_path_factory.mktemp("victims")
    plant_symlinks(out, victims)
    before = snapshot(victims)
    args = ["--precision", "fp16", "--ckpt_dir", "tiny", "--out", str(out)] + ([] if RTX else ["--onnx-only"])
    assert build_main(args) == 0
    VICTIMS.update(folder=victims, before=before)
    return out


@pytest.fixture(scope="module")
def fp32_model():
    from runtime.tiny import tiny_dit

    return tiny_dit(torch.float32)


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("frames,lat_h,lat_w,motion,batch", [(3, 8, 12, True, 2), (5, 16, 8, False, 1),
                                                             (2, 16, 16, True, 1), (4, 8, 8, False, 2)])
def test_one_dit_graph_serves_every_clip_shape(built, fp32_model, frames, lat_h, lat_w, motion, batch):
    sess = ort.InferenceSession(str(built / "onnx" / "dit" / "model.onnx"), providers=["CPUExecutionProvider"])
    ex = example_inputs(fp32_model, frames, lat_h, lat_w, motion=motion, batch=batch, seed=11)
    ref = fp32_model.step(*ex).numpy()
    out = sess.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, half(ex))})[0]
    assert out.shape == ref.shape
    assert mean_rel(out, ref) <= 1e-2


@pytest.mark.slow
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
    base = {"kind": "engine", "component": "dit", "precision": "fp16", "onnx_sha256": "ab" * 32, "checkpoint": "ck1",
            "runtime": "tensorrt-rtx", "runtime_version": "1.7.1.116", "compute_capabilities": ["8.6", "8.9"],
            "profiles": [{"name": "later"}], "flags": {"opt_level": 3}, "io": {"inputs": [], "outputs": []}}
    return {**base, **over}


def fake_engine(root: Path, plan=b"plan", **over) -> Path:
    f = fields(**over)
    folder = root / "dit" / mf.engine_key(f)
    folder.mkdir(parents=True)
    (folder / "engine.plan").write_bytes(plan)
    mf.write_manifest(folder, {**f, "plan_sha256": mf.sha256_file(folder / "engine.plan")})
    return folder


def request(**over):
    r = {"kind": "engine", "component": "dit", "precision": "fp16", "checkpoint": "ck1",
         "runtimes": {"tensorrt-rtx": "1.7.1.116"}, "compute_capability": "8.9"}
    return {**r, **over}


def test_engine_key_is_a_hash_of_the_build_inputs():
    assert mf.engine_key(fields()) == mf.engine_key(fields())
    for k, v in [("runtime_version", "1.8.0"), ("runtime", "tensorrt"), ("onnx_sha256", "cd" * 32), ("checkpoint", "ck2"),
                 ("flags", {"opt_level": 5}), ("profiles", []), ("compute_capabilities", ["8.6"]),
                 ("io", {"inputs": [{"name": "x"}]})]:
        assert mf.engine_key(fields(**{k: v})) != mf.engine_key(fields())


@pytest.mark.parametrize("over,words", [
    ({"runtimes": {"tensorrt-rtx": "1.8.0.1"}}, "built for tensorrt-rtx 1.7.1.116, this run has tensorrt-rtx 1.8.0.1"),
    ({"runtimes": {"tensorrt": "10.15.1"}}, "built with tensorrt-rtx, which is not installed here"),
    ({"compute_capability": "9.0"}, "compute capabilities 8.6, 8.9, this GPU is 9.0"),
    ({"checkpoint": "other"}, "checkpoint="), ({"precision": "bf16"}, "precision=")])
def test_mismatching_engine_is_refused_with_rebuild_command(tmp_path, over, words):
    folder = fake_engine(tmp_path)
    rebuild = "python -m export.build --precision fp16 --ckpt_dir X --out Y"
    assert eng.select_engine(tmp_path, "dit", request(), rebuild)[0] == folder
    with pytest.raises(EngineMismatch) as err:
        eng.select_engine(tmp_path, "dit", request(**over), rebuild)
    msg = str(err.value)
    assert words in msg and rebuild in msg and "\n" not in msg


def test_missing_tampered_or_keyless_engine_is_refused(tmp_path):
    with pytest.raises(EngineMismatch, match="no dit engine"):
        eng.select_engine(tmp_path, "dit", request(), "REBUILD")
    folder = fake_engine(tmp_path)
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "compute_capabilities": ["8.9", "9.0"]}))  # edited: key no longer matches
    with pytest.raises(EngineMismatch, match="does not match its contents"):
        eng.select_engine(tmp_path, "dit", request(), "REBUILD")
    path.write_text(json.dumps({k: v for k, v in data.items() if k != "key"}))    # key dropped
    with pytest.raises(EngineMismatch, match="no key"):
        eng.select_engine(tmp_path, "dit", request(), "REBUILD")
    path.write_text(json.dumps(data))
    (folder / "engine.plan").write_bytes(b"plan!")                                  # plan replaced
    with pytest.raises(EngineMismatch, match="changed since it was built"):
        eng.select_engine(tmp_path, "dit", request(), "REBUILD")
    (folder / "engine.plan").unlink()
    with pytest.raises(EngineMismatch, match="without engine.plan"):
        eng.select_engine(tmp_path, "dit", request(), "REBUILD")


def test_symlinks_out_of_the_engines_folder_are_refused(tmp_path):
    root, outside = tmp_path / "engines", tmp_path / "outside"
    folder = fake_engine(root)
    outside.mkdir()
    (outside / "engine.plan").write_bytes(b"plan")
    (folder / "engine.plan").unlink()
    (folder / "engine.plan").symlink_to(outside / "engine.plan")  # same bytes, same hash: only the link is wrong
    with pytest.raises(EngineMismatch, match="leads out of the engines folder"):
        eng.select_engine(root, "dit", request(), "REBUILD")
    (folder / "engine.plan").unlink()
    (folder / "engine.plan").write_bytes(b"plan")
    (root / "inside.plan").write_bytes(b"plan")
    (folder / "engine.plan").unlink()
    (folder / "engine.plan").symlink_to(root / "inside.plan")     # a link that stays inside is fine
    assert eng.select_engine(root, "dit", request(), "REBUILD")[0] == folder


def test_onnx_hash_covers_external_data(tmp_path):
    from tests.test_hardening import _graph_with_external_data

    path = _graph_with_external_data(tmp_path)          # m.onnx + the m.onnx.data it references
    (tmp_path / "m.manifest.json").write_text("{}")
    h1 = mf.onnx_sha256(path)
    (tmp_path / "m.manifest.json").write_text('{"a": 1}')  # the manifest beside it is not part of the graph
    assert mf.onnx_sha256(path) == h1
    data = bytearray((tmp_path / "m.onnx.data").read_bytes())
    data[0] ^= 1
    (tmp_path / "m.onnx.data").write_bytes(bytes(data))
    assert mf.onnx_sha256(path) != h1


@pytest.mark.slow
def test_onnx_only_output_has_manifests_matching_the_graphs(built):
    for path in [built / "onnx" / "dit" / "model.onnx", *[built / "onnx" / "vae" / f"{k}.onnx" for k in GRAPHS]]:
        m = eng.read_manifest(eng.onnx_manifest_path(path), built)
        graph = onnx.load(str(path), load_external_data=False)
        assert m["kind"] == "onnx" and m["onnx_sha256"] == eng.onnx_sha256(path)
        assert m["checkpoint"] == eng.checkpoint_identity("tiny") and m["opset"] == 23
        names = [i.name for i in graph.graph.input]
        assert [e["name"] for e in m["io"]["inputs"]] == names and m["io"] == mf.onnx_io(graph)
    dit = eng.read_manifest(built / "onnx" / "dit" / "model.manifest.json", built)
    assert dit["io"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": [-1, 16, -1, -1, -1]}
    assert dit["precision"] == "fp16" and dit["component"] == "dit"


# ------------------------------------------------------------------------------------------ temp files
@pytest.mark.slow
def test_export_never_follows_symlinks_planted_at_temporary_names(built):
    assert snapshot(VICTIMS["folder"]) == VICTIMS["before"]  # nothing outside written, moved or deleted
    for rel in PLANTED:
        p = built / rel
        if rel.startswith(".") or "/." in rel:
            assert p.is_symlink()                           # never used: temporaries get random names
        else:
            assert p.is_file() and not p.is_symlink()       # the link itself was replaced, not written through
    assert not [p for p in built.rglob("*partial*") if not p.is_symlink()]  # no temporaries left behind


def test_atomic_writer_replaces_a_planted_link_and_never_reads_through_one(tmp_path):
    from export.files import read_regular, write_bytes

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    cache = tmp_path / "out" / "timing.cache"
    cache.symlink_to(victim)
    assert read_regular(cache) is None
    write_bytes(cache, b"new cache")
    assert victim.read_bytes() == b"precious" and cache.read_bytes() == b"new cache" and not cache.is_symlink()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["timing.cache"]


# ------------------------------------------------------------------------------------------ TensorRT
@pytest.mark.slow
def test_build_without_tensorrt_stops_after_onnx_with_one_line(tmp_path, capsys, monkeypatch):
    from runtime.backends import trt_backend

    monkeypatch.setattr(trt_backend, "MODULES", {"tensorrt": "no_such_tensorrt", "tensorrt-rtx": "no_such_rtx"})
    code = build_main(["--ckpt_dir", "tiny", "--out", str(tmp_path), "--components", "dit", "--no-validate"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_NO_TRT
    assert "engines not built" in err[-1] and "pip install" in err[-1] and "TensorRT-RTX" in err[-1]
    assert (tmp_path / "onnx" / "dit" / "model.onnx").is_file() and (tmp_path / "onnx" / "dit" / "model.manifest.json").is_file()


def engine_manifests(built) -> dict[str, dict]:
    found = {}
    for path in built.glob("*/*/manifest.json"):
        if path.parent.parent.name != "onnx":
            found[path.parent.parent.name] = eng.read_manifest(path, built)
    return found


@pytest.mark.slow
@needs_rtx
def test_cpu_built_engines_and_their_manifests(built):
    import tensorrt_rtx_bindings

    flavor = trtw.select_flavor("tensorrt-rtx")
    found = engine_manifests(built)
    assert sorted(found) == ["dit"] + [f"vae_{k}" for k in sorted(GRAPHS)]
    for component, m in found.items():
        folder = built / component / m["key"]
        onnx_path = built / m["onnx_path"]
        assert m["runtime"] == "tensorrt-rtx" and m["runtime_version"] == tensorrt_rtx_bindings.__version__
        assert m["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"] and m["gpu"] is None
        assert m["plan_bytes"] == (folder / "engine.plan").stat().st_size > 100_000
        _, network, parser = trtw.parse(flavor, onnx_path)  # the graph parses again, cleanly, into the same network
        assert parser.num_errors == 0 and m["network_layers"] == network.num_layers > 0
        assert m["plan_sha256"] == eng.sha256_file(folder / "engine.plan")
        assert m["onnx_sha256"] == eng.onnx_sha256(onnx_path)
        # the engine's I/O (recorded from the network TensorRT-RTX built) equals the ONNX graph's
        assert m["io"] == mf.onnx_io(onnx.load(str(onnx_path), load_external_data=False))
        assert m["precision"] == ("fp16" if component == "dit" else "fp32")
    first, later = found["dit"]["profiles"]
    assert (first["name"], later["name"]) == ("first", "later")


@pytest.mark.slow
@needs_rtx
def test_dit_engine_profiles_cover_the_first_and_later_clips_of_the_tiny_pipeline(built):
    from export.profiles import DiTProfile, Range
    from runtime.sampler import latent_frames

    cfg = DiTConfig.tiny()
    dit = engine_manifests(built)["dit"]
    first, later = (DiTProfile(p["name"], *(Range(**p[k]) for k in ("batch", "frames", "grid_h", "grid_w", "extra")))
                    for p in dit["profiles"])
    for h, w in [(64, 64), (64, 96), (128, 128)]:   # demo size, check size, a test size
        for frames in (16, 48, 80):
            f = latent_frames(frames)
            assert covers(first, f, h // 16, w // 16, extra_tokens(cfg, h, w, False), batch=2)
            assert covers(later, f, h // 16, w // 16, extra_tokens(cfg, h, w, True), batch=2)


@pytest.mark.slow
@needs_rtx
def test_network_io_equals_the_onnx_graph_and_parser_takes_every_node(built):
    flavor = trtw.select_flavor("tensorrt-rtx")
    for path in [built / "onnx" / "dit" / "model.onnx", built / "onnx" / "vae" / "decoder_step.onnx"]:
        _, network, parser = trtw.parse(flavor, path)
        assert parser.num_errors == 0
        assert eng.io_mismatch(mf.onnx_io(onnx.load(str(path), load_external_data=False)), trtw._io(network, flavor)) is None


@needs_rtx
def test_parser_names_the_node_it_does_not_take(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3])
    node = onnx.helper.make_node("Frobnicate", ["x"], ["y"], name="odd_node", domain="com.example")
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 23), onnx.helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="could not parse") as err:
        trtw.build_engine(trtw.select_flavor("tensorrt-rtx"), tmp_path / "m.onnx", tmp_path / "m.plan", [],
                          compute_capabilities=["8.6"])
    assert "Frobnicate" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "m.plan").exists()


@needs_rtx
def test_compute_capability_targets():
    rtx = trtw.select_flavor("tensorrt-rtx")
    assert trtw.targets(rtx, None, None) == ["8.0", "8.6", "8.9", "12.0"]
    assert trtw.targets(rtx, None, "8.9") == ["8.9"] and trtw.targets(rtx, "8.6, 12.0", "8.9") == ["8.6", "12.0"]
    with pytest.raises(ConfigError, match="9.0"):
        trtw.targets(rtx, "8.6,9.0", None)
    fake_trt10 = trtw.Flavor("tensorrt", rtx.trt)
    with pytest.raises(BackendUnavailable, match="no GPU is visible"):
        trtw.targets(fake_trt10, None, None)
    with pytest.raises(ConfigError, match="builds for the GPU it runs on"):
        trtw.targets(fake_trt10, "8.6", "9.0")


@needs_rtx
def test_rtx_capability_table_matches_the_installed_runtime():
    import tensorrt_rtx_bindings as trt

    from runtime.backends.trt_backend import RTX_COMPUTE_CAPABILITIES

    members = [m[2:] for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    assert list(RTX_COMPUTE_CAPABILITIES) == [f"{m[:-1]}.{m[-1]}" for m in members]


def test_engines_built_here_match_pytorch_on_this_gpu(tmp_path):
    """On a GPU with a TensorRT runtime that runs on it: export.build's engines (DiT FP16, VAE FP32) through the
    tensorrt backend against the PyTorch models on the same inputs. Needs a GPU: skipped on the CPU machine."""
    from runtime.backends import make_backend, make_vae
    from runtime.backends.trt_backend import gpu_of, installed_runtimes, usable_runtimes
    from runtime.tiny import tiny_dit
    from tests.conftest import step_inputs

    if not torch.cuda.is_available():
        pytest.skip("running an engine needs a CUDA GPU (TensorRT-RTX engines are built and checked on the CPU above)")
    cc, gpu = gpu_of(torch.device("cuda"))
    runtimes = usable_runtimes(installed_runtimes(), cc, gpu) if installed_runtimes() else {}
    if not runtimes:
        pytest.skip(f"no installed TensorRT runtime runs on {gpu} (compute capability {cc})")
    choice = "tensorrt" if "tensorrt" in runtimes else "tensorrt-rtx"
    out = tmp_path / "engines"
    assert build_main(["--ckpt_dir", "tiny", "--out", str(out), "--trt", choice, "--opt-level", "1"]) == 0
    model = tiny_dit(torch.float32, "cuda")
    x, t, cond = step_inputs(model, 3, 8, 12, motion=True, batch=2)
    ref = make_backend("torch", model).forward(x, t, cond)
    engine = make_backend("tensorrt", model, engines_dir=str(out), checkpoint="tiny")
    for _ in range(2):  # the captured graph, then its replay
        assert mean_rel(engine.forward(x, t, cond), ref) <= 1e-2
    vae = tiny_vae("cuda")
    z = torch.randn(1, 16, 3, 8, 12, device="cuda")
    frames, want = make_vae("tensorrt", vae, engines_dir=str(out), checkpoint="tiny").decode(z), vae.decode(z)
    assert float((frames - want).norm() / want.norm()) <= 1e-3  # FP32 engine, TF32 off


def test_runtime_never_imports_export():
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    pat = re.compile(r"^\s*(from|import) export\b", re.M)
    offenders = [str(p.relative_to(root)) for p in (root / "runtime").rglob("*.py") if pat.search(p.read_text())]
    assert offenders == []
    code = ("import sys, runtime.backends.trt_backend, runtime.backends.ort_backend, runtime.manifest, "
            "runtime.generate; assert not [m for m in sys.modules if m == 'export' or m.startswith('export.')]")
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


@needs_rtx
def test_bad_compute_capability_fails_before_the_export(tmp_path, capsys):
    code = build_main(["--ckpt_dir", "tiny", "--out", str(tmp_path / "o"), "--trt", "tensorrt-rtx",
                       "--compute-capability", "8.6,9.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--compute-capability 9.0" in err[0] and "--trt tensorrt" in err[0]
    assert not (tmp_path / "o").exists()


def test_build_restores_the_callers_sigterm_handler(tmp_path):
    """export.build.main may run inside another program (a test process): its SIGTERM handler must not outlive it."""
    import signal

    from export.build import main as build_main

    before = signal.getsignal(signal.SIGTERM)
    assert build_main(["--ckpt_dir", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--onnx-only"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
