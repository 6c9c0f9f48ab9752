"""Step caches (runtime.cache): exact when neutral, the forced schedule against a hand-written loop, separate
CFG branch caches, per-clip reset, the same decisions under CFG parallel and Ulysses, and the calibration file."""
from __future__ import annotations

import json
import os

import pytest
import torch

from runtime import cache
from runtime.errors import ConfigError, InputError
from tests.conftest import free_port


# --------------------------------------------------------------------------------------------- helpers
def _pipe(device="cpu", **kw):
    from runtime.pipeline import S2VPipeline

    return S2VPipeline.from_pretrained("tiny", device=device, **kw)


def _latents(pipe, **kw):
    """Generate and return each clip's final latents (what the sampler hands the VAE) and the result."""
    got = []
    decode = pipe.sampler._decode

    def keep(z):
        got.append(z.clone())
        return decode(z)

    pipe.sampler._decode = keep
    try:
        from runtime.demo import demo_image, demo_speech

        kw.setdefault("sample_steps", 8)
        r = pipe.generate(demo_image(), demo_speech(kw.pop("audio_s", 1.5)), progress=False, seed=3, **kw)
    finally:
        pipe.sampler._decode = decode
    return got, r


class Recording:
    """A backend wrapper that records which kind of call each step made (and which residual a skip reused)."""

    def __init__(self, inner):
        self.inner, self.model, self.name, self.caches = inner, inner.model, inner.name, True
        self.calls: list[tuple] = []
        # The residuals produced, held (an id() of a freed tensor can be reused by a later one) and found by identity.
        self.made: list[torch.Tensor] = []

    def forward(self, x, t, c):
        self.calls.append(("forward", x.shape[0]))
        return self.inner.forward(x, t, c)

    def forward_residual(self, x, t, c):
        v, r = self.inner.forward_residual(x, t, c)
        self.calls.append(("residual", x.shape[0]))
        self.made.append(r)
        return v, r

    def forward_skip(self, x, t, c, r):
        self.calls.append(("skip", x.shape[0], next(i for i, m in enumerate(self.made) if m is r)))
        return self.inner.forward_skip(x, t, c, r)


# --------------------------------------------------------------------------------------------- the model's parts
def test_step_with_residual_gives_the_same_velocity_and_the_skip_rebuilds_it():
    from runtime.tiny import tiny_dit
    from tests.conftest import step_inputs

    model = tiny_dit(torch.float32, "cpu")
    x, t, cond = step_inputs(model, batch=2)
    v = model.step(x, t, *cond.as_tuple())
    v2, r = model.step_with_residual(x, t, *cond.as_tuple())
    assert torch.equal(v, v2)  # the exact path, bit for bit
    _, _, f, h, w = x.shape
    assert r.shape == (2, f * (h // 2) * (w // 2), model.cfg.dim) and r.dtype == torch.float32
    assert r.abs().mean() > 0
    # the cached residual of this very step through the skip path gives this step's velocity (h + (h' − h) ≈ h')
    torch.testing.assert_close(model.step_from_residual(x, t, cond.pose, cond.extra, r), v, rtol=1e-5, atol=1e-6)
    # the block stack replaced by "its input plus the residual": step == step_from_residual, exactly
    model._blocks = lambda s, *a: s.h + torch.nn.functional.pad(r, (0, 0, 0, s.h.shape[1] - r.shape[1]))
    assert torch.equal(model.step(x, t, *cond.as_tuple()), model.step_from_residual(x, t, cond.pose, cond.extra, r))


# --------------------------------------------------------------------------------------------- neutral settings
@pytest.mark.slow
def test_neutral_settings_are_bit_identical_to_no_cache(tmp_path):
    pipe = _pipe()
    ref, _ = _latents(pipe)
    cal = _calibrate(pipe, tmp_path / "cal.json")
    for spec, calibration in (("off", None), ("easy:0", None), ("magcache:0", cal), ("magcache:0:3:0", cal)):
        got, r = _latents(pipe, cache=spec, cache_calibration=calibration)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), spec
        if spec != "off":
            assert r.info["cache"]["clips"][0]["computed"] == 8 and r.info["cache"]["clips"][0]["skipped"] == []
    rec = Recording(pipe.backend)
    pipe.backend = pipe.sampler.backend = rec
    got, _ = _latents(pipe, cache="easy:0")
    assert {c[0] for c in rec.calls} == {"forward"}  # never asked for a residual: the unchanged call
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# --------------------------------------------------------------------------------------------- a forced schedule
@pytest.mark.slow
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_forced_schedule_skips_exactly_those_steps_and_equals_a_hand_written_loop(batch_cfg):
    from runtime.scheduler import make_scheduler

    pipe = _pipe()
    rec = Recording(pipe.backend)
    pipe.backend = pipe.sampler.backend = rec
    got, r = _latents(pipe, cache="steps:3,4,7", batch_cfg=batch_cfg)
    assert r.info["cache"]["clips"] == [{"clip": 0, "computed": 5, "skipped": [3, 4, 7]}]
    kinds = [c[0] for c in rec.calls]
    per_step = kinds if batch_cfg else kinds[::2]
    assert per_step == ["forward", "residual", "skip", "skip", "forward", "residual", "skip", "forward"]
    if not batch_cfg:  # cond and uncond each reuse their own residual
        skips = [c for c in rec.calls if c[0] == "skip"]
        assert [s[2] % 2 for s in skips] == [0, 1, 0, 1, 0, 1] and all(c[1] == 1 for c in rec.calls)
    else:
        assert all(c[1] == 2 for c in rec.calls)

    # the same clip by hand: computed steps through model.step, skipped ones as head(h + the last residual)
    captured = {}
    orig = pipe.sampler.sample

    def grab(ref, context, context_null, audio_emb, num_clip, opts, **kw):
        captured.update(ref=ref, context=context, context_null=context_null, audio=audio_emb, opts=opts)
        return orig(ref, context, context_null, audio_emb, num_clip, opts, **kw)

    pipe.sampler.sample = grab
    _latents(pipe)
    m, s, o = pipe.dit, pipe.sampler, captured["opts"]
    ref_lat = s._encode(captured["ref"].float())
    lat_f = o.latent_frames
    audio = captured["audio"][..., :o.infer_frames]
    cond = m.prepare(captured["context"][None], ref_lat, None, None, audio, lat_f, o.motion_frames)
    uncond = m.prepare(captured["context_null"][None], ref_lat, None, None, audio * 0, lat_f, o.motion_frames)
    gen = torch.Generator().manual_seed(o.seed)
    _, _, _, hh, ww = captured["ref"].shape
    x = torch.randn(16, lat_f, hh // 8, ww // 8, generator=gen)[None]
    solver = make_scheduler(o.solver, o.sample_steps, o.sample_shift, "cpu")
    from runtime.models.dit import timestep_frequencies

    tf = timestep_frequencies(solver.timesteps, m.cfg.freq_dim)
    res = {}
    for i in range(o.sample_steps):
        vs = []
        for key, c in (("c", cond), ("u", uncond)):
            if i + 1 in (3, 4, 7):
                vs.append(m.step_from_residual(x, tf[i:i + 1], c.pose, c.extra, res[key]))
            else:
                v, res[key] = m.step_with_residual(x, tf[i:i + 1], *c.as_tuple())
                vs.append(v)
        vc, vu = vs
        x = solver.step(vu + o.guide_scale * (vc - vu), x)
    torch.testing.assert_close(got[0][:, :, -lat_f:], x, rtol=1e-5, atol=1e-5)
    exact, _ = _latents(pipe)
    assert (exact[0][:, :, -lat_f:] - x).abs().max() > 1e-3  # skipping changed the clip (the check can fail)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step kinds need a GPU (the device "
                    "pre-flight, benchmarks/device/preflight.sh, runs this)")
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_graph_backend_caches_like_the_eager_backend_on_gpu(batch_cfg):
    """torch-graph replays a graph per step kind (plain, residual-recording) and runs a skipped step eagerly: the
    same calls and, within bf16 compiled-vs-eager rounding, the same clip as the eager backend; a replay of the
    request gives it bit for bit (a residual read after the next replay overwrote the graph's output would not)."""
    spec = "steps:2,4,5"
    eager = _pipe("cuda", dtype=torch.bfloat16, backend="torch")  # auto would be torch-graph on a GPU
    graph = _pipe("cuda", dtype=torch.bfloat16, backend="torch-graph")
    rec = Recording(graph.backend)
    graph.backend = graph.sampler.backend = rec
    a, ra = _latents(eager, cache=spec, batch_cfg=batch_cfg, sample_steps=6)
    b, rb = _latents(graph, cache=spec, batch_cfg=batch_cfg, sample_steps=6)
    calls = list(rec.calls)
    c, _ = _latents(graph, cache=spec, batch_cfg=batch_cfg, sample_steps=6)
    assert ra.info["cache"]["clips"] == rb.info["cache"]["clips"] == [{"clip": 0, "computed": 3, "skipped": [2, 4, 5]}]
    kinds = [k[0] for k in calls]
    per_step = kinds if batch_cfg else kinds[::2]
    assert per_step == ["residual", "skip", "residual", "skip", "skip", "forward"]
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(y, z)
        # bf16, compiled against eager kernels: rounding moves the latents by well under this; a replay that read
        # a stale or overwritten buffer moves them by O(1)
        assert ((y.float() - x.float()).norm() / x.float().norm()).item() <= 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA-graph step kinds need a GPU (the device "
                    "pre-flight, benchmarks/device/preflight.sh, runs this)")
def test_graph_backend_calibrates_like_the_eager_backend_on_gpu():
    """A calibration keeps each step's residual to compare with the next one: were it a view of the graph's output
    buffer (overwritten by the next replay), every ratio would read 1 and every cosine distance 0."""
    got = {}
    for name, kw in (("eager", {"backend": "torch"}), ("graph", {"backend": "torch-graph"})):
        rec = cache.Recorder()
        _latents(_pipe("cuda", dtype=torch.bfloat16, **kw), cache=rec, sample_steps=6)
        got[name] = rec.clips[0]
    for branch in ("cond", "uncond"):
        e, g = got["eager"][branch], got["graph"][branch]
        assert max(g["cos_dist"][1:]) > 1e-3 and max(abs(x - 1) for x in g["mag_ratio"][1:]) > 1e-3
        for key in ("mag_ratio", "cos_dist"):
            assert max(abs(a - b) for a, b in zip(e[key], g[key], strict=True)) <= 5e-2, (branch, key)


@pytest.mark.slow
def test_each_clip_starts_with_an_empty_cache():
    pipe = _pipe()
    rec = Recording(pipe.backend)
    pipe.backend = pipe.sampler.backend = rec
    _, r = _latents(pipe, cache="steps:2,5", audio_s=3.0, sample_steps=6, infer_frames=32)
    clips = r.info["cache"]["clips"]
    assert len(clips) >= 2 and all(c["skipped"] == [2, 5] for c in clips)
    per_clip = len(rec.calls) // len(clips)
    for k in range(len(clips)):
        calls = rec.calls[k * per_clip:(k + 1) * per_clip]
        made_before = sum(1 for c in rec.calls[:k * per_clip] if c[0] == "residual")
        assert calls[0][0] == "residual"  # step 1 keeps its residual for step 2
        assert all(c[2] >= made_before for c in calls if c[0] == "skip")  # never a residual of an earlier clip


# --------------------------------------------------------------------------------------------- schedules
def test_magcache_schedule_by_hand():
    # one branch, 10 steps, retain 0.2 → steps 0, 1 computed; then accumulate |1 − Πγ|
    g = [1.0, 1.0, 0.99, 0.98, 1.1, 1.0, 1.0, 1.0, 0.97, 0.9]
    skip = cache.magcache_schedule([g], thresh=0.05, k=2, retain=0.2)
    # i=2: Π=.99 err=.01 skip; i=3: Π=.9702 err=.0398 skip; i=4: run 3 > K → compute, reset;
    # i=5: Π=1 err 0 skip; i=6: skip; i=7: run 3 → compute; i=8: Π=.97 err .03 skip; i=9: Π=.873 err .157 → compute
    assert skip == [False, False, True, True, False, True, True, False, True, False]
    # the worse branch decides
    worse = [1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    both = cache.magcache_schedule([g, worse], thresh=0.05, k=2, retain=0.2)
    # i=2: the second branch's error is 0.1: computed; i=3: max(0.02, 0) skip; i=4: 0.02 + 0.078 ≥ 0.05 computed; ...
    assert both == [False, False, False, True, False, True, True, False, True, False]
    assert cache.magcache_schedule([g], thresh=0.0, k=2, retain=0.2) == [False] * 10
    assert cache.magcache_schedule([[1.0] * 5], 1.0, 9, 0.0)[0] is False  # the first step is always computed


def test_cache_spec_parse_and_errors():
    P = cache.CacheSpec.parse
    assert P(None) == P("off") == cache.CacheSpec() and not P("off").enabled
    assert P("magcache") == cache.CacheSpec("magcache", 0.12, 2, 0.2)
    assert P("magcache:0.3:4") == cache.CacheSpec("magcache", 0.3, 4, 0.2)
    assert P("easy:0.1") == cache.CacheSpec("easy", 0.1, 0, 0.2)
    assert P("steps:4,2,4").skip == (1, 3) and str(P("steps:4,2")) == "steps:2,4"
    assert str(P("magcache:0.3:4:0.1")) == "magcache:0.3:4:0.1"
    for bad, words in (("fast", "unknown method"), ("magcache:x", "not a number"), ("magcache:0.1:0", "K"),
                       ("easy:0.1:2", "RETAIN"), ("easy:-1", "THRESH"), ("steps:1,3", "from 2"), ("steps:a", "1-based"),
                       ("easy:1:0.2:3", "at most")):
        with pytest.raises(ConfigError, match=words):
            P(bad)
    with pytest.raises(InputError, match="past the last"):
        cache.StepCache(P("steps:9")).for_clip(0, 8)


def test_easy_plan_decides_from_the_transformation_rate():
    plan = cache.EasyPlan(steps=10, thresh=0.1, retain=0.2)  # steps 0, 1 always computed; the last too
    x = torch.zeros(1, 4)
    for i in range(2):
        assert not plan.skip(i, x + i)
        plan.store(0, "r")
        plan.observe(i, x + i, x + 2 * i, skipped=False)
    # k = mean|Δv| / mean|Δx| = 2; step 2: change = mean|x2 − x1| / mean|v1| = 0.01 / 2 → err 0.01 < 0.1: skip
    assert plan.skip(2, x + 1.01) and plan.skipped == [2]
    plan.observe(2, x + 1.01, x + 2, skipped=True)
    assert not plan.skip(3, x + 2)  # err 0.01 + 2 · 0.99 / 2 ≥ 0.1: computed, err reset
    assert plan.err == 0.0 and not plan.skip(9, x + 2)  # the last step is always computed
    assert plan.keep_residual(1) and not plan.keep_residual(0) and not plan.keep_residual(8)


# --------------------------------------------------------------------------------------------- calibration
def _calibrate(pipe, path, steps: int = 8):
    from runtime.demo import demo_image, demo_speech

    rec = cache.Recorder()
    r = pipe.generate(demo_image(), demo_speech(1.5), progress=False, seed=3, sample_steps=steps, cache=rec)
    from runtime.sampler import SampleOptions

    cal = cache.Calibration(pipe.model_identity(), cache.recipe_of(SampleOptions(sample_steps=steps), r.info["size"]),
                            rec.clips)
    cal.save(path)
    return path


@pytest.mark.slow
def test_calibration_round_trips_and_records_each_branch(tmp_path):
    pipe = _pipe()
    path = _calibrate(pipe, tmp_path / "c.json")
    cal = cache.Calibration.load(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == cache.CALIBRATION_FORMAT and cal.model == pipe.model_identity()
    clip = cal.clips[0]
    assert set(clip) == {"cond", "uncond"} and clip["cond"] != clip["uncond"]
    for b in clip.values():
        assert set(b) == {"mag_ratio", "mag_std", "norm", "cos_dist"} and len(b["mag_ratio"]) == 8
        assert b["mag_ratio"][0] == 1.0 and all(0.5 < v < 2 for v in b["mag_ratio"])
    # the recorded ratio is mean‖r_t‖/‖r_{t−1}‖ of the residuals the model returns
    rec = cache.RecordPlan(2)
    r0, r1 = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    rec.store(0, r0)
    rec.store(0, r1)
    want = (r1[1].norm(dim=-1) / r0[1].norm(dim=-1)).mean().item()
    assert rec.result()["uncond"]["mag_ratio"] == pytest.approx([1.0, want])
    assert cal.schedule(0, cache.CacheSpec.parse("magcache:0.5:3:0.2")) == cache.magcache_schedule(
        [clip["cond"]["mag_ratio"], clip["uncond"]["mag_ratio"]], 0.5, 3, 0.2)
    with pytest.raises(Exception, match="already exists"):
        cal.save(path)


@pytest.mark.slow
def test_foreign_stale_or_damaged_calibrations_are_refused(tmp_path):
    pipe = _pipe()
    path = _calibrate(pipe, tmp_path / "c.json")
    with pytest.raises(ConfigError, match=r"made for sample_steps=8, this run has sample_steps=6.*runtime.calibrate"):
        _latents(pipe, sample_steps=6, cache="magcache", cache_calibration=path)
    with pytest.raises(ConfigError, match="guide_scale"):
        _latents(pipe, guide_scale=1.0, cache="magcache", cache_calibration=path)
    raw = json.loads(path.read_text())
    raw["model"]["checkpoint"] = "another"
    (tmp_path / "other.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="made for checkpoint=another"):
        _latents(pipe, cache="magcache", cache_calibration=tmp_path / "other.json")
    raw["clips"][0]["cond"]["mag_ratio"] = [1.0]
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    for name, words in (("bad.json", "damaged"), ("missing.json", "not found")):
        with pytest.raises(ConfigError, match=words):
            _latents(pipe, cache="magcache", cache_calibration=tmp_path / name)
    (tmp_path / "text.json").write_text("[" * 100000)
    with pytest.raises(ConfigError, match="not readable JSON"):
        cache.Calibration.load(tmp_path / "text.json")
    with pytest.raises(ConfigError, match="needs cache_calibration"):
        _latents(pipe, cache="magcache")
    pipe.backend.caches = False
    with pytest.raises(ConfigError, match="PyTorch backend"):
        _latents(pipe, cache="easy")


def test_model_identity_tells_weights_and_loras_apart(tmp_path):
    from runtime.tiny import tiny_dit
    from tests.checkpoints import save_dit

    a = save_dit(tiny_dit(torch.float32, "cpu"), tmp_path / "a", shards=2)
    ident = cache.model_identity(str(a))
    assert ident == cache.model_identity(str(a)) and set(ident) == {"checkpoint", "weights", "loras"}
    assert ident["loras"] == []
    b = save_dit(_perturbed(tiny_dit(torch.float32, "cpu")), tmp_path / "b", shards=2)
    other = cache.model_identity(str(b))
    # a fine-tune of the same layout: same names and sizes (the cheap checkpoint identity), other weights
    assert other["checkpoint"] == ident["checkpoint"] and other["weights"] != ident["weights"]


def _perturbed(model):
    for p in model.parameters():
        p.data.add_(0.01)
    return model


# --------------------------------------------------------------------------------------------- the CLIs
@pytest.mark.slow
def test_calibrate_then_generate_cli(tmp_path, capsys):
    from runtime import calibrate, generate

    out = tmp_path / "cal.json"
    assert calibrate.main(["--out", str(out), "--sample_steps", "6", "--num_clip", "1"]) == 0
    made = json.loads(out.read_text())["made"]
    assert made["command"].startswith("python -m runtime.calibrate") and made["backend"] == "torch"
    assert calibrate.main(["--out", str(out), "--sample_steps", "6"]) == 2  # exists, no --overwrite
    video = tmp_path / "v.mp4"
    base = ["--save_file", str(video), "--base_seed", "1", "--cache_calibration", str(out)]
    assert generate.main(base + ["--sample_steps", "6", "--cache", "magcache:0.5"]) == 0 and video.is_file()
    capsys.readouterr()
    # refused before the model loads: another recipe, magcache without a file, an engine backend
    assert generate.main(base + ["--sample_steps", "5", "--cache", "magcache", "--overwrite"]) == 2
    assert "made for sample_steps=6, this run has sample_steps=5" in capsys.readouterr().err
    assert generate.main(["--save_file", str(tmp_path / "w.mp4"), "--cache", "magcache"]) == 2
    assert "--cache_calibration FILE" in capsys.readouterr().err
    assert generate.main(["--save_file", str(tmp_path / "w.mp4"), "--cache", "easy", "--backend", "onnxruntime"]) == 2
    assert "PyTorch backend" in capsys.readouterr().err
    assert generate.main(["--save_file", str(tmp_path / "w.mp4"), "--cache_calibration", str(out)]) == 2
    assert "read by --cache magcache only" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_reports_the_cache_and_the_lower_face(capsys):
    from runtime import quality

    assert quality.main(["--sample_steps", "6", "--test_cache", "steps:3,5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["cache"]["clips"][0]["skipped"] == [3, 5]
    row = out["clips"][0]
    assert 0 < row["psnr_db"] < float("inf") and 0 < row["lower_face_psnr_db"] < float("inf")
    assert row["latent_rel_l2"] > 0
    box = out["lower_face_box"]
    assert box["found_by"] == "central-lower third" and (box["y0"], box["y1"], box["x0"], box["x1"]) == (32, 53, 21, 42)


def test_lower_face_box_finds_a_real_face():
    pytest.importorskip("cv2", reason="OpenCV (the [quality] extra) ships the Haar face detector")
    from tests.conftest import samples_or_skip

    from PIL import Image

    from runtime.quality import lower_face_box

    img = Image.open(samples_or_skip() / "pose.png")  # a person facing the camera
    (y0, y1, x0, x1), how = lower_face_box(img, 832, 480)
    assert how == "haar" and 0 <= y0 < y1 <= 832 and 0 <= x0 < x1 <= 480
    assert (y1 - y0) * (x1 - x0) < 832 * 480 / 8  # a face, not the frame


# --------------------------------------------------------------------------------------------- several processes
def _worker(rank, world, port, ulysses, cfg_parallel, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from runtime import parallel
    from runtime.pipeline import S2VPipeline

    try:
        layout = parallel.init(ulysses, cfg_parallel, device="cpu")
        pipe = S2VPipeline.from_pretrained("tiny", device="cpu", parallel=layout)
        with torch.no_grad():
            lat, r = _latents(pipe, cache="easy:0.3")
        # Through files, not a queue: a queue's pipe fills with the latents while the parent waits in join.
        torch.save({"clips": r.info["cache"]["clips"], "lat": lat[0].clone()}, f"{out_dir}/rank{rank}.pt")
    finally:
        parallel.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("ulysses,cfg_parallel", [(2, False), (1, True)])
def test_parallel_ranks_take_the_one_process_decisions(ulysses, cfg_parallel, tmp_path):
    import torch.multiprocessing as mp

    one, r = _latents(_pipe(), cache="easy:0.3")
    assert r.info["cache"]["clips"][0]["skipped"]  # the runtime method does skip here
    mp.start_processes(_worker, args=(2, free_port(), ulysses, cfg_parallel, str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["clips"] == r.info["cache"]["clips"], rank
        torch.testing.assert_close(got["lat"], one[0], rtol=1e-4, atol=1e-4)
