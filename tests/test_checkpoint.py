"""Checkpoint-folder confinement: every file a loader reads stays inside the checkpoint folder, and error
messages never quote a foreign file's bytes."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from runtime import checkpoint as ck
from runtime.errors import CheckpointError
from runtime.generate import main as cli
from runtime.models.dit import load_dit
from tests.checkpoints import save_dit
from runtime.tiny import tiny_dit
from tests.conftest import Payload, write_inputs

SECRET = b"root:x:0:0:root:/root:/bin/bash\nSECRET-TOKEN-1234\n"


@pytest.fixture(scope="module")
def model():
    return tiny_dit()


@pytest.fixture()
def ckpt(tmp_path, model) -> Path:
    return save_dit(model, tmp_path / "ckpt", shards=2)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))


def point_index(folder: Path, old: str, new: str) -> None:
    index = folder / ck.DIT_INDEX
    data = json.loads(index.read_text())
    data["weight_map"] = {k: (new if v == old else v) for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("entry", ["../outside.safetensors", "ABS", "sub/../../outside.safetensors",
                                   "..\\outside.safetensors"])
def test_index_entries_outside_the_folder_are_refused(ckpt, entry):
    shard = shards(ckpt)[0]
    outside = ckpt.parent / "outside.safetensors"
    shutil.move(shard, outside)  # a complete, valid shard: only the confinement can stop it loading
    entry = str(outside) if entry == "ABS" else entry
    point_index(ckpt, shard.name, entry)
    with pytest.raises(CheckpointError, match="outside the checkpoint folder") as err:
        load_dit(ckpt)
    assert "\n" not in str(err.value)


def test_shard_linking_outside_is_refused_and_inside_is_fine(ckpt, model, tmp_path):
    shard = shards(ckpt)[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="links to .*outside the checkpoint folder"):
        load_dit(ckpt)
    shard.unlink()
    (ckpt / "blobs").mkdir()
    shutil.move(outside, ckpt / "blobs" / "abc")
    shard.symlink_to(Path("blobs") / "abc")  # a link that stays inside the folder is fine
    assert same_weights(load_dit(ckpt), model)


def test_hugging_face_cache_snapshot_links_load(tmp_path, model):
    # huggingface_hub stores <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>: the standard download layout
    flat = save_dit(model, tmp_path / "flat", shards=2)
    repo = tmp_path / "models--Wan-AI--Wan2.2-S2V-14B"
    snap, blobs = repo / "snapshots" / "rev1", repo / "blobs"
    snap.mkdir(parents=True), blobs.mkdir()
    for i, f in enumerate(sorted(flat.iterdir())):
        shutil.move(f, blobs / f"hash{i}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"hash{i}"))
    assert same_weights(load_dit(snap), model)


def test_non_safetensors_shard_is_never_quoted(ckpt):
    shard = shards(ckpt)[0]
    shard.write_bytes(SECRET)
    with pytest.raises(CheckpointError) as err:
        load_dit(ckpt)
    msg = str(err.value)
    assert shard.name in msg and "SECRET" not in msg and "root:" not in msg
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in msg  # the length field is the file's first 8 bytes
    bad_json = struct.pack("<Q", 20) + b"\xffroot:x:0:SECRET-TOKEN" + b"\0" * 32
    shard.write_bytes(bad_json)
    with pytest.raises(CheckpointError, match="not a safetensors file") as err:
        load_dit(ckpt)
    assert "root:" not in str(err.value) and "SECRET" not in str(err.value) and "xff" not in str(err.value)


def test_invalid_weight_map_values(ckpt):
    index = ckpt / ck.DIT_INDEX
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = 7
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="not a file name"):
        load_dit(ckpt)


def full_folder(ckpt: Path) -> Path:
    """The official file names around the DiT (empty stand-ins: confinement is checked before any is read)."""
    (ckpt / ck.VAE_FILE).write_bytes(b"")
    (ckpt / ck.T5_FILE).write_bytes(b"")
    (ckpt / ck.T5_TOKENIZER).mkdir(parents=True)
    (ckpt / ck.WAV2VEC_DIR).mkdir()
    (ckpt / ck.WAV2VEC_DIR / "config.json").write_text("{}")
    return ckpt


def test_check_folder_covers_every_component(ckpt, tmp_path):
    full_folder(ckpt)
    ck.check_folder(ckpt)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    for rel in (ck.VAE_FILE, f"{ck.WAV2VEC_DIR}/config.json"):
        victim = ckpt / rel
        victim.unlink()
        victim.symlink_to(secret)
        with pytest.raises(CheckpointError, match=f"{victim.name}: links to .*outside"):
            ck.check_folder(ckpt)
        victim.unlink()
        victim.write_bytes(b"")
    (ckpt / ck.T5_TOKENIZER / "spiece.model").symlink_to(secret)
    with pytest.raises(CheckpointError, match="spiece.model: links to"):
        ck.check_folder(ckpt)


def test_cli_refuses_an_escaping_index_before_loading(ckpt, tmp_path, monkeypatch, capsys):
    full_folder(ckpt)
    shard = shards(ckpt)[0]
    shutil.move(shard, tmp_path / "outside.safetensors")
    point_index(ckpt, shard.name, "../outside.safetensors")

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the folder was checked")

    monkeypatch.setattr("runtime.models.text.TextEncoder.from_checkpoint", no_load)
    out = tmp_path / "o.mp4"
    image, audio = write_inputs(tmp_path)
    code = cli(["--ckpt_dir", str(ckpt), "--image", str(image), "--audio", str(audio), "--save_file", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[")]
    assert code == 2 and len(err) == 1 and "outside the checkpoint folder" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_files_weights_only_and_legacy(tmp_path, capsys, legacy):
    path = tmp_path / "w.pth"
    sd = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = ck.load_torch_state_dict(path, "test file")
    assert set(got) == {"a", "b"} and all(torch.equal(got[k], sd[k]) for k in sd)
    torch.save({"a": torch.zeros(1), "x": Payload()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="objects other than tensors"):
        ck.load_torch_state_dict(path, "test file")
    assert "pickled code ran" not in capsys.readouterr().out
    torch.save({"a": [torch.zeros(1)]}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="not a plain state dict"):
        ck.load_torch_state_dict(path, "test file")


@pytest.mark.parametrize("blob", [SECRET, b"PK\x03\x04" + SECRET, b"\x80\x02" + SECRET, b"S" * 64])
def test_foreign_pth_bytes_are_never_quoted(tmp_path, blob):
    from runtime.models.vae import load_vae

    path = tmp_path / "Wan2.1_VAE.pth"
    path.write_bytes(blob)
    for load in (lambda: ck.load_torch_state_dict(path, "VAE checkpoint"), lambda: load_vae(path)):
        with pytest.raises(CheckpointError, match="not a readable VAE checkpoint") as err:
            load()
        msg = str(err.value).replace(str(tmp_path), "")
        assert "\n" not in msg and "SECRET" not in msg and "root:" not in msg and "83" not in msg, msg
