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
    from runtime.engines import read_manifest

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
    from runtime.engines import engine_key, read_manifest

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
