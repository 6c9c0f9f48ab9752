"""``python -m benchmarks.run --scenario NAME --variants a,b,c``: PyTorch vs engines, per stage, side by side.

Variants are DiT backends (``runtime.backends``: torch, torch-compile, torch-graph, onnxruntime, tensorrt),
measured in one process on the same weights and inputs, interleaved repeat by repeat so drift hits every
variant alike. Stages: UMT5 and wav2vec2 (once per request), VAE encode (73-frame motion history) and decode
(one clip), DiT forward (batch 1) and DiT step (CFG: one batch-2 call, or two calls with ``--cfg-calls 2``),
and the whole clip (= steps × step + decode + encode, from the measured parts). Every row also reads as
achieved TFLOP/s and as % of the floor set by the device's measured GEMM and attention rates.

    python -m benchmarks.run --scenario later-704x1024-80f --variants torch,torch-graph --out DIR
    python -m benchmarks.run --scenario tiny-cpu --variants torch        # CPU smoke test (CI)
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.common import device_description, device_slug, markdown_table, median, time_fn, write_results
from benchmarks.flops import dit_forward_flops
from runtime.sampler import latent_frames


@dataclass(frozen=True)
class Scenario:
    name: str
    height: int
    width: int
    infer_frames: int
    clip: str            # "first" or "later"
    steps: int = 40
    cfg: bool = True
    model: str = "14b"   # or "tiny"

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.infer_frames)


SCENARIOS = {s.name: s for s in [
    Scenario("later-704x1024-80f", 704, 1024, 80, "later"),
    Scenario("first-704x1024-80f", 704, 1024, 80, "first"),
    Scenario("later-704x1024-48f", 704, 1024, 48, "later"),
    Scenario("later-448x832-80f", 448, 832, 80, "later"),
    Scenario("first-448x832-80f", 448, 832, 80, "first"),
    Scenario("later-448x832-48f", 448, 832, 48, "later"),
    Scenario("later-704x1024-80f-nocfg", 704, 1024, 80, "later", cfg=False),
    Scenario("tiny-cpu", 64, 96, 16, "later", steps=4, model="tiny"),
]}


def measure_ceilings(device: torch.device, seq: int, cfg) -> dict:
    """bf16 GEMM (FFN up-projection shape) and SDPA rates on this device, measured now."""
    if device.type != "cuda":
        return {}
    a = torch.randn(seq, cfg.dim, device=device, dtype=torch.bfloat16)
    b = torch.randn(cfg.dim, cfg.ffn_dim, device=device, dtype=torch.bfloat16)
    t_mm = median(time_fn(lambda: a @ b, device, warmup=2, repeat=5))
    q = torch.randn(1, cfg.num_heads, seq, cfg.head_dim, device=device, dtype=torch.bfloat16)
    t_att = median(time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), device, warmup=1, repeat=3))
    return {"gemm_tflops": 2 * seq * cfg.dim * cfg.ffn_dim / t_mm / 1e12, "attention_tflops": 4 * seq * seq * cfg.dim / t_att / 1e12}


def build(scn: Scenario, device: torch.device):
    from runtime.config import DiTConfig
    from runtime.models.dit import build_dit
    from runtime.tiny import tiny_dit

    if scn.model == "tiny":
        return tiny_dit(torch.float32, device)
    return build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)


def clip_conditions(model, scn: Scenario, device, dtype):
    from runtime.models.dit import ClipConditions

    cfg = model.cfg
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    h, w, f = scn.height // 8, scn.width // 8, scn.latent_frames
    ref, motion = r(1, 16, 1, h, w), (r(1, 16, 19, h, w) if scn.clip == "later" else None)
    audio = r(1, cfg.audio_layers, cfg.audio_dim, scn.infer_frames)
    c = model.prepare(r(1, 40, cfg.text_dim), ref, motion, None, audio, f)
    u = model.prepare(r(1, 60, cfg.text_dim), ref, motion, None, audio * 0, f)
    return r(1, 16, f, h, w), c, u, ClipConditions.cat([c, u])


def stage_rows(scn: Scenario, device, repeat: int, stages: set[str]) -> list[dict]:
    """Encoders and VAE (independent of the DiT backend), random weights at the real sizes."""
    rows = []
    if "vae" in stages:
        rows += vae_rows(scn, device, repeat)
    if "encoders" in stages:
        rows += encoder_rows(scn, device, repeat)
    for r in rows:
        print(r, flush=True)
    return rows


def vae_rows(scn: Scenario, device, repeat: int) -> list[dict]:
    rows = []
    from runtime.models.vae import VAEConfig, WanVAE

    vcfg = VAEConfig.tiny() if scn.model == "tiny" else VAEConfig.wan21()
    with torch.device(device):
        vae = WanVAE(vcfg).eval().requires_grad_(False)
    lat = torch.randn(1, 16, 19 + scn.latent_frames if scn.clip == "later" else 1 + scn.latent_frames,
                      scn.height // 8, scn.width // 8, device=device)
    video = torch.rand(1, 3, 73, scn.height, scn.width, device=device) * 2 - 1
    for stage, fn in (("vae_decode", lambda: vae.decode_chunked(lat)), ("vae_encode", lambda: vae.encode_chunked(video))):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ts = time_fn(fn, device, warmup=1 if scn.model == "tiny" else 0, repeat=max(1, repeat - 1))
        rows.append({"variant": "common", "stage": stage, "seconds": median(ts),
                     "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None})
    return rows


def encoder_rows(scn: Scenario, device, repeat: int) -> list[dict]:
    rows = []
    if scn.model == "tiny":
        from runtime.tiny import tiny_audio_encoder, tiny_text_encoder

        text, audio_enc = tiny_text_encoder(device), tiny_audio_encoder(device)
    else:
        text, audio_enc = full_size_encoders(device)
    import numpy as np

    wav = (np.random.default_rng(0).standard_normal(16000 * 5) * 0.1).astype(np.float32)
    for stage, fn in (("umt5", lambda: text.encode(["a person talking to the camera, close-up, natural light"])),
                      ("wav2vec2", lambda: audio_enc(wav))):
        ts = time_fn(fn, device, warmup=1, repeat=repeat)
        rows.append({"variant": "common", "stage": stage, "seconds": median(ts), "peak_mem_gib": None})
    return rows


def full_size_encoders(device):
    """UMT5-XXL (bf16) and wav2vec2-large (fp32) with random weights at the real configuration."""
    from transformers import UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from runtime.models.audio import Wav2Vec2Features
    from runtime.models.text import TextEncoder, umt5_config_from_wan
    from runtime.tiny import ByteTokenizer

    with torch.device(device):
        t5 = UMT5EncoderModel(umt5_config_from_wan()).to(torch.bfloat16).eval()
    w2v_cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                             do_stable_layer_norm=True, feat_extract_norm="layer", conv_bias=True)
    with torch.device(device):
        w2v = Wav2Vec2Model(w2v_cfg).eval()
    ext = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    return TextEncoder(t5, ByteTokenizer()), Wav2Vec2Features(w2v, ext, device, torch.float32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="tiny-cpu", choices=sorted(SCENARIOS))
    ap.add_argument("--variants", default="torch", help="comma list of DiT backends")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages", default="dit,vae,encoders", help="comma list: dit,vae,encoders")
    ap.add_argument("--engines_dir", default="engines")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    device = torch.device("cuda" if torch.cuda.is_available() and scn.model != "tiny" else "cpu")
    torch.set_grad_enabled(False)
    stages = {s.strip() for s in args.stages.split(",")}
    from runtime.backends import make_backend

    model = build(scn, device)
    dtype = model.dtype
    x, cond, uncond, both = clip_conditions(model, scn, device, dtype)
    seq = cond.num_tokens
    cfg = model.cfg
    flops1 = dit_forward_flops(cfg, scn.latent_frames, scn.height // 16, scn.width // 16, cond.extra.shape[1])
    ceilings = measure_ceilings(device, seq, cfg)
    t_freq = torch.randn(1, cfg.freq_dim, device=device)
    variants, backends, errors = [v for v in args.variants.split(",") if v], {}, {}
    compiled_model = None  # compiling variants patch the blocks: give them their own copy of the same weights
    for v in variants:
        try:
            m = model
            if v in ("torch-compile", "torch-graph"):
                compiled_model = compiled_model or build(scn, device)
                m = compiled_model
            backends[v] = make_backend(v, m, engines_dir=args.engines_dir)
        except Exception as err:
            errors[v] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    calls = {
        "dit_forward": lambda b: b.forward(x, t_freq, cond),
        "dit_step": (lambda b: b.forward(x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both)) if scn.cfg
        else (lambda b: b.forward(x, t_freq, cond)),
    }
    times: dict[tuple[str, str], list[float]] = {}
    peaks: dict[str, float] = {}
    first_call: dict[str, float] = {}
    if "dit" in stages:
        for v, b in list(backends.items()):  # warm-up: compilation, capture, session start
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                for fn in calls.values():
                    fn(b)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    # two weight copies are resident when eager and compiled variants run side by side:
                    # count only the copy this variant uses
                    other = (model if b.model is compiled_model else compiled_model) if compiled_model is not None else None
                    other_b = sum(p.numel() * p.element_size() for p in other.parameters()) if other is not None else 0
                    peaks[v] = (torch.cuda.max_memory_allocated(device) - other_b) / 2**30
                first_call[v] = time.perf_counter() - t0
            except Exception as err:
                errors[v] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                backends.pop(v)
        for _ in range(args.repeat):  # interleaved: one timed call per variant per stage per round
            for stage, fn in calls.items():
                for v, b in backends.items():
                    times.setdefault((v, stage), []).extend(time_fn(lambda: fn(b), device, warmup=0, repeat=1))
    del backends, model, compiled_model, x, cond, uncond, both  # free the DiT(s) before the VAE/encoder stages
    if device.type == "cuda":
        torch.cuda.empty_cache()
    common = stage_rows(scn, device, args.repeat, stages) if stages & {"vae", "encoders"} else []
    common = [r for r in common if (r["stage"].startswith("vae") and "vae" in stages) or
              (not r["stage"].startswith("vae") and "encoders" in stages)]
    vae_s = sum(r["seconds"] for r in common if r["stage"].startswith("vae")) if "vae" in stages else None

    rows = []
    step_flops = flops1.total * (2 if scn.cfg else 1)
    for v in variants:
        if v in errors and (v, "dit_forward") not in times:
            rows.append({"device": device_slug(device), "variant": v, "scenario": scn.name, "error": errors[v]})
            continue
        if "dit" not in stages:
            continue
        fwd, step = median(times[(v, "dit_forward")]), median(times[(v, "dit_step")])
        row = {"device": device_slug(device), "variant": v, "scenario": scn.name, "dit_forward_s": fwd, "step_s": step,
               "clip_s": None if vae_s is None else scn.steps * step + vae_s, "peak_mem_gib": peaks.get(v), "tflops": flops1.total / fwd / 1e12,
               "first_call_s": first_call.get(v), "forward_all_s": times[(v, "dit_forward")], "step_all_s": times[(v, "dit_step")]}
        if ceilings:
            floor = flops1.floor_s(ceilings["gemm_tflops"], ceilings["attention_tflops"])
            row["floor_s"] = floor
            row["pct_of_floor"] = 100 * floor / fwd
        rows.append(row)
    rows += [{"device": device_slug(device), "scenario": scn.name, **r} for r in common]
    meta = {"device": device_description(device), "scenario": asdict(scn), "tokens": seq, "dtype": str(dtype),
            "flops_per_forward": {"linear": flops1.linear, "attention": flops1.attention}, "step_flops": step_flops,
            "ceilings": ceilings, "repeat": args.repeat,
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": "random weights; CUDA events; median of repeats; variants interleaved; clip_s = steps × step_s + "
                     "VAE decode + encode (text/audio encoders run once per request, listed separately)"}
    dit_rows = [r for r in rows if "dit_forward_s" in r]
    table = markdown_table(dit_rows, ["device", "variant", "scenario", "dit_forward_s", "step_s", "clip_s", "peak_mem_gib",
                                      "tflops"] + (["pct_of_floor"] if ceilings else []))
    if common:
        table += "\n\n" + markdown_table(common, ["variant", "stage", "seconds", "peak_mem_gib"])
    errs = [r for r in rows if "error" in r]
    if errs:
        table += "\n\n" + markdown_table(errs, ["variant", "error"])
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(device)
    path = out / f"run_{scn.name}.json"
    write_results(path, rows, meta, table)
    plot(dit_rows, scn, path.with_suffix(".png"))
    print(table)
    return 0


def plot(rows: list[dict], scn: Scenario, path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 0.6 + 0.5 * len(rows)))
    names = [r["variant"] for r in rows]
    vals = [r["step_s"] for r in rows]
    ax.barh(names, vals, color="#4477aa")
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}s", va="center")
    ax.set_xlabel("seconds per denoising step" + (" (CFG, batch 2)" if scn.cfg else ""))
    ax.set_title(f"{scn.name} ({rows[0]['device']})")
    ax.invert_yaxis()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
