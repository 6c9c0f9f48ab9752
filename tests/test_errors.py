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
from runtime.errors import CheckpointError, ConfigError, InputError
from runtime.generate import main as cli
from tests.checkpoints import save_dit
from runtime.tiny import tiny_dit
from tests.conftest import write_inputs

FAST = dict(sample_steps=2, infer_frames=16, progress=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*"))


def _interrupt(cmd: list[str], folder: Path, sig: int, after_s: float = 0.0, ready: str | None = None,
               timeout: float = 240.0) -> tuple[int, str]:
    """Run ``cmd``, send ``sig`` once a stderr line contains ``ready`` (a readiness marker, then ``after_s`` more
    seconds) or after ``after_s`` seconds; return (exit code, stderr)."""
    # PYTHONPATH: the checkout under test, not whatever copy of the package is installed
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if ready is not None and ready in line:
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if ready is not None:
        assert seen.wait(timeout), f"no {ready!r} in the output: {''.join(lines)[-500:]}"
    time.sleep(after_s)
    assert proc.poll() is None, "the run finished before it could be interrupted; make it longer"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    return proc.returncode, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_signal_during_generation_leaves_no_output(tmp_path, sig, code):
    cmd = [sys.executable, "-m", "runtime.generate", "--save_file", "out.mp4", "--size", "256*256", "--base_seed", "1"]
    rc, err = _interrupt(cmd, tmp_path, sig, after_s=1.0, ready="loaded tiny")  # the model is loaded: generating
    assert rc == code, err[-500:]
    assert leftovers(tmp_path) == [], leftovers(tmp_path)


@pytest.mark.slow
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
    for hint in ("--size", "--infer_frames", "--max_gpu_memory", "--offload blocks", "--offload_model", "--t5_cpu"):
        assert hint in err[0]
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
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


@pytest.mark.slow
def test_long_prompt_warns_and_truncates(pipe):
    with pytest.warns(UserWarning, match="only the first 512"):
        r = pipe.generate(demo_image(), demo_speech(0.5), prompt="talking " * 200, **FAST)
    assert r.frames.shape[0] > 0


@pytest.mark.slow
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


# ------------------------------------------------------------------------ fail fast, before the model loads
def write_wav(path: Path, seconds: float = 0.5) -> Path:
    import wave

    samples, rate = demo_speech(seconds)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture
def inputs(tmp_path):
    """A folder with a good image and audio, a corrupt one of each, an empty file and an existing output."""
    d = tmp_path / "in"
    d.mkdir()
    demo_image().save(d / "face.png")
    write_wav(d / "a.wav")
    (d / "bad.png").write_bytes(b"GIF89a this is not an image")
    (d / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all" * 4)
    (d / "empty.png").write_bytes(b"")
    (tmp_path / "kept.mp4").write_bytes(b"precious")
    return tmp_path


@pytest.fixture
def no_model_load(monkeypatch):
    def fail(*a, **k):
        pytest.fail("the model was loaded before the bad input or output location was refused")

    monkeypatch.setattr(S2VPipeline, "from_pretrained", fail)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("flags,msg", [
    (["--image", "{t}/in/nope.png"], "--image {t}/in/nope.png: image file does not exist"),
    (["--image", "{t}/in"], "is a directory"),
    (["--image", "{t}/in/empty.png"], "empty (0 bytes)"),
    (["--image", "{t}/in/bad.png"], "not a readable image"),
    (["--audio", "{t}/in/nope.wav"], "--audio {t}/in/nope.wav: audio file does not exist"),
    (["--audio", "{t}/in/bad.wav"], "not decodable audio"),
    (["--pose_video", "{t}/in/nope.mp4"], "--pose_video"),
    (["--save_file", "{t}/missing/o.mp4"], "folder {t}/missing does not exist"),
    (["--save_file", "{t}/in"], "is a directory"),
    (["--save_file", "/proc/o.mp4"], "pseudo-filesystem"),
    (["--save_file", "/sys/kernel/o.mp4"], "pseudo-filesystem"),
    (["--save_file", "{t}/o.avi"], "ending in .mp4"),
    (["--save_file", "{t}/kept.mp4"], "already exists; pass --overwrite"),
    (["--device", "foo"], "--device 'foo' is not a device name"),
    pytest.param(["--device", "cuda"], "--device 'cuda'", marks=pytest.mark.skipif(not NO_CUDA, reason="CUDA present")),
    (["--device", "cuda:99"] if not NO_CUDA else ["--device", "tpu"], "--device"),
    (["--base_seed", "99999999999999999999"], "--base_seed 99999999999999999999: must be in [0, 2**63 - 1]"),
    (["--base_seed", "-2"], "--base_seed -2"),
    (["--sample_guide_scale", "inf"], "--sample_guide_scale inf: must be a finite number"),
    (["--sample_guide_scale", "nan"], "--sample_guide_scale nan"),
    (["--sample_shift", "inf"], "--sample_shift inf: must be a positive finite number"),
    (["--sample_shift", "nan"], "--sample_shift nan"),
    (["--sample_shift", "0"], "--sample_shift 0.0"),
    (["--sample_steps", "100000"], "--sample_steps 100000"),
    (["--size", "100000*100000"], "above the maximum"),
    (["--backend", "nope"], "unknown backend"),
    (["--backend", "torch-graph", "--offload_model", "true"], "offload_model cannot be used with backend torch-graph"),
])
def test_cli_refuses_before_the_model_loads(inputs, no_model_load, capsys, flags, msg):
    flags = [f.format(t=inputs) for f in flags]
    if "--save_file" not in flags:
        flags += ["--save_file", str(inputs / "o.mp4")]
    before = snapshot(inputs)
    code = cli(["--sample_steps", "1", *flags] if "--sample_steps" not in flags else flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and msg.format(t=inputs) in err[0] and "Traceback" not in err[0], err
    assert snapshot(inputs) == before  # nothing written, nothing lost


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_cli_unreadable_input_and_unwritable_folder(inputs, no_model_load, capsys):
    locked = inputs / "locked"
    locked.mkdir()
    (inputs / "in" / "face.png").chmod(0)
    locked.chmod(0o500)
    try:
        assert cli(["--image", str(inputs / "in" / "face.png"), "--save_file", str(inputs / "o.mp4")]) == 2
        assert "not readable" in capsys.readouterr().err
        assert cli(["--save_file", str(locked / "o.mp4")]) == 2
        assert "cannot write in" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_bad_config_json_fails_before_anything_loads(tmp_path, capsys, monkeypatch):
    """eps: -1 (or any out-of-range value) is refused before UMT5, the VAE or the DiT are loaded."""
    import json

    from runtime import checkpoint as ck
    from runtime.models import text

    ckpt = save_dit(tiny_dit(), tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "eps": -1}))
    for rel in (ck.VAE_FILE, ck.T5_FILE):
        (ckpt / rel).write_bytes(b"x")
    for rel in (ck.T5_TOKENIZER, ck.WAV2VEC_DIR):
        (ckpt / rel).mkdir(parents=True)
    monkeypatch.setattr(text.TextEncoder, "from_checkpoint", lambda *a, **k: pytest.fail("UMT5 loaded first"))
    demo_image().save(tmp_path / "face.png")
    code = cli(["--ckpt_dir", str(ckpt), "--image", str(tmp_path / "face.png"), "--audio", str(write_wav(tmp_path / "a.wav")),
                "--save_file", str(tmp_path / "o.mp4")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "eps=-1 must be a small positive number" in err[0], err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("change,match", [
    ({"eps": -1}, "eps=-1"),
    ({"eps": 0}, "eps=0"),
    ({"eps": float("nan")}, "eps=nan"),
    ({"eps": "1e-6"}, "eps must be a number"),
    ({"dim": 10**9}, r"dim=1000000000 is outside the sane range"),
    ({"num_layers": 10**6}, "num_layers"),
    ({"num_heads": 0}, "num_heads=0"),
    ({"text_len": 10**8}, "text_len"),
    ({"dim": 16384, "ffn_dim": 65536, "num_heads": 128, "num_layers": 200}, "parameters, above the 50B"),
    ({"qk_norm": 1}, "qk_norm must be true or false"),
    ({"patch_size": [1, "2", 2]}, "patch_size must be a list of integers"),
    ({"num_audio_token": True}, "num_audio_token must be an integer"),
])
def test_config_values_are_bounded_before_building(change, match):
    from runtime.config import DiTConfig
    from tests.test_dit import official_config

    with pytest.raises(ConfigError, match=match):
        DiTConfig.from_dict({**official_config(), **change})


def test_size_has_an_upper_bound():
    from runtime.config import MAX_AREA
    from runtime.preprocess import parse_size

    assert parse_size("1920*1080") == MAX_AREA
    with pytest.raises(InputError, match="above the maximum"):
        parse_size("1920*1088")


# ------------------------------------------------------------------------ no silent garbage
def _corrupt(pipe, part: str, value: float):
    """Poison one tensor of the tiny model in place; returns a function that restores it."""
    tensor = {"dit": pipe.dit.head.head.weight, "decoder": pipe.vae.decoder.head[2].weight,
              "encoder": pipe.vae.encoder.conv1.weight}[part]
    saved = tensor.clone()
    if value == "huge":
        tensor.mul_(1e6)  # finite, but far beyond any real latent
    else:
        tensor.view(-1)[0] = value
    return lambda: tensor.copy_(saved)


@pytest.mark.slow
@pytest.mark.parametrize("part,value,stage", [
    ("dit", float("nan"), "DiT denoising of clip 1/2 produced NaN/Inf values"),
    ("dit", float("inf"), "DiT denoising of clip 1/2 produced NaN/Inf"),
    ("dit", "huge", "DiT denoising of clip 1/2 produced values up to"),
    ("decoder", float("nan"), "VAE decode of clip 1/2 produced NaN/Inf"),
    ("encoder", float("inf"), "VAE encode of the reference image produced NaN/Inf"),
])
def test_non_finite_stage_is_named(pipe, part, value, stage):
    from runtime.errors import NumericalError

    restore = _corrupt(pipe, part, value)
    try:
        with pytest.raises(NumericalError, match=stage):
            pipe.generate(demo_image(), demo_speech(1.5), seed=1, **FAST)
    finally:
        restore()
    assert pipe.generate(demo_image(), demo_speech(0.5), seed=1, **FAST).frames.shape[0] > 0  # restored


@pytest.mark.slow
def test_cli_nan_weights_write_no_video(tmp_path, capsys, monkeypatch):
    from runtime import tiny

    def nan_dit(*a, **k):
        model = tiny_dit(*a, **k)
        model.head.head.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(tiny, "tiny_dit", nan_dit)
    code = cli(["--save_file", str(tmp_path / "o.mp4"), "--sample_steps", "1", "--infer_frames", "16", "--num_clip", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "DiT denoising of clip 1/1 produced NaN/Inf" in err.strip().splitlines()[-1]  # after the progress bar
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------ resources and signals
@pytest.mark.parametrize("where,exc,msg", [
    ("generate", RuntimeError("[enforce fail at alloc_cpu.cpp:119] . DefaultCPUAllocator: can't allocate memory: "
                              "you tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)"),
     "CPU out of memory (host RAM) at --size 64*64"),
    ("generate", MemoryError(), "CPU out of memory (host RAM) at --size"),
    ("from_pretrained", MemoryError(), "CPU out of memory (host RAM) while loading tiny"),
    ("from_pretrained", torch.cuda.OutOfMemoryError("CUDA out of memory."), "GPU out of memory while loading tiny"),
])
def test_cpu_out_of_memory_gets_one_line(monkeypatch, tmp_path, capsys, where, exc, msg):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(S2VPipeline, where, boom)
    assert cli(["--save_file", str(tmp_path / "o.mp4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert leftovers(tmp_path) == []


def test_other_runtime_errors_are_not_called_out_of_memory(monkeypatch, tmp_path):
    def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(S2VPipeline, "generate", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli(["--save_file", str(tmp_path / "o.mp4")])


SLOW_NATIVE_LOAD = """
import os, sys
from runtime.pipeline import S2VPipeline

def slow(*a, **k):  # a native call that ignores signals (glibc's system() retries waitpid on EINTR)
    print("loading", file=sys.stderr, flush=True)
    os.system("exec sleep 30 >/dev/null 2>&1 </dev/null")  # exec: no shell left holding our stderr

S2VPipeline.from_pretrained = slow
from runtime.generate import main
sys.exit(main(["--save_file", "out.mp4"]))
"""


def test_sigterm_is_honoured_while_a_native_call_runs(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_NATIVE_LOAD], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr.readline().strip() == "loading"
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    waited = time.monotonic() - t0
    assert proc.returncode == 143, err
    assert waited < 15, f"exit took {waited:.1f}s (the native call lasts 30s)"
    assert "terminated: no output written" in err
    assert leftovers(tmp_path) == []


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler (Linux /proc: the SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the signal mask from /proc (Linux)")
def test_sigterm_while_the_cli_starts_is_still_a_clean_exit(tmp_path):
    """The handlers are installed before anything slow (parsing imports torch): a SIGTERM sent as soon as the
    process catches it, long before the model loads, ends with 143 and the message, not the default kill."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.generate", "--save_file", "out.mp4"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None and time.time() < deadline, "the CLI never installed a SIGTERM handler"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-500:]
    assert "terminated" in err and "loaded" not in err and leftovers(tmp_path) == []


def test_temp_files_are_registered_until_published_and_removed_on_a_forced_exit(tmp_path):
    """What the signal watcher removes before ``os._exit`` when the main thread cannot unwind: exactly the
    temporary files created and not yet published or removed."""
    from runtime.media import atomic

    a, b = atomic._create_temp(tmp_path / "a.mp4"), atomic._create_temp(tmp_path / "b.mp4")
    assert a.exists() and b.exists() and {a, b} <= atomic._LIVE
    atomic._publish(b, tmp_path / "b.mp4", overwrite=False)
    assert b not in atomic._LIVE and (tmp_path / "b.mp4").exists()
    atomic.remove_live_temps()
    assert not a.exists() and a not in atomic._LIVE and (tmp_path / "b.mp4").exists()


def test_stale_temp_files_of_dead_processes_are_removed_at_the_next_run(tmp_path):
    from runtime.media import atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = atomic._host()
    stale = tmp_path / f".out.mp4.{host}.{dead_pid}.0badc0de.part"
    live = tmp_path / f".out.mp4.{host}.{os.getppid()}.0badc0de.part"       # a live process (our parent)
    other_host = tmp_path / f".out.mp4.otherhost.{dead_pid}.0badc0de.part"  # a shared folder: not ours to judge
    unrelated = tmp_path / ".other.mp4.x.1.0badc0de.part"
    for p in (stale, live, other_host, unrelated):
        p.write_bytes(b"x")
    tmp = atomic._create_temp(tmp_path / "out.mp4")
    assert not stale.exists() and live.exists() and other_host.exists() and unrelated.exists()
    atomic._remove_quietly(tmp)
