"""End-to-end runs of the tiny built-in model: API, clips, pose, start_from_ref, MP4 output, CLI."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch

from runtime import S2VPipeline
from runtime.demo import demo_image, demo_speech
from runtime.errors import InputError, OutputError
from runtime.generate import main as cli
from runtime.media import probe_mp4
from tests.conftest import GOLDEN, write_inputs

FAST = dict(sample_steps=3, infer_frames=16, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return S2VPipeline.from_pretrained("tiny", device="cpu")


def speech(seconds):
    return demo_speech(seconds)


def test_same_seed_same_frames_other_seed_differs(pipe):
    img, aud = demo_image(), speech(0.8)
    a = pipe.generate(img, aud, prompt="talk", seed=7, **FAST)
    b = pipe.generate(img, aud, prompt="talk", seed=7, **FAST)
    c = pipe.generate(img, aud, prompt="talk", seed=8, **FAST)
    assert a.frames.dtype == np.uint8 and a.frames.shape[-1] == 3
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


def test_two_clips_and_trim_to_audio(pipe):
    aud = speech(1.5)  # 24 video frames of audio; clip 0 gives 13 frames, so a second clip is needed
    r = pipe.generate(demo_image(), aud, seed=1, **FAST)
    assert r.info["clips"] == 2
    assert r.frames.shape[0] == 24  # 13 + 16 generated, trimmed to the audio like ffmpeg -shortest
    capped = pipe.generate(demo_image(), aud, seed=1, num_clip=1, **FAST)
    assert capped.info["clips"] == 1 and capped.frames.shape[0] == 13
    # the first clip does not depend on whether a second one follows
    assert np.array_equal(capped.frames, r.frames[:13])


def test_start_from_ref_and_pose_video(pipe, tmp_path):
    pose = tmp_path / "pose.mp4"
    with av.open(str(pose), "w") as out:
        s = out.add_stream("mpeg4", rate=16)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        for i in range(40):
            fr = np.zeros((64, 64, 3), np.uint8)
            fr[:, (i * 3) % 64:(i * 3) % 64 + 8] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    aud = speech(1.5)
    plain = pipe.generate(demo_image(), aud, seed=3, start_from_ref=True, **FAST)
    posed = pipe.generate(demo_image(), aud, seed=3, start_from_ref=True, pose_video=pose, **FAST)
    assert plain.frames.shape[0] == 24 and plain.info["clips"] == 2  # no 3-frame drop with start_from_ref
    assert not np.array_equal(plain.frames, posed.frames)


def test_inputs_as_path_bytes_and_arrays(pipe, tmp_path):
    img = demo_image()
    p = tmp_path / "face.png"
    img.save(p)
    wav, rate = speech(0.6)
    a = pipe.generate(p, (wav, rate), seed=2, **FAST)
    b = pipe.generate(p.read_bytes(), (wav, rate), seed=2, **FAST)
    c = pipe.generate(np.asarray(img), (wav, rate), seed=2, **FAST)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.frames, c.frames)


def test_save_writes_h264_aac_trimmed(pipe, tmp_path):
    r = pipe.generate(demo_image(), speech(1.0), seed=4, **FAST)
    out = r.save(tmp_path / "x.mp4")
    info = probe_mp4(out)
    assert info["video"]["codec"] == "h264" and info["video"]["pix_fmt"] == "yuv420p" and info["video"]["fps"] == 16
    assert info["audio"]["codec"] == "aac"
    assert info["video"]["frames"] == r.frames.shape[0]
    assert abs(info["audio"]["duration_s"] - r.frames.shape[0] / 16) < 1 / 16
    with pytest.raises(OutputError, match="exists"):
        r.save(out)
    r.save(out, overwrite=True)


def test_bad_arguments_are_typed(pipe):
    with pytest.raises(InputError, match="multiple of 4"):
        pipe.generate(demo_image(), speech(0.5), infer_frames=10)
    with pytest.raises(InputError, match="num_clip"):
        pipe.generate(demo_image(), speech(0.5), num_clip=0)
    with pytest.raises(InputError):
        pipe.generate(demo_image(), speech(0.5), size="abc")


def test_golden_e2e_matches_official():
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip(f"golden reference data not found at {GOLDEN}")
    import json

    from runtime.golden_checks.e2e import check

    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    for key in ("e2e", "e2e_pose"):
        for case in check(GOLDEN, manifest, key=key):
            assert case.passed, case


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_tiny_demo_writes_mp4_and_refuses_overwrite(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    args = ["--save_file", str(out), "--sample_steps", "2", "--infer_frames", "16", "--base_seed", "5"]
    assert cli(args) == 0
    assert probe_mp4(out)["video"]["frames"] > 0
    capsys.readouterr()
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert cli(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("flags,msg", [
    (["--infer_frames", "10"], "multiple of 4"),
    (["--num_clip", "0"], "num_clip"),
    (["--size", "12x"], "size"),
    (["--backend", "nope"], "unknown backend"),
    (["--task", "t2v-A14B"], "s2v-14B"),
    (["--ckpt_dir", "/nonexistent/ckpt", "--image", "IMAGE", "--audio", "AUDIO"], "not found"),
])
def test_cli_bad_flags_one_line_no_traceback(tmp_path, capsys, flags, msg):
    if "IMAGE" in flags:  # real inputs: they are checked before the checkpoint folder
        image, audio = write_inputs(tmp_path)
        flags = [str(image) if f == "IMAGE" else str(audio) if f == "AUDIO" else f for f in flags]
    code = cli(["--save_file", str(tmp_path / "o.mp4"), "--sample_steps", "1", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "o.mp4").exists()
