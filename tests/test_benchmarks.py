"""The FLOP model against PyTorch's FLOP counter, and the benchmark runner as a CPU smoke test."""
from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.flops import dit_forward_flops
from benchmarks.run import main as run_main
from runtime.config import DiTConfig
from runtime.tiny import tiny_dit
from tests.conftest import step_inputs


@pytest.mark.parametrize("frames,lat_h,lat_w,motion,batch", [(3, 8, 12, True, 2), (5, 16, 8, False, 1)])
def test_flop_model_matches_the_counter(frames, lat_h, lat_w, motion, batch):
    model = tiny_dit()
    x, t, cond = step_inputs(model, frames, lat_h, lat_w, motion=motion, batch=batch)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # MATH: attention as counted bmm
        model.step(x, t, *cond.as_tuple())
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    f = dit_forward_flops(model.cfg, frames, lat_h // 2, lat_w // 2, cond.extra.shape[1], batch)
    assert f.linear == counts["aten.addmm"] + counts["aten.convolution"]
    assert f.attention == counts["aten.bmm"]


def test_flop_model_full_size_hand_count():
    cfg = DiTConfig.s2v_14b()
    f = dit_forward_flops(cfg, 20, 44, 64, 7040)
    S, d = 63360, 5120
    assert f.attention >= 40 * 4 * S * S * d  # the S² term dominates: 3.29 PFLOP
    assert 4.85e15 < f.total < 4.95e15      # ≈ 4.9 PFLOP per later-clip forward, as the spec counts
    # The floor at hand-written rates: 1.588 PFLOP at 785 TFLOP/s (2.02 s) + 3.315 PFLOP at 613 (5.41 s).
    assert f.floor_s(785, 613) == pytest.approx(7.43, abs=0.01)
    assert f.floor_s(1570, 613) == pytest.approx(7.43 - 1.01, abs=0.01)  # twice the GEMM rate halves the linear part


@pytest.mark.slow
def test_runner_cpu_smoke(tmp_path):
    assert run_main(["--scenario", "tiny-cpu", "--variants", "torch,torch-graph", "--repeat", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "run_tiny-cpu.json").read_text())
    rows = {r.get("variant"): r for r in data["rows"] if "stage" not in r}
    assert rows["torch"]["dit_forward_s"] > 0 and rows["torch"]["step_s"] > 0 and rows["torch"]["clip_s"] > 0
    if not torch.cuda.is_available():
        assert "CUDA" in rows["torch-graph"]["error"]
    stages = {r["stage"] for r in data["rows"] if "stage" in r}
    assert stages == {"vae_decode", "vae_encode", "umt5", "wav2vec2"}
    assert data["meta"]["command"].startswith("python -m benchmarks.run")
    assert (tmp_path / "run_tiny-cpu.md").read_text().startswith("| variant")
    assert (tmp_path / "run_tiny-cpu.png").stat().st_size > 1000


@pytest.mark.slow
def test_step_cache_benchmark_cpu_smoke(tmp_path):
    from benchmarks.step_cache import half_schedule, main as cache_main

    assert half_schedule(6) == "steps:2,4,6"
    assert cache_main(["--tiny", "--steps", "4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "step_cache_64x96-16f_4steps_float32_1gpu.json").read_text())
    off, half = data["rows"]
    assert (off["cache"], off["steps_computed"], off["rel_l2"], off["psnr_db"]) == ("off", 4, 0.0, None)
    assert (half["steps_computed"], half["steps_skipped"]) == (2, 2)
    assert half["rel_l2"] > 0 and half["clip_s"] > 0 and half["speedup"] == off["clip_s"] / half["clip_s"]
    assert data["meta"]["command"].startswith("python -m benchmarks.step_cache")


def test_ratios_pair_each_kernel_with_the_official_one():
    from benchmarks.run import add_ratios

    rows = [{"variant": "official", "official_attention": "sdpa", "dit_forward_s": 9.0},
            {"variant": "official:fa3", "official_attention": "fa3", "dit_forward_s": 8.0},
            {"variant": "torch-graph:sdpa", "attention": "sdpa", "forward_with_prepare_s": 7.5},
            {"variant": "torch-graph:fa3", "attention": "fa3", "forward_with_prepare_s": 6.4},
            {"variant": "torch-graph:fa4", "attention": "fa4", "forward_with_prepare_s": 6.0},
            {"variant": "torch", "attention": "sdpa"}]  # no forward measured: no ratio
    add_ratios(rows)
    assert rows[2]["ratio_same_kernel"] == pytest.approx(9.0 / 7.5) and rows[2]["ratio_vs_official_sdpa"] == pytest.approx(9.0 / 7.5)
    assert rows[3]["ratio_same_kernel"] == pytest.approx(8.0 / 6.4) and rows[3]["ratio_vs_official_sdpa"] == pytest.approx(9.0 / 6.4)
    assert "ratio_same_kernel" not in rows[4] and rows[4]["ratio_vs_official_sdpa"] == pytest.approx(1.5)
    assert "ratio_vs_official_sdpa" not in rows[5] and "ratio_same_kernel" not in rows[0]


@pytest.mark.skipif(not __import__("os").environ.get("WAN22_REPO"), reason="set WAN22_REPO to a Wan-Video/Wan2.2 "
                    "checkout (and install diffusers, einops) to run the official model in its own process")
def test_official_in_its_own_process_sees_our_weights_and_inputs(tmp_path):
    import os

    assert run_main(["--scenario", "tiny-cpu", "--variants", "official,torch", "--stages", "dit", "--repeat", "1",
                     "--official-repo", os.environ["WAN22_REPO"], "--out", str(tmp_path)]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "run_tiny-cpu.json").read_text())["rows"]}
    assert rows["official"]["process"] == "own" and rows["official"]["dit_forward_s"] > 0
    assert rows["torch"]["rel_l2_vs_official"] < 1e-5  # the same seeded weights and inputs in both processes
    assert rows["torch"]["prepare_s"] > 0 and rows["torch"]["forward_with_prepare_s"] > rows["torch"]["dit_forward_s"]
    assert rows["torch"]["ratio_same_kernel"] == pytest.approx(rows["official"]["dit_forward_s"] / rows["torch"]["forward_with_prepare_s"])
