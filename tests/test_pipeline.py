"""End-to-end runs of the tiny built-in model: API, clips, pose, start_from_ref, MP4 output, CLI."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from runtime import S2VPipeline
from runtime.demo import demo_image, demo_speech
from runtime.errors import InputError, OutputError
from runtime.generate import main as cli
from runtime.media import probe_mp4
from tests.conftest import golden_dir, golden_manifest, pose_mp4, write_inputs

FAST = dict(sample_steps=3, infer_frames=16, progress=False)
QUICK = dict(sample_steps=1, infer_frames=16, progress=False)  # where the number of steps does not matter


def speech(seconds):
    return demo_speech(seconds)


@pytest.mark.slow
def test_same_seed_same_frames_other_seed_differs(pipe):
    img, aud = demo_image(), speech(0.8)
    a = pipe.generate(img, aud, prompt="talk", seed=7, **FAST)
    b = pipe.generate(img, aud, prompt="talk", seed=7, **FAST)
    c = pipe.generate(img, aud, prompt="talk", seed=8, **FAST)
    assert a.frames.dtype == np.uint8 and a.frames.shape[-1] == 3
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.slow
def test_two_clips_and_trim_to_audio(pipe):
    aud = speech(1.5)  # 24 video frames of audio; clip 0 gives 13 frames, so a second clip is needed
    r = pipe.generate(demo_image(), aud, seed=1, **FAST)
    assert r.info["clips"] == 2
    assert r.frames.shape[0] == 24  # 13 + 16 generated, trimmed to the audio like ffmpeg -shortest
    capped = pipe.generate(demo_image(), aud, seed=1, num_clip=1, **FAST)
    assert capped.info["clips"] == 1 and capped.frames.shape[0] == 13
    # the first clip does not depend on whether a second one follows
    assert np.array_equal(capped.frames, r.frames[:13])


def write_pose_video(path, frames: int = 40, size: int = 64):
    path.write_bytes(pose_mp4(frames, size))
    return path


@pytest.mark.slow
def test_start_from_ref_and_pose_video(pipe, tmp_path):
    pose = write_pose_video(tmp_path / "pose.mp4")
    aud = speech(1.5)
    plain = pipe.generate(demo_image(), aud, seed=3, start_from_ref=True, **FAST)
    posed = pipe.generate(demo_image(), aud, seed=3, start_from_ref=True, pose_video=pose, **FAST)
    assert plain.frames.shape[0] == 24 and plain.info["clips"] == 2  # no 3-frame drop with start_from_ref
    assert not np.array_equal(plain.frames, posed.frames)


@pytest.mark.slow
def test_inputs_as_path_bytes_and_arrays(pipe, tmp_path):
    img = demo_image()
    p = tmp_path / "face.png"
    img.save(p)
    wav, rate = speech(0.6)
    a = pipe.generate(p, (wav, rate), seed=2, **FAST)
    b = pipe.generate(p.read_bytes(), (wav, rate), seed=2, **FAST)
    c = pipe.generate(np.asarray(img), (wav, rate), seed=2, **FAST)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.frames, c.frames)


@pytest.mark.slow
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


@pytest.mark.parametrize("key", ["e2e", pytest.param("e2e_pose", marks=pytest.mark.slow)])
def test_golden_e2e_matches_official(key):
    from runtime.golden_checks.e2e import check

    cases = check(golden_dir(), golden_manifest(), key=key)
    assert cases and all(case.passed for case in cases), cases


@pytest.mark.slow
def test_progress_reports_vae_stages_and_four_argument_callbacks_still_work(pipe):
    events, old = [], []
    kw = dict(seed=1, sample_steps=2, infer_frames=16)
    r = pipe.generate(demo_image(), speech(1.5), progress=lambda *a: events.append(a), **kw)
    assert r.info["clips"] == 2
    assert events == [(0, 2, 1, 2, "denoise"), (0, 2, 2, 2, "denoise"), (0, 2, 1, 1, "vae_decode"),
                      (0, 2, 1, 1, "vae_encode"),  # the motion history for clip 2; none after the last clip
                      (1, 2, 1, 2, "denoise"), (1, 2, 2, 2, "denoise"), (1, 2, 1, 1, "vae_decode")]
    pipe.generate(demo_image(), speech(1.5), progress=lambda clip, clips, step, steps: old.append((clip, step)), **kw)
    assert old == [(0, 1), (0, 2), (1, 1), (1, 2)]


@pytest.mark.slow
def test_motion_history_is_not_encoded_after_the_last_clip(pipe, monkeypatch):
    calls = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x: calls.append(x.shape[2]) or encode(x))
    pipe.generate(demo_image(), speech(1.5), seed=1, **QUICK)
    assert calls == [1, 73]  # the reference, then the 73-frame history after clip 1 only (not after clip 2)


@pytest.mark.slow
def test_offload_model_moves_the_dit_off_the_device_between_clips(pipe, monkeypatch):
    """As the official offload_model: DiT to the device before each clip's denoising, back to the CPU before the VAE."""
    offloaded = S2VPipeline.from_pretrained("tiny", device="cpu", offload_model=True)

    def record(p):
        events = []
        for obj, name in ((p.dit, "to"), (p.backend, "forward"), (p.sampler, "_decode")):
            real = getattr(obj, name)
            monkeypatch.setattr(obj, name, lambda *a, real=real, name=name, **k: events.append(name) or real(*a, **k))
        return events

    moved, resident = record(offloaded), record(pipe)
    a = offloaded.generate(demo_image(), speech(1.5), seed=1, **QUICK)
    b = pipe.generate(demo_image(), speech(1.5), seed=1, **QUICK)
    assert moved == ["to", "forward", "to", "_decode"] * 2
    assert resident == ["forward", "_decode"] * 2  # without offloading the DiT never moves
    assert np.array_equal(a.frames, b.frames)


def test_offload_with_torch_graph_is_refused_before_loading(monkeypatch):
    from runtime import tiny
    from runtime.errors import ConfigError

    monkeypatch.setattr(tiny, "tiny_dit", lambda *a, **k: pytest.fail("loaded before refusing"))
    with pytest.raises(ConfigError, match="torch-graph"):
        S2VPipeline.from_pretrained("tiny", device="cpu", backend="torch-graph", offload_model=True)


@pytest.mark.slow
def test_seed_minus_one_picks_reports_and_repeats(pipe, caplog):
    with caplog.at_level("INFO", logger="runtime.pipeline"):
        r = pipe.generate(demo_image(), speech(0.5), seed=-1, **QUICK)
    assert 0 <= r.seed < 2**31 and r.info["seed"] == r.seed
    assert f"seed {r.seed}" in caplog.text
    again = pipe.generate(demo_image(), speech(0.5), seed=r.seed, **QUICK)
    assert np.array_equal(r.frames, again.frames)


@pytest.mark.slow
def test_pose_video_as_bytes_and_short_or_still_pose_warns(pipe, tmp_path):
    pose = write_pose_video(tmp_path / "pose.mp4", frames=40)
    aud = speech(1.5)  # 24 video frames
    a = pipe.generate(demo_image(), aud, seed=3, pose_video=pose, **QUICK)
    b = pipe.generate(demo_image(), aud, seed=3, pose_video=pose.read_bytes(), **QUICK)
    assert np.array_equal(a.frames, b.frames)
    short = write_pose_video(tmp_path / "short.mp4", frames=8)
    with pytest.warns(UserWarning, match="covers 8 frames .* but the audio drives 24"):
        pipe.generate(demo_image(), aud, seed=3, pose_video=short, **QUICK)
    still = tmp_path / "still.png"
    demo_image(64).save(still)
    with pytest.warns(UserWarning, match="single frame"):
        pipe.generate(demo_image(), aud, seed=3, pose_video=still, **QUICK)
    with pytest.raises(InputError, match="pose video bytes are empty"):
        pipe.generate(demo_image(), aud, pose_video=b"", **QUICK)


@pytest.mark.slow
def test_batch_cfg_off_makes_two_dit_calls_with_the_same_video(pipe, monkeypatch):
    kw = dict(seed=5, sample_steps=2, infer_frames=16, progress=False)
    batched = pipe.generate(demo_image(), speech(0.5), **kw)
    batches = []
    forward = pipe.backend.forward
    monkeypatch.setattr(pipe.backend, "forward", lambda x, t, c: batches.append(x.shape[0]) or forward(x, t, c))
    split = pipe.generate(demo_image(), speech(0.5), batch_cfg=False, **kw)
    assert batches == [1, 1] * 2  # cond and uncond as separate calls, as the official
    assert np.abs(batched.frames.astype(int) - split.frames).max() <= 1  # the same math, up to float rounding


@pytest.mark.parametrize("kwargs,match", [
    (dict(guide_scale=float("inf")), "guide_scale=inf: must be a finite number"),
    (dict(guide_scale=float("nan")), "guide_scale=nan"),
    (dict(sample_shift=float("inf")), "sample_shift=inf: must be a positive finite number"),
    (dict(sample_shift=float("nan")), "sample_shift=nan"),
    (dict(sample_shift=0.0), "sample_shift=0.0"),
    (dict(seed=10**20), "seed=100000000000000000000"),
    (dict(seed=-5), "seed=-5"),
    (dict(sample_steps=10**6), "sample_steps=1000000"),
    (dict(sample_solver="heun"), "unknown sample solver"),
    (dict(num_clip=1.5), "num_clip=1.5"),
])
def test_library_numbers_must_be_finite_and_in_range(pipe, monkeypatch, kwargs, match):
    from runtime.errors import S2VError

    monkeypatch.setattr(pipe, "encode_audio", lambda *a: pytest.fail("work started before the arguments were checked"))
    with pytest.raises(S2VError, match=match):
        pipe.generate(demo_image(), speech(0.5), **kwargs)


def test_library_device_and_output_name_errors(pipe, tmp_path):
    with pytest.raises(InputError, match="device 'foo' is not a device name"):
        S2VPipeline.from_pretrained("tiny", device="foo")
    r = pipe.generate(demo_image(), speech(0.5), seed=1, **QUICK)
    with pytest.raises(OutputError, match="ending in .mp4"):
        r.save(tmp_path / "x.avi")
    out = r.save(tmp_path / "x.mp4")
    with pytest.raises(OutputError, match="pass overwrite=True"):  # the library names its argument, not the flag
        r.save(out)
    assert leftovers_of(tmp_path) == ["x.mp4"]


def leftovers_of(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
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


@pytest.mark.slow
def test_cli_passes_no_batch_cfg_and_names_the_flag_when_the_output_appears(tmp_path, capsys, monkeypatch):
    """--no_batch_cfg reaches the library; a file created during the run is kept, and the message names --overwrite."""
    out = tmp_path / "o.mp4"
    seen = {}
    generate = S2VPipeline.generate

    def racing(self, *a, **k):
        seen.update(k)
        result = generate(self, *a, **k)
        out.write_bytes(b"someone else's video")
        return result

    monkeypatch.setattr(S2VPipeline, "generate", racing)
    code = cli(["--save_file", str(out), "--sample_steps", "1", "--infer_frames", "16", "--num_clip", "1", "--no_batch_cfg"])
    err = capsys.readouterr().err
    assert seen["batch_cfg"] is False
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    assert "pass --overwrite" in last and "overwrite=True" not in last, last
    assert out.read_bytes() == b"someone else's video"
    assert leftovers_of(tmp_path) == ["o.mp4"]
