"""Hardening (the loaders, the CLI's output checks, export's arguments): each case reproduced on the CPU, each a
one-line error naming the file or flag, never a traceback."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from runtime.checkpoint import read_safetensors_header
from runtime.errors import CheckpointError, ConfigError, EngineMismatch


def _with_header(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("offsets", [["0", "4"], [0.5, 4], [0, None], [True, 4], [-1, 4]])
def test_non_integer_safetensors_offsets_are_refused(tmp_path, offsets):
    p = _with_header(tmp_path / "x.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": offsets}})
    with pytest.raises(CheckpointError, match="corrupt entry for 'w'"):
        read_safetensors_header(p)


def test_deeply_nested_json_is_one_line(tmp_path):
    from runtime.checkpoint import dit_weight_files
    from runtime.config import DiTConfig
    from runtime.manifest import read_manifest

    deep = "[" * 200_000 + "]" * 200_000
    (tmp_path / "config.json").write_text(deep)
    with pytest.raises(ConfigError, match="nested too deeply"):
        DiTConfig.from_json(tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(deep)
    with pytest.raises(CheckpointError, match="invalid index"):
        dit_weight_files(tmp_path)
    (tmp_path / "m.json").write_text(deep)
    with pytest.raises(EngineMismatch, match="nested too deeply"):
        read_manifest(tmp_path / "m.json", tmp_path)


@pytest.mark.parametrize("drop", ["io", "profiles"])
def test_engine_manifest_without_io_or_profiles_is_refused(tmp_path, drop):
    from runtime.manifest import engine_key, read_manifest

    fields = {"kind": "engine", "component": "dit", "io": {"inputs": [], "outputs": []}, "profiles": [{"batch": 1}]}
    fields.pop(drop)
    (tmp_path / "manifest.json").write_text(json.dumps({**fields, "key": engine_key(fields)}))
    with pytest.raises(EngineMismatch, match=f"manifest without {drop}"):
        read_manifest(tmp_path / "manifest.json", tmp_path)


def test_a_nan_anywhere_in_the_dit_weights_is_refused_at_load(tmp_path):
    """e.g. an audio injector's k bias: a NaN there changes the video without tripping the per-stage checks."""
    from runtime.models.dit import load_dit
    from runtime.tiny import tiny_dit
    from tests.checkpoints import save_dit

    model = tiny_dit()
    model.audio_injector.injector[1].k.bias.data[3] = float("nan")
    folder = save_dit(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"audio_injector\.injector\.1\.k\.bias holds NaN/Inf"):
        load_dit(folder)


def test_dangling_save_file_link_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    import runtime.pipeline as pipeline
    from runtime.generate import main

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    link = tmp_path / "out.mp4"
    link.symlink_to(tmp_path / "missing" / "x.mp4")
    assert main(["--save_file", str(link)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link to a missing file" in err[0]


@pytest.mark.parametrize("components", ["dti", "dit,vea", ","])
def test_export_refuses_unknown_components(tmp_path, capsys, components):
    from export.build import main

    assert main(["--ckpt_dir", "tiny", "--out", str(tmp_path / "e"), "--onnx-only", "--components", components]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose from dit, vae" in err[0]
    assert not (tmp_path / "e").exists()


def test_the_finite_check_leaves_good_weights_alone(tmp_path):
    from runtime.models.dit import load_dit
    from runtime.tiny import tiny_dit
    from tests.checkpoints import save_dit

    model = tiny_dit()
    loaded = load_dit(save_dit(model, tmp_path / "ok"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


# ------------------------------------------------------------------------------------------ engines folder, export
def _graph_with_external_data(folder, name="m.onnx", op=("", "Add")):
    """A real two-input ONNX graph whose weight lives in external data ``<name>.data``."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    domain, op_type = op
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32), "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [64])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [64])
    node = helper.make_node(op_type, ["x", "w"], ["y"], domain=domain)
    opsets = [helper.make_opsetid("", 23)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]), opset_imports=opsets)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, folder / name, save_as_external_data=True, location=name + ".data", size_threshold=0)
    return folder / name


def test_onnx_session_errors_with_a_matching_manifest_are_one_line(tmp_path):
    """A graph whose manifest is consistent but that ONNX Runtime refuses (here: an op it has no kernel for)."""
    from export.manifest import write_onnx_manifest
    from runtime.backends import make_backend
    from runtime.tiny import tiny_dit

    path = _graph_with_external_data(tmp_path / "onnx" / "dit", "model.onnx", op=("com.example", "Frobnicate"))
    write_onnx_manifest(path, "dit", "fp16", "tiny")
    with pytest.raises(EngineMismatch, match=r"model\.onnx: ONNX Runtime could not load the graph \(") as err:
        make_backend("onnxruntime", tiny_dit(), engines_dir=str(tmp_path), checkpoint="tiny")
    assert "\n" not in str(err.value) and "re-export with: python -m export.build" in str(err.value)


def test_onnx_hash_covers_only_the_files_the_graph_references(tmp_path):
    """Stray ``model.onnx.*`` siblings (a backup, a dangling link, a FIFO) are neither hashed nor opened; the
    referenced external data is, and a FIFO in its place is refused instead of blocking the reader."""
    import os

    from runtime.manifest import onnx_files, onnx_sha256

    path = _graph_with_external_data(tmp_path)
    assert onnx_files(path) == [path, tmp_path / "m.onnx.data"]
    h = onnx_sha256(path)
    (tmp_path / "m.onnx.bak").write_bytes(b"old copy")
    (tmp_path / "m.onnx.link").symlink_to(tmp_path / "missing")
    os.mkfifo(tmp_path / "m.onnx.fifo")
    assert onnx_sha256(path) == h and onnx_files(path) == [path, tmp_path / "m.onnx.data"]
    (tmp_path / "m.onnx.bak").unlink()                    # deleting a stray file changes nothing either
    assert onnx_sha256(path) == h
    data = (tmp_path / "m.onnx.data").read_bytes()
    (tmp_path / "m.onnx.data").write_bytes(data[:-1] + b"\x01")
    assert onnx_sha256(path) != h                          # the referenced weights are covered
    (tmp_path / "m.onnx.data").unlink()
    os.mkfifo(tmp_path / "m.onnx.data")
    with pytest.raises(EngineMismatch, match=r"m\.onnx\.data: the external data of the ONNX graph is not a regular file"):
        onnx_sha256(path)


def test_export_refuses_a_symlinked_folder_leading_out_of_out(tmp_path, capsys):
    from export.build import main

    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "model.onnx").write_bytes(b"precious")
    (out / "onnx").mkdir(parents=True)
    (out / "onnx" / "dit").symlink_to(victim)
    assert main(["--ckpt_dir", "tiny", "--out", str(out), "--onnx-only", "--components", "dit", "--no-validate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "leads out of the output folder" in err[0] and "onnx/dit" in err[0]
    assert sorted(p.name for p in victim.iterdir()) == ["model.onnx"] and (victim / "model.onnx").read_bytes() == b"precious"


def test_export_out_inside_links_are_fine_and_checked_at_write_time(tmp_path):
    from export.files import check_out, inside

    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "onnx").symlink_to(out / "real")               # a link that stays inside is followed as usual
    (out / "unused").symlink_to(tmp_path)                 # a link the export never writes in is left alone
    assert check_out(out, ["onnx/dit", "onnx/vae", "dit"]) == out
    assert inside(out / "onnx" / "dit", out) == out / "onnx" / "dit"
    (tmp_path / "elsewhere").mkdir()
    (out / "vae_decoder_first").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="leads out of the output folder"):
        inside(out / "vae_decoder_first" / "abc", out)    # the check build_engines makes before writing a plan


@pytest.mark.parametrize("case", ["file", "under_file", "dangling"])
def test_export_bad_out_fails_early_in_one_line(tmp_path, capsys, monkeypatch, case):
    import export.build as build

    monkeypatch.setattr(build, "load_dit", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "f").write_text("a file")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "sub", "dangling": tmp_path / "link" / "sub"}[case]
    assert build.main(["--ckpt_dir", "tiny", "--out", str(out), "--onnx-only", "--components", "dit"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}") and "choose" in err[0]


def test_paths_with_newlines_cannot_forge_log_or_error_lines(tmp_path, capsys):
    from export.build import main
    from runtime.backends import make_backend
    from runtime.quoting import shown
    from runtime.tiny import tiny_dit

    assert shown("/a/b c") == "/a/b c" and shown("/a\nerror: forged") == repr("/a\nerror: forged")
    forged = tmp_path / "x\nerror: forged line"
    forged.write_text("a file, not a folder")
    assert main(["--ckpt_dir", "tiny", "--out", str(forged), "--onnx-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\\nerror: forged line" in err
    with pytest.raises(Exception) as e:
        make_backend("onnxruntime", tiny_dit(), engines_dir=str(forged))
    assert "\n" not in str(e.value) and "\\n" in str(e.value)
