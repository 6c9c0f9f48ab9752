"""LoRA merging (``runtime.lora``): every key family of the public loaders, written by the tests from the tiny
model's own parameter names, merged and compared with a float64 recomputation; refusals; engines' identity."""
from __future__ import annotations

import copy
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from runtime import lora
from runtime.config import DiTConfig
from runtime.demo import demo_image, demo_speech
from runtime.errors import ConfigError, S2VError
from runtime.tiny import tiny_dit

RANK = 4


@pytest.fixture(scope="module")
def base():
    return tiny_dit(torch.float32)


def shapes(model):
    return lora.checkpoint_shapes(model)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def weight(model, name) -> torch.Tensor:
    """A parameter under its checkpoint name (q/k/v slices of the fused weight included)."""
    return model.state_dict()[name].detach().clone()


def pair(model, module, seed):
    out, inn = shapes(model)[f"{module}.weight"]
    return rand(RANK, inn, seed=seed), rand(out, RANK, seed=seed + 1000)


def expected(w: torch.Tensor, *terms) -> torch.Tensor:
    """float64 W + Σ delta, rounded once to W's dtype."""
    acc = w.double()
    for t in terms:
        acc = acc + t.double()
    return acc.to(w.dtype)


def assert_close_fp32(got: torch.Tensor, want: torch.Tensor):
    # one float32 rounding of a sum of a few terms: a few ulp of the largest term
    tol = 8 * torch.finfo(torch.float32).eps * max(want.abs().max().item(), 1.0)
    assert (got.double() - want.double()).abs().max().item() <= tol


# (family, module, key builder): keys as the public loaders write them
FAMILIES = {
    "lightx2v": ("blocks.0.self_attn.q", lambda m: (f"diffusion_model.{m}.lora_down.weight", f"diffusion_model.{m}.lora_up.weight")),
    "peft-default": ("blocks.1.self_attn.k", lambda m: (f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight")),
    "peft-prefixed": ("blocks.2.cross_attn.k", lambda m: (f"diffusion_model.{m}.lora_A.weight", f"diffusion_model.{m}.lora_B.weight")),
    "peft-base-model": ("blocks.3.ffn.0", lambda m: (f"base_model.model.{m}.lora_A.weight", f"base_model.model.{m}.lora_B.weight")),
    "no-weight-suffix": ("blocks.0.ffn.2", lambda m: (f"pipe.dit.{m}.lora_down", f"pipe.dit.{m}.lora_up")),
    "kohya": ("blocks.0.self_attn.v", lambda m: (f"lora_unet_{m.replace('.', '_')}.lora_down.weight",
                                                 f"lora_unet_{m.replace('.', '_')}.lora_up.weight")),
    "videox-fun": ("blocks.1.cross_attn.o", lambda m: (f"lora_unet__{m.replace('.', '_')}.lora_down.weight",
                                                      f"lora_unet__{m.replace('.', '_')}.lora_up.weight")),
    "audio-injector": ("audio_injector.injector.1.q", lambda m: (f"model.{m}.lora_A.weight", f"model.{m}.lora_B.weight")),
    "fused-qkv-o": ("blocks.2.self_attn.o", lambda m: (f"transformer.{m}.lora_down.weight", f"transformer.{m}.lora_up.weight")),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_key_family_merges_to_w_plus_s_delta(base, tmp_path, family):
    module, keys = FAMILIES[family]
    down, up = pair(base, module, seed=len(family))
    k_down, k_up = keys(module)
    path = tmp_path / "l.safetensors"
    save_file({k_down: down, k_up: up}, str(path))
    model = copy.deepcopy(base)
    plans = lora.merge(model, [lora.LoraSpec(path, 0.7)])
    assert plans[0].modules == 1 and plans[0].deltas == 0 and not plans[0].skipped
    name = f"{module}.weight"
    assert_close_fp32(weight(model, name), expected(weight(base, name), 0.7 * up.double() @ down.double()))
    untouched = [k for k in base.state_dict() if k != name]
    assert all(torch.equal(model.state_dict()[k], base.state_dict()[k]) for k in untouched)


@pytest.mark.parametrize("alpha", [torch.tensor(8), torch.tensor(2.5), torch.tensor([6.0], dtype=torch.bfloat16)],
                         ids=["int", "float", "bf16-1d"])
def test_alpha_scales_by_alpha_over_rank(base, tmp_path, alpha):
    m = "blocks.0.self_attn.q"
    down, up = pair(base, m, 1)
    path = tmp_path / "a.safetensors"
    save_file({f"{m}.lora_down.weight": down, f"{m}.lora_up.weight": up, f"{m}.alpha": alpha}, str(path))
    model = copy.deepcopy(base)
    lora.merge(model, [lora.LoraSpec(path, 1.5)])
    scale = 1.5 * float(alpha.float().reshape(-1)[0]) / RANK
    assert_close_fp32(weight(model, f"{m}.weight"), expected(weight(base, f"{m}.weight"), scale * up.double() @ down.double()))


def test_peft_adapter_config_scale(base, tmp_path):
    m = "blocks.1.ffn.2"
    down, up = pair(base, m, 2)
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 12}')
    path = tmp_path / "adapter_model.safetensors"
    save_file({f"base_model.model.{m}.lora_A.weight": down, f"base_model.model.{m}.lora_B.weight": up}, str(path))
    model = copy.deepcopy(base)
    lora.merge(model, [lora.LoraSpec(path)])
    assert_close_fp32(weight(model, f"{m}.weight"), expected(weight(base, f"{m}.weight"), 3.0 * up.double() @ down.double()))
    (tmp_path / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 12, "rank_pattern": {"ffn.2": 8}}')
    with pytest.raises(lora.LoraError, match="rank_pattern"):
        lora.merge(copy.deepcopy(base), [lora.LoraSpec(path)])


def test_diffusers_names(base, tmp_path):
    names = {"blocks.0.attn1.to_q": "blocks.0.self_attn.q", "blocks.0.attn1.to_out.0": "blocks.0.self_attn.o",
             "blocks.1.attn2.to_k": "blocks.1.cross_attn.k", "blocks.1.ffn.net.0.proj": "blocks.1.ffn.0",
             "blocks.2.ffn.net.2": "blocks.2.ffn.2"}
    tensors, deltas = {}, {}
    for i, (dname, ours) in enumerate(names.items()):
        down, up = pair(base, ours, 10 + i)
        tensors[f"transformer.{dname}.lora_A.weight"] = down
        tensors[f"transformer.{dname}.lora_B.weight"] = up
        deltas[f"{ours}.weight"] = up.double() @ down.double()
    bias = rand(shapes(base)["blocks.1.ffn.0.bias"][0], seed=99)
    tensors["transformer.blocks.1.ffn.net.0.proj.lora_B.bias"] = bias
    deltas["blocks.1.ffn.0.bias"] = bias.double()
    path = tmp_path / "d.safetensors"
    save_file(tensors, str(path))
    model = copy.deepcopy(base)
    plans = lora.merge(model, [lora.LoraSpec(path)])
    assert plans[0].modules == len(names)
    for name, d in deltas.items():
        assert_close_fp32(weight(model, name), expected(weight(base, name), d))


def test_full_deltas(base, tmp_path):
    sh = shapes(base)
    full = {"diffusion_model.blocks.1.cross_attn.k.diff_b": ("blocks.1.cross_attn.k.bias", rand(*sh["blocks.1.cross_attn.k.bias"], seed=3)),
            "diffusion_model.blocks.2.cross_attn.norm_k.diff": ("blocks.2.cross_attn.norm_k.weight", rand(*sh["blocks.2.cross_attn.norm_k.weight"], seed=4)),
            "diffusion_model.blocks.0.diff_m": ("blocks.0.modulation", rand(*sh["blocks.0.modulation"], seed=5)),
            "diffusion_model.blocks.3.modulation.diff": ("blocks.3.modulation", rand(*sh["blocks.3.modulation"], seed=6)),
            "diffusion_model.head.modulation.diff": ("head.modulation", rand(*sh["head.modulation"], seed=7)),
            "diffusion_model.head.head.diff": ("head.head.weight", rand(*sh["head.head.weight"], seed=8)),
            "diffusion_model.blocks.0.self_attn.k.diff_b": ("blocks.0.self_attn.k.bias", rand(*sh["blocks.0.self_attn.k.bias"], seed=9))}
    path = tmp_path / "f.safetensors"
    save_file({k: v for k, (_, v) in full.items()}, str(path))
    model = copy.deepcopy(base)
    plans = lora.merge(model, [lora.LoraSpec(path, 0.25)])
    assert plans[0].deltas == len(full) and plans[0].modules == 0
    for target, d in full.values():
        assert_close_fp32(weight(model, target), expected(weight(base, target), 0.25 * d.double()))


def test_two_loras_add_and_round_once(base, tmp_path):
    m = "blocks.2.self_attn.q"
    (d1, u1), (d2, u2) = pair(base, m, 20), pair(base, m, 30)
    p1, p2 = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file({f"{m}.lora_down.weight": d1, f"{m}.lora_up.weight": u1}, str(p1))
    save_file({f"{m}.lora_A.weight": d2, f"{m}.lora_B.weight": u2}, str(p2))
    model = copy.deepcopy(base)
    lora.merge(model, [lora.LoraSpec(p1, 0.5), lora.LoraSpec(p2, -1.25)])
    want = expected(weight(base, f"{m}.weight"), 0.5 * u1.double() @ d1.double(), -1.25 * u2.double() @ d2.double())
    assert_close_fp32(weight(model, f"{m}.weight"), want)


def test_bf16_weights_round_once_and_fp32_islands_round_through_the_model_dtype(tmp_path):
    model = tiny_dit(torch.bfloat16)
    ref = copy.deepcopy(model)
    m = "blocks.0.ffn.0"
    down, up = pair(model, m, 40)
    mod = rand(*shapes(model)["blocks.0.modulation"], seed=41)
    path = tmp_path / "b.safetensors"
    save_file({f"{m}.lora_down.weight": down.bfloat16(), f"{m}.lora_up.weight": up.bfloat16(),
               "blocks.0.diff_m": mod}, str(path))
    lora.merge(model, [lora.LoraSpec(path)], round_dtype=torch.bfloat16)
    w = weight(ref, f"{m}.weight")
    assert weight(model, f"{m}.weight").dtype == torch.bfloat16
    want = (w.float() + up.bfloat16().float() @ down.bfloat16().float()).bfloat16()
    assert (weight(model, f"{m}.weight").float() - want.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * want.float().abs().max()
    got_mod = weight(model, "blocks.0.modulation")
    assert got_mod.dtype == torch.float32  # held in fp32, rounded through bf16 like the rest of a bf16 checkpoint
    assert torch.equal(got_mod, got_mod.bfloat16().float())


def test_merge_into_the_fused_qkv_equals_merging_before_the_fusion(tmp_path):
    from runtime.models.dit import WanS2VDiT

    fused = tiny_dit(torch.float32)
    with torch.device("meta"):
        unfused = WanS2VDiT(DiTConfig.tiny())
    unfused.load_state_dict(copy.deepcopy(fused.state_dict()), assign=True)
    assert unfused.blocks[0].self_attn.qkv is None and fused.blocks[0].self_attn.qkv is not None
    tensors = {}
    for i, p in enumerate("qkv"):
        down, up = pair(fused, f"blocks.0.self_attn.{p}", 50 + i)
        tensors[f"blocks.0.self_attn.{p}.lora_down.weight"], tensors[f"blocks.0.self_attn.{p}.lora_up.weight"] = down, up
    tensors["blocks.0.self_attn.v.diff_b"] = rand(shapes(fused)["blocks.0.self_attn.v.bias"][0], seed=60)
    path = tmp_path / "qkv.safetensors"
    save_file(tensors, str(path))
    lora.merge(fused, [lora.LoraSpec(path, 0.3)])
    lora.merge(unfused, [lora.LoraSpec(path, 0.3)])
    unfused.fuse_qkv()
    assert torch.equal(fused.blocks[0].self_attn.qkv.weight, unfused.blocks[0].self_attn.qkv.weight)
    assert torch.equal(fused.blocks[0].self_attn.qkv.bias, unfused.blocks[0].self_attn.qkv.bias)


def test_skipped_keys_are_reported(base, tmp_path, caplog):
    m = "blocks.0.cross_attn.q"
    down, up = pair(base, m, 70)
    i2v = {"diffusion_model.img_emb.proj.1.lora_down.weight": rand(RANK, 8), "diffusion_model.img_emb.proj.1.lora_up.weight": rand(8, RANK),
           "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": rand(RANK, 64),
           "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": rand(64, RANK),
           "diffusion_model.blocks.0.cross_attn.norm_k_img.diff": rand(64)}
    path = tmp_path / "i2v.safetensors"
    save_file({f"diffusion_model.{m}.lora_down.weight": down, f"diffusion_model.{m}.lora_up.weight": up, **i2v}, str(path))
    with caplog.at_level(logging.INFO, logger="runtime.lora"):
        plans = lora.merge(copy.deepcopy(base), [lora.LoraSpec(path)])
    assert sorted(plans[0].skipped) == sorted(i2v)
    line = [r.getMessage() for r in caplog.records if "i2v.safetensors" in r.getMessage()]
    assert line and "1 module(s) patched" in line[0] and "skipped 5 key(s)" in line[0] and "img_emb" in line[0]


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(base, tmp_path):
    sh = shapes(base)
    nothing = tmp_path / "nothing.safetensors"
    save_file({"img_emb.proj.1.lora_down.weight": rand(RANK, 8), "img_emb.proj.1.lora_up.weight": rand(8, RANK)}, str(nothing))
    with pytest.raises(lora.LoraError, match="none of its 2 keys matches"):
        lora.check([lora.LoraSpec(nothing)], sh)

    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": rand(RANK, 5120), "blocks.0.ffn.0.lora_up.weight": rand(13824, RANK)}, str(wrong))
    with pytest.raises(lora.LoraError, match=r"blocks\.0\.ffn\.0\.lora_down\.weight \[4, 5120\].*\[13824, 4\].*\[128, 64\]"):
        lora.check([lora.LoraSpec(wrong)], sh)

    half = tmp_path / "half.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": rand(RANK, 64)}, str(half))
    with pytest.raises(lora.LoraError, match="no matching lora_up"):
        lora.check([lora.LoraSpec(half)], sh)

    for suffix in (".pt", ".ckpt", ".pth", ".bin"):
        pickled = tmp_path / f"l{suffix}"
        torch.save({"blocks.0.ffn.0.lora_down.weight": rand(RANK, 64)}, pickled)
        with pytest.raises(lora.LoraError, match="pickle.*safetensors only"):
            lora.check([lora.LoraSpec(pickled)], sh)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(lora.LoraError, match="garbage.safetensors"):
        lora.check([lora.LoraSpec(garbage)], sh)
    with pytest.raises(lora.LoraError, match="not found"):
        lora.check([lora.LoraSpec(tmp_path / "missing.safetensors")], sh)

    down, up = pair(base, "blocks.0.ffn.0", 80)
    up[3, 1] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": down, "blocks.0.ffn.0.lora_up.weight": up}, str(nan))
    model = copy.deepcopy(base)
    with pytest.raises(lora.LoraError, match="NaN/Inf"):
        lora.merge(model, [lora.LoraSpec(nan)])

    for text in ("x.safetensors:inf", "x.safetensors:nan"):
        with pytest.raises(lora.LoraError, match="not a finite number"):
            lora.LoraSpec.parse(text)
    with pytest.raises(lora.LoraError, match="not a finite number"):
        lora.LoraSpec(tmp_path / "x.safetensors", float("inf"))

    fp8 = copy.deepcopy(base)
    fp8.precision = "fp8"
    ok = tmp_path / "ok.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": down.nan_to_num(), "blocks.0.ffn.0.lora_up.weight": up.nan_to_num()}, str(ok))
    with pytest.raises(lora.LoraError, match="before FP8 quantisation"):
        lora.merge(fp8, [lora.LoraSpec(ok)])
    assert issubclass(lora.LoraError, ConfigError)


def test_spec_parsing():
    assert lora.LoraSpec.parse("a/b.safetensors") == lora.LoraSpec("a/b.safetensors", 1.0)
    assert lora.LoraSpec.parse("a/b.safetensors:0.8") == lora.LoraSpec("a/b.safetensors", 0.8)
    assert lora.LoraSpec.parse("C:/l.safetensors") == lora.LoraSpec("C:/l.safetensors", 1.0)
    assert lora.LoraSpec.parse("C:/l.safetensors:-1") == lora.LoraSpec("C:/l.safetensors", -1.0)
    assert lora.as_specs([("x.safetensors", 2)]) == [lora.LoraSpec("x.safetensors", 2.0)]


# ------------------------------------------------------------------------------------------------ in the pipeline
QUICK = dict(sample_steps=2, infer_frames=16, progress=False, seed=3)


def random_lora(model, path, scale=1.0, zero=False):
    tensors = {}
    for i, (name, shape) in enumerate(shapes(model).items()):
        if name.endswith(".weight") and len(shape) == 2 and ("blocks." in name or "audio_injector" in name):
            mod = name[:-len(".weight")]
            down, up = rand(RANK, shape[1], seed=i), rand(shape[0], RANK, seed=i + 1)
            tensors[f"diffusion_model.{mod}.lora_down.weight"] = down * (0 if zero else scale)
            tensors[f"diffusion_model.{mod}.lora_up.weight"] = up * (0 if zero else scale)
    save_file(tensors, str(path))
    return path


@pytest.mark.slow
def test_strength_zero_and_an_all_zero_lora_give_the_same_video_bit_for_bit(pipe, tmp_path):
    from runtime import S2VPipeline

    path = random_lora(pipe.dit, tmp_path / "r.safetensors", scale=0.02)
    zero = random_lora(pipe.dit, tmp_path / "z.safetensors", zero=True)
    ref = pipe.generate(demo_image(), demo_speech(0.5), **QUICK).frames
    for loras in ([(path, 0.0)], [(zero, 1.0)]):
        merged = S2VPipeline.from_pretrained("tiny", device="cpu", loras=loras)
        assert np.array_equal(merged.generate(demo_image(), demo_speech(0.5), **QUICK).frames, ref)
    changed = S2VPipeline.from_pretrained("tiny", device="cpu", loras=[(path, 1.0)])
    assert not np.array_equal(changed.generate(demo_image(), demo_speech(0.5), **QUICK).frames, ref)


def test_pipeline_checks_loras_before_loading_weights(tmp_path, monkeypatch):
    from runtime import S2VPipeline, tiny

    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": rand(RANK, 5120), "blocks.0.ffn.0.lora_up.weight": rand(128, RANK)}, str(bad))
    monkeypatch.setattr(tiny, "tiny_dit", lambda *a, **k: pytest.fail("weights loaded before the LoRA check"))
    with pytest.raises(lora.LoraError, match="bad.safetensors"):
        S2VPipeline.from_pretrained("tiny", device="cpu", loras=[bad])


def test_lora_is_merged_before_fp8_quantisation(tmp_path, monkeypatch):
    """The FP8 weight scales are those of W + ΔW (the quantiser runs on the CPU; the GPU check is monkeypatched)."""
    from runtime import S2VPipeline, tiny
    from runtime.kernels import fp8

    monkeypatch.setattr(fp8, "unsupported_reason", lambda device: None)
    dit = tiny.tiny_dit(torch.bfloat16)
    merged = copy.deepcopy(dit)
    path = random_lora(dit, tmp_path / "r.safetensors", scale=0.05)
    lora.merge(merged, [lora.LoraSpec(path)], round_dtype=torch.bfloat16)
    pipe = S2VPipeline(dit, tiny.tiny_vae(), tiny.tiny_text_encoder(), tiny.tiny_audio_encoder(), torch.device("cpu"),
                       backend="torch", precision="fp8", loras=[path])
    layer = pipe.dit.blocks[1].ffn[0]
    assert isinstance(layer, fp8.FP8Linear)
    w8, scale = fp8.weight_scales(merged.blocks[1].ffn[0].weight)
    assert torch.equal(layer.weight_scale, scale) and torch.equal(layer.weight.view(torch.uint8), w8.view(torch.uint8))
    _, unmerged_scale = fp8.weight_scales(tiny.tiny_dit(torch.bfloat16).blocks[1].ffn[0].weight)
    assert not torch.equal(scale, unmerged_scale)


def test_engine_manifests_record_and_compare_loras(tmp_path):
    from runtime.manifest import engine_key, verify
    from runtime.errors import EngineMismatch

    path = tmp_path / "l.safetensors"
    save_file({"blocks.0.ffn.0.lora_down.weight": rand(RANK, 64), "blocks.0.ffn.0.lora_up.weight": rand(128, RANK)}, str(path))
    ident = lora.identity([lora.LoraSpec(path, 0.5)])
    assert len(ident[0]["sha256"]) == 64 and ident[0]["strength"] == 0.5
    plain = {"kind": "engine", "component": "dit"}
    assert engine_key({**plain, "loras": []}) == engine_key(plain)  # keys of artefacts without LoRAs unchanged
    assert engine_key({**plain, "loras": ident}) != engine_key(plain)
    verify({**plain, "key": "k"}, {"loras": []}, "rebuild")
    verify({**plain, "key": "k", "loras": ident}, {"loras": ident}, "rebuild")
    with pytest.raises(EngineMismatch, match="built with no LoRA merged.*rebuild"):
        verify({**plain, "key": "k"}, {"loras": ident}, "rebuild")
    with pytest.raises(EngineMismatch, match=r"merges no LoRA"):
        verify({**plain, "key": "k", "loras": ident}, {"loras": []}, "rebuild")
    other = [{**ident[0], "strength": 1.0}]
    with pytest.raises(EngineMismatch, match=r":0\.5 merged, this run merges .*:1"):
        verify({**plain, "key": "k", "loras": ident}, {"loras": other}, "rebuild")


def test_cli_lora_flag_refusals_before_loading(tmp_path, capsys):
    from runtime.generate import main

    for arg, want in (("x.pt", "pickle"), (f"{tmp_path}/none.safetensors", "not found"), ("y.safetensors:nan", "finite")):
        rc = main(["--lora", arg, "--save_file", str(tmp_path / "o.mp4")])
        assert rc == 2 and want in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_error_is_an_s2v_error():
    assert issubclass(lora.LoraError, S2VError) and math.isfinite(lora.LoraSpec("x", 2).strength)
