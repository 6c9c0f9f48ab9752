"""The few-step recipes: flags of the ComfyUI template and LightX2V's distill schedule, end to end on the tiny model."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.demo import demo_image, demo_speech
from runtime.errors import ConfigError, InputError
from runtime.generate import main as cli
from tests.conftest import write_inputs


@pytest.mark.slow
def test_euler_schedule_runs_and_equals_its_default_list(pipe):
    kw = dict(infer_frames=16, progress=False, seed=5, guide_scale=1.0, sample_shift=5.0, sample_solver="euler")
    a = pipe.generate(demo_image(), demo_speech(0.5), denoising_steps=(1000, 750, 500, 250), **kw)
    b = pipe.generate(demo_image(), demo_speech(0.5), sample_steps=4, **kw)
    assert a.info["steps"] == 4 and np.array_equal(a.frames, b.frames)
    c = pipe.generate(demo_image(), demo_speech(0.5), denoising_steps=(1000, 800, 500, 250), **kw)
    assert not np.array_equal(a.frames, c.frames)
    with pytest.raises(ConfigError, match="one timestep per step"):
        pipe.generate(demo_image(), demo_speech(0.5), sample_steps=3, denoising_steps=(1000, 500), **kw)


@pytest.mark.slow
def test_cfg_off_runs_one_forward_per_step(pipe, monkeypatch):
    calls = []
    real = pipe.backend.forward
    monkeypatch.setattr(pipe.backend, "forward", lambda x, t, c: calls.append(x.shape[0]) or real(x, t, c))
    pipe.generate(demo_image(), demo_speech(0.5), sample_steps=4, guide_scale=1.0, infer_frames=16, progress=False)
    assert calls == [1, 1, 1, 1]


@pytest.mark.parametrize("argv,want", [
    (["--denoising_steps", "1000,750"], "add --sample_solver euler"),
    (["--sample_solver", "euler", "--denoising_steps", "1000,x"], "comma-separated integer"),
    (["--sample_solver", "euler", "--denoising_steps", "500,750"], "strictly decreasing"),
    (["--sample_solver", "euler", "--denoising_steps", "1000,750", "--sample_steps", "3"], "one timestep per step"),
    (["--cfg_parallel", "--sample_guide_scale", "1"], "--ulysses_size"),
])
def test_cli_refusals_before_loading(tmp_path, capsys, argv, want):
    rc = cli(argv + ["--save_file", str(tmp_path / "o.mp4")])
    assert rc == 2 and want in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_cli_few_step_recipe_with_a_lora(tmp_path):
    from tests.test_lora import random_lora
    from runtime.tiny import tiny_dit

    image, audio = write_inputs(tmp_path)
    path = random_lora(tiny_dit(), tmp_path / "distill.safetensors", scale=0.02)
    out = tmp_path / "few.mp4"
    rc = cli(["--image", str(image), "--audio", str(audio), "--lora", f"{path}:0.8", "--sample_solver", "euler",
              "--denoising_steps", "1000,750,500,250", "--sample_guide_scale", "1", "--sample_shift", "5",
              "--infer_frames", "16", "--base_seed", "1", "--save_file", str(out)])
    assert rc == 0 and out.stat().st_size > 0


def test_cfg_parallel_library_refusal():
    from runtime.pipeline import S2VPipeline

    class Layout:
        cfg_parallel = True

    pipe = object.__new__(S2VPipeline)
    pipe.parallel, pipe.name = Layout(), "tiny"
    with pytest.raises(InputError, match="CFG parallel has nothing to split"):
        pipe.generate(demo_image(), demo_speech(0.5), guide_scale=1.0)
