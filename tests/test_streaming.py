"""Streaming generation: clips handed on as they are decoded, the MP4 encoded clip by clip (tiny model, CPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from runtime.demo import demo_image, demo_speech
from runtime.errors import OutputError
from runtime.media import probe_mp4

FAST = dict(sample_steps=2, infer_frames=16, progress=False)
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_on_clip_frames_are_the_generate_frames(pipe):
    img, aud = demo_image(), demo_speech(2.2)   # 35 frames: 3 clips of 16 (−3 on the first), the last one trimmed
    whole = pipe.generate(img, aud, seed=5, **FAST)
    chunks = []
    streamed = pipe.generate(img, aud, seed=5, on_clip=chunks.append, **FAST)
    assert [c.shape[0] for c in chunks] == [13, 16, 6]
    assert all(c.dtype == np.uint8 and c.shape[1:] == whole.frames.shape[1:] for c in chunks)
    assert np.array_equal(np.concatenate(chunks), whole.frames)
    assert streamed.frames is None and streamed.info["frames"] == whole.frames.shape[0] == 35
    assert streamed.duration_s == whole.duration_s
    with pytest.raises(OutputError, match="streamed to on_clip"):
        streamed.save("never.mp4")


@pytest.mark.slow
def test_each_clip_leaves_before_the_next_is_made_and_none_is_kept(pipe):
    """The mechanism behind flat memory: clip r is handed on before clip r+1's first step, and nothing in the
    sampler still holds it when clip r+1 arrives."""
    import torch

    from runtime.preprocess import prepare_reference
    from runtime.sampler import SampleOptions

    events, refs = [], []

    def on_clip(video: torch.Tensor):
        if refs:
            events.append(("previous clip alive", refs[-1]() is not None))
        events.append(("clip", video.shape[1]))
        refs.append(weakref.ref(video))

    opts = SampleOptions(infer_frames=16, sample_steps=2)
    ref = prepare_reference(demo_image(), 64, 64)
    audio_emb, _ = pipe.encode_audio(pipe_audio(), 16)
    ctx, ctx_null = pipe.encode_prompts("talk")
    out = pipe.sampler.sample(ref, ctx, ctx_null, audio_emb, 3, opts, on_clip=on_clip,
                              progress=lambda r, n, i, s, stage: stage == "denoise" and events.append(("step", r, i)))
    assert out is None
    assert events == [("step", 0, 1), ("step", 0, 2), ("clip", 13),
                      ("step", 1, 1), ("step", 1, 2), ("previous clip alive", False), ("clip", 16),
                      ("step", 2, 1), ("step", 2, 2), ("previous clip alive", False), ("clip", 16)]


def pipe_audio():
    from runtime.media import load_audio

    wav, rate = demo_speech(3.0)
    return load_audio(wav, src_rate=rate)


@pytest.mark.slow
def test_generate_mp4_equals_generate_then_save(pipe, tmp_path):
    img, aud = demo_image(), demo_speech(1.7)
    saved = pipe.generate(img, aud, seed=1, **FAST).save(tmp_path / "saved.mp4")
    result = pipe.generate_mp4(tmp_path / "streamed.mp4", img, aud, seed=1, **FAST)
    a, b = probe_mp4(saved), probe_mp4(tmp_path / "streamed.mp4")
    assert a["video"]["frames"] == b["video"]["frames"] == result.info["frames"] == 27
    assert a["audio"]["samples"] == b["audio"]["samples"]
    assert b["audio"]["duration_s"] == pytest.approx(27 / 16, abs=1 / 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved.mp4", "streamed.mp4"]


@pytest.mark.slow
def test_generate_mp4_refuses_early_and_cleans_up(pipe, tmp_path, monkeypatch):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"keep")
    monkeypatch.setattr(pipe.sampler, "sample", lambda *a, **k: pytest.fail("generated before checking the path"))
    with pytest.raises(OutputError, match="already exists"):
        pipe.generate_mp4(out, demo_image(), demo_speech(1.0), **FAST)
    monkeypatch.undo()

    def stop_in_second_clip(clip, clips, step, steps):
        if clip == 1:
            raise KeyboardInterrupt

    fresh = tmp_path / "fresh.mp4"
    with pytest.raises(KeyboardInterrupt):
        pipe.generate_mp4(fresh, demo_image(), demo_speech(2.0), seed=0, **{**FAST, "progress": stop_in_second_clip})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"] and out.read_bytes() == b"keep"


def _peak_rss_mib(audio: Path, save: Path) -> float:
    cmd = [sys.executable, "-c",
           "import resource, sys; from runtime.generate import main; rc = main(sys.argv[1:]); "
           "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)",
           "--ckpt_dir", "tiny", "--size", "128*128", "--infer_frames", "80", "--sample_steps", "1",
           "--base_seed", "0", "--audio", str(audio), "--save_file", str(save)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stderr[-2000:]
    return int(re.search(r"PEAK_KIB (\d+)", res.stdout).group(1)) / 1024


@pytest.mark.skipif(os.environ.get("S2V_SLOW") != "1", reason="tens of minutes on a small CPU; run with S2V_SLOW=1")
def test_cli_peak_memory_is_flat_in_audio_length(tmp_path):
    import wave

    paths = {}
    for seconds in (10, 60):
        wav, rate = demo_speech(seconds)
        paths[seconds] = tmp_path / f"a{seconds}.wav"
        with wave.open(str(paths[seconds]), "wb") as f:
            f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
            f.writeframes((wav * 32767).astype(np.int16).tobytes())
    short = _peak_rss_mib(paths[10], tmp_path / "a10.mp4")
    long = _peak_rss_mib(paths[60], tmp_path / "a60.mp4")
    print(f"peak RSS: 10 s audio {short:.0f} MiB, 60 s audio {long:.0f} MiB")
    assert long - short <= 120
    info = probe_mp4(tmp_path / "a60.mp4")
    # The official clip count for 60 s at 80 frames is 12, and the first clip drops 3 frames: 957 frames, 59.81 s.
    assert info["video"]["frames"] == 12 * 80 - 3
    assert info["audio"]["duration_s"] == pytest.approx(957 / 16, abs=1 / 16)
