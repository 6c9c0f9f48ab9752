"""runtime.quality: its metrics against hand values, the FP8 refusal on the CPU, and a tiny end-to-end run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.quality import main, psnr, ssim


def test_psnr_known_values():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(10 * np.log10(255.0 ** 2), abs=1e-9)  # MSE 1


def test_ssim_properties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a), abs=1e-12)
    very = np.clip(a.astype(int) + rng.integers(-80, 81, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, very) < ssim(a, noisy) < 1


def test_fp8_refused_on_cpu_before_loading(capsys, monkeypatch):
    import runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["--precision", "fp8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs an NVIDIA Hopper" in err[0] and "--precision bf16" in err[0]


def test_unrunnable_attention_refused_before_loading(capsys, monkeypatch):
    import runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["--precision", "bf16", "--attention", "fa3-fp8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--attention fa3-fp8 cannot run here" in err[0], err


@pytest.mark.slow
def test_tiny_fp16_against_bf16(capsys):
    assert main(["--precision", "fp16", "--reference", "bf16", "--device", "cpu", "--sample_steps", "2",
                 "--infer_frames", "16", "--attention", "sdpa", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "fp16" and out["attention"] == "sdpa" and out["clips"]
    for row in out["clips"]:
        assert 10 < row["psnr_db"] < float("inf")  # fp16 and bf16 round differently: never identical frames
        assert 0 < row["ssim"] <= 1
        assert 0 <= row["latent_rel_l2"] < 0.2


@pytest.mark.slow
def test_lora_few_step_recipe_against_the_exact_reference(tmp_path, capsys):
    """A LoRA + 4-step CFG-off euler recipe against the 2-step CFG reference: both runs happen, and they differ."""
    from runtime.tiny import tiny_dit
    from tests.test_lora import random_lora

    path = random_lora(tiny_dit(), tmp_path / "l.safetensors", scale=0.02)
    assert main(["--device", "cpu", "--sample_steps", "2", "--infer_frames", "16", "--lora", f"{path}:0.5",
                 "--test_solver", "euler", "--test_denoising_steps", "1000,750,500,250", "--test_guide_scale", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "bf16" and out["loras"] == [f"{path}:0.5"]
    assert out["test_recipe"]["sample_steps"] == 4 and out["test_recipe"]["denoising_steps"] == [1000, 750, 500, 250]
    assert out["reference_recipe"]["sample_steps"] == 2
    assert out["clips"] and all(r["psnr_db"] < float("inf") and r["latent_rel_l2"] > 0 for r in out["clips"])


def test_bad_lora_or_recipe_refused_before_loading(tmp_path, capsys, monkeypatch):
    import runtime.pipeline as pipeline

    monkeypatch.setattr(pipeline.S2VPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["--device", "cpu", "--lora", str(tmp_path / "x.pt")]) == 2
    assert "pickle" in capsys.readouterr().err
    assert main(["--device", "cpu", "--test_solver", "euler", "--test_denoising_steps", "5,10"]) == 2
    assert "strictly decreasing" in capsys.readouterr().err
