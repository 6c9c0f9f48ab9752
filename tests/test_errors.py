"""Bad input, broken artefacts and interruptions: one-line errors, typed exceptions, nothing left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from runtime import S2VPipeline
from runtime.checkpoint import read_safetensors_header
from runtime.demo import demo_image, demo_speech
from runtime.errors import CheckpointError
from runtime.generate import main as cli
from runtime.models.dit import save_dit
from runtime.tiny import tiny_dit
from tests.conftest import write_inputs

FAST = dict(sample_steps=2, infer_frames=16, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return S2VPipeline.from_pretrained("tiny", device="cpu")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def _interrupt(cmd: list[str], folder: Path, sig: int, after_s: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(after_s)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_generation_leaves_no_output(tmp_path, sig, code):
    cmd = [sys.executable, "-m", "runtime.generate", "--save_file", "out.mp4", "--size", "256*256", "--base_seed", "1"]
    rc, err = _interrupt(cmd, tmp_path, sig, after_s=8)
    assert rc == code, err[-500:]
    assert leftovers(tmp_path) == [], leftovers(tmp_path)


def test_signal_during_onnx_export_leaves_no_partial_graph(tmp_path):
    cmd = [sys.executable, "-m", "export.build", "--ckpt_dir", "tiny", "--out", "eng", "--onnx-only", "--no-validate",
           "--components", "dit"]
    rc, err = _interrupt(cmd, tmp_path, signal.SIGTERM, after_s=9)
    assert rc == 143, err[-500:]
    names = leftovers(tmp_path)
    assert "model.onnx" not in names and not [n for n in names if "partial" in n], names


def test_out_of_memory_names_what_fits(monkeypatch, tmp_path, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(S2VPipeline, "generate", oom)
    assert cli(["--save_file", str(tmp_path / "o.mp4"), "--size", "1024*704"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out of memory" in err[0]
    for hint in ("--size", "--infer_frames", "--offload_model", "--t5_cpu"):
        assert hint in err[0]
    assert not (tmp_path / "o.mp4").exists()


def test_two_threads_on_one_pipeline_are_serialized(pipe):
    img, aud = demo_image(), demo_speech(0.8)
    expected = {s: pipe.generate(img, aud, seed=s, **FAST).frames for s in (11, 12)}
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda s=s: got.__setitem__(s, pipe.generate(img, aud, seed=s, **FAST).frames))
               for s in (11, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (11, 12):
        assert np.array_equal(got[s], expected[s])


def test_missing_component_files_are_named(tmp_path, capsys):
    ckpt = save_dit(tiny_dit(), tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="Wan2.1_VAE.pth"):
        S2VPipeline.from_pretrained(ckpt, device="cpu")
    image, audio = write_inputs(tmp_path)  # real inputs: they are checked before the checkpoint folder
    code = cli(["--ckpt_dir", str(ckpt), "--image", str(image), "--audio", str(audio), "--save_file", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing from the checkpoint folder" in err[0]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="multiple of 4"):
        cli(["--infer_frames", "6", "--debug", "--save_file", str(tmp_path / "o.mp4")])


def test_long_prompt_warns_and_truncates(pipe):
    with pytest.warns(UserWarning, match="only the first 512"):
        r = pipe.generate(demo_image(), demo_speech(0.5), prompt="talking " * 200, **FAST)
    assert r.frames.shape[0] > 0


def test_long_audio_gives_the_official_clip_count(pipe):
    # 6 s at 16 frames per clip: N30 = 179 → official int(179/30)+1 = 6 clips; the last one still has audio
    r = pipe.generate(demo_image(), demo_speech(6.0), sample_steps=1, infer_frames=16, progress=False)
    assert r.info["official_clips"] == 6 and r.info["clips"] == 6
    assert r.frames.shape[0] == 6 * 16 - 3  # all generated frames fit in the audio (96 frames long)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=256), st.integers(min_value=0, max_value=2**40))
def test_fuzz_safetensors_header_reader(tmp_path, blob, n):
    path = tmp_path / "w.safetensors"
    path.write_bytes(n.to_bytes(8, "little") + blob)
    try:
        read_safetensors_header(path)
    except CheckpointError as err:
        assert str(path) in str(err)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.text(min_size=1, max_size=8), st.one_of(
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "X", "I64"]), "shape": st.lists(st.integers(0, 4), max_size=3),
                           "data_offsets": st.lists(st.integers(-5, 64), min_size=0, max_size=3)}),
    st.integers(), st.text()), max_size=4), st.binary(max_size=64))
def test_fuzz_safetensors_loader_with_json_headers(tmp_path, header, payload):
    import json

    from runtime.checkpoint import iter_tensors

    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + payload)
    try:
        list(iter_tensors({k: path for k in header}))
    except CheckpointError:
        pass
