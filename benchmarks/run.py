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

from benchmarks.common import code_revision, device_description, device_slug, markdown_table, median, results_dir, time_fn, write_results
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


@dataclass(frozen=True)
class ForwardInputs:
    """One call's inputs, the same in every process that draws them (seeded): latents ``x``, text states, the
    reference and motion latents (None for a first clip), the audio features and the timestep."""

    x: torch.Tensor
    text: torch.Tensor
    ref: torch.Tensor
    motion: torch.Tensor | None
    audio: torch.Tensor
    timestep: float = 500.0


def forward_inputs(cfg, scn: Scenario, device, dtype) -> ForwardInputs:
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    h, w, f = scn.height // 8, scn.width // 8, scn.latent_frames
    ref, motion = r(1, 16, 1, h, w), (r(1, 16, 19, h, w) if scn.clip == "later" else None)
    audio = r(1, cfg.audio_layers, cfg.audio_dim, scn.infer_frames)
    return ForwardInputs(r(1, 16, f, h, w), r(1, 40, cfg.text_dim), ref, motion, audio)


def clip_conditions(model, scn: Scenario, device, dtype):
    """Latents and the prepared cond / uncond / batch-2 conditions of ``forward_inputs``."""
    from runtime.models.dit import ClipConditions

    inp = forward_inputs(model.cfg, scn, device, dtype)
    c = model.prepare(inp.text, inp.ref, inp.motion, None, inp.audio, scn.latent_frames)
    u = model.prepare(inp.text[:, :0], inp.ref, inp.motion, None, inp.audio * 0, scn.latent_frames)
    return inp.x, c, u, ClipConditions.cat([c, u])


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


@dataclass(frozen=True)
class Variant:
    """``backend[:attention][@precision]``, e.g. ``torch``, ``torch-graph:fa4``, ``torch-graph@fp8``; or the official
    model: ``official`` (its SDPA fallback) or ``official:fa3`` (its FlashAttention-3 path on our FA3 build), each
    measured in a process of its own before ours are built, alone on the GPU, as it runs for a user; or
    ``official-inprocess`` (SDPA, in this process beside ours, interleaved: how earlier runs measured it)."""

    spec: str

    @property
    def is_official(self) -> bool:
        return self.backend in ("official", "official-inprocess")

    @property
    def backend(self) -> str:
        return self.spec.split("@")[0].split(":")[0]

    @property
    def attention(self) -> str:
        head = self.spec.split("@")[0]
        return head.split(":")[1] if ":" in head else "auto"

    @property
    def precision(self) -> str:
        return self.spec.split("@")[1] if "@" in self.spec else "bf16"


def fastest_attention(model, seq: int, device, candidates=("sdpa", "cudnn", "fa4", "fa3")) -> tuple[str, dict]:
    """Time each available self-attention kernel once at this sequence length; the fastest wins."""
    from runtime.models.attention import _kernel, unavailable_reason

    cfg = model.cfg
    q = torch.randn(1, seq, cfg.num_heads, cfg.head_dim, device=device, dtype=model.dtype)
    times = {}
    for impl in candidates:
        if unavailable_reason(impl, device, cfg.head_dim) is None:
            try:
                times[impl] = median(time_fn(lambda: _kernel(q, q, q, impl), device, warmup=1, repeat=3))
            except Exception as err:  # a kernel that fails here is simply not a candidate
                print(f"attention {impl}: {type(err).__name__}: {err}", flush=True)
    return min(times, key=times.get), times


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", default="tiny-cpu", choices=sorted(SCENARIOS))
    ap.add_argument("--variants", default="torch",
                    help="comma list of backend[:attention][@precision] (attention: auto, sdpa, cudnn, fa4, fa3, "
                         "fp8, fa3-fp8, fastest; precision: bf16, fp8 = FP8 linears, attention as named), or "
                         "'official' (needs --official-repo)")
    ap.add_argument("--step-variants", default=None, help="variants whose CFG step is timed too (default: all but official)")
    ap.add_argument("--official-repo", default=None, help="a checkout of Wan-Video/Wan2.2 (the folder holding wan/)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--graph-warmup", type=int, default=2, help="eager runs before a CUDA graph is captured")
    ap.add_argument("--stages", default="dit,vae,encoders", help="comma list: dit,vae,encoders")
    ap.add_argument("--engines_dir", default="engines")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                    help="merge this LoRA into every variant of ours (repeatable), as runtime.generate --lora does")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    scn = SCENARIOS[args.scenario]
    from runtime import lora

    loras = [lora.LoraSpec.parse(x) for x in args.lora]
    device = torch.device("cuda" if torch.cuda.is_available() and scn.model != "tiny" else "cpu")
    torch.set_grad_enabled(False)
    stages = {s.strip() for s in args.stages.split(",")}
    variants = [Variant(v) for v in args.variants.split(",") if v]
    step_set = set(args.step_variants.split(",")) if args.step_variants is not None else {v.spec for v in variants if not v.is_official}
    out_dir = results_dir(args.out, device)
    path = out_dir / f"run_{scn.name}.json"

    from runtime.backends import make_backend
    from runtime.models.dit import from_state_dict, timestep_frequencies

    if any(v.is_official for v in variants) and not args.official_repo:
        raise SystemExit("the official variants need --official-repo PATH (a checkout of Wan-Video/Wan2.2)")
    isolated = [v for v in variants if v.backend == "official"]
    official_rows, official_out = (run_official_process(scn, args.official_repo,
                                                        ["sdpa" if v.attention == "auto" else v.attention for v in isolated],
                                                        args.repeat, device) if isolated else ([], {}))
    base = build(scn, device)           # random weights (bf16 at full size), the same in the official process
    cfg = base.cfg
    official = None
    if any(v.backend == "official-inprocess" for v in variants):
        from benchmarks.official import build_official, use_attention

        use_attention("sdpa")
        official = build_official(args.official_repo, cfg, {k: v.to(base.dtype) for k, v in base.state_dict().items()})
        state = official.state_dict()   # our models load the official model's own tensors (strict)
    else:
        state = base.state_dict()
    del base
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, cond, uncond, both = clip_conditions(from_state_dict(cfg, state), scn, device, dtype)
    seq = cond.num_tokens
    flops1 = dit_forward_flops(cfg, scn.latent_frames, scn.height // 16, scn.width // 16, cond.extra.shape[1])
    ceilings = measure_ceilings(device, seq, cfg)
    inp = forward_inputs(cfg, scn, device, dtype)
    t_value, text, ref, motion, audio = inp.timestep, inp.text, inp.ref, inp.motion, inp.audio
    t_freq = timestep_frequencies([t_value], cfg.freq_dim).to(device)

    meta = {"device": device_description(device), "scenario": asdict(scn), "tokens": seq, "dtype": str(dtype),
            "flops_per_forward": {"linear": flops1.linear, "attention": flops1.attention},
            "step_flops": flops1.total * (2 if scn.cfg else 1), "ceilings": ceilings, "repeat": args.repeat,
            "timestep": t_value, "gpus": 1, "git": code_revision(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": "python -m benchmarks.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "notes": "random weights (bf16 at full size, seeded: the same in the official process), shared by every "
                     "variant of this process; CUDA events; median of repeats; forward calls interleaved across the "
                     "variants of this process, CFG steps (one batch-2 call) timed per variant after; 'official' and "
                     "'official:fa3' ran first, in a process of their own (process: own); rel_l2_vs_official / "
                     "rel_l2_vs_bf16 on the same inputs; official step = two forward calls, as the official loop "
                     "does; prepare_s: ours' per-clip conditioning (once per clip and CFG branch), "
                     "forward_with_prepare_s = dit_forward_s + prepare_s / steps; ratio_same_kernel and "
                     "ratio_vs_official_sdpa divide the official forward by forward_with_prepare_s"}
    rows: list[dict] = []
    outputs: dict[str, torch.Tensor] = dict(official_out)
    runners: dict[str, object] = {}
    errors: dict[str, str] = {}
    extra: dict[str, dict] = {}

    def save():
        table = markdown_table(rows, ["variant", "precision", "scenario", "gpus", "attention", "dit_forward_s",
                                      "forward_with_prepare_s", "ratio_same_kernel", "ratio_vs_official_sdpa", "step_s",
                                      "clip_s", "peak_mem_gib", "tflops", "pct_of_floor", "rel_l2_vs_official",
                                      "rel_l2_vs_bf16"])
        errs = [{"variant": k, "error": e} for k, e in errors.items()]
        if errs:
            table += "\n\n" + markdown_table(errs, ["variant", "error"])
        write_results(path, rows + [{"variant": k, "scenario": scn.name, "error": e} for k, e in errors.items()],
                      {**meta, "attention": extra}, table)
        return table

    def err(v, e):
        errors[v] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        print(f"[{v}] {errors[v]}", flush=True)

    block0: dict[str, torch.Tensor] = {}
    for v in variants:  # build, warm up (compile, capture), keep one output for the comparisons
        t0 = time.perf_counter()
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if v.backend == "official":
                continue  # measured in its own process above
            if v.backend == "official-inprocess":
                from benchmarks.official import official_forward

                hook = official.blocks[0].register_forward_pre_hook(lambda m, a, kw: block0.__setitem__("official", a[0].float().clone()), with_kwargs=True)
                fn = lambda: official_forward(official, x, t_value, text, ref, motion, audio, scn.clip == "first")  # noqa: E731
                outputs[v.spec] = fn()
                hook.remove()
                runners[v.spec] = (fn, None)
                extra.setdefault(v.spec, {})["attention"] = "sdpa (official fallback, in this process)"
            else:
                model = from_state_dict(cfg, state)
                lora.merge(model, loras, round_dtype=model.dtype)
                if v.precision == "fp8":
                    model.set_precision("fp8")
                attn = v.attention
                if attn == "fastest":
                    attn, times = fastest_attention(model, seq, device)
                    extra[v.spec] = {"chosen": attn, "seconds_per_call": times}
                model.set_attention(attn)  # FP8 attention only where named (:fp8, :fa3-fp8), as in the runtime
                extra.setdefault(v.spec, {})["attention"] = model.attention_impl
                backend = make_backend(v.backend, model, engines_dir=args.engines_dir)
                if hasattr(backend, "warmup"):
                    backend.warmup = args.graph_warmup
                prep = lambda m=model: m.prepare(text, ref, motion, None, audio, scn.latent_frames)  # noqa: E731
                extra[v.spec]["prepare_s"] = median(time_fn(prep, device, warmup=1, repeat=3))
                mc = prep()
                hook = model.blocks[0].register_forward_pre_hook(lambda m, a: block0.__setitem__(v.spec, a[0].float().clone()))
                fwd = lambda b=backend, c=mc: b.forward(x, t_freq, c)  # noqa: E731
                outputs[v.spec] = fwd().float()
                hook.remove()
                step = None
                if scn.cfg:
                    step = lambda b=backend: b.forward(x.expand(2, -1, -1, -1, -1), t_freq.expand(2, -1), both)  # noqa: E731
                runners[v.spec] = (fwd, step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()  # what the build left in the allocator's cache: the official model needs room
            extra.setdefault(v.spec, {})["first_call_s"] = time.perf_counter() - t0
            print(f"[{v.spec}] ready in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:
            err(v.spec, e)
    times: dict[str, list[float]] = {}
    if "dit" in stages:
        for _ in range(args.repeat):  # forward calls interleaved across variants
            for spec, (fwd, _) in runners.items():
                try:
                    times.setdefault(spec, []).extend(time_fn(fwd, device, warmup=0, repeat=1))
                except Exception as e:
                    err(spec, e)
        for v in variants:
            spec = v.spec
            if spec not in times or spec in errors:
                continue
            fwd_s = median(times[spec])
            prec = v.precision if v.precision == "fp8" else {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
            row = {"device": device_slug(device), "variant": spec, "precision": prec, "scenario": scn.name,
                   "gpus": 1, "attention": extra.get(spec, {}).get("attention", "sdpa (flash_attention routed)"),
                   "dit_forward_s": fwd_s, "forward_all_s": times[spec], "tflops": flops1.total / fwd_s / 1e12}
            if ceilings:
                row["pct_of_floor"] = 100 * flops1.floor_s(ceilings["gemm_tflops"], ceilings["attention_tflops"]) / fwd_s
            if "prepare_s" in extra.get(spec, {}):
                row["prepare_s"] = extra[spec]["prepare_s"]
                row["forward_with_prepare_s"] = fwd_s + row["prepare_s"] / scn.steps
            same = "official:fa3" if extra.get(spec, {}).get("attention") == "fa3" else "official"
            official_ref = next((outputs[k] for k in (same, "official", "official-inprocess") if k in outputs), None)
            if official_ref is not None and not v.is_official:
                row["rel_l2_vs_official"] = rel_l2(outputs[spec], official_ref)
                if spec in block0 and "official-inprocess" in block0:
                    row["block0_input_rel_l2_vs_official"] = rel_l2(block0[spec], block0["official-inprocess"])
            ref_bf16 = next((o for k, o in outputs.items() if not Variant(k).is_official and Variant(k).precision == "bf16"), None)
            if v.precision == "fp8" and ref_bf16 is not None:
                row["rel_l2_vs_bf16"] = rel_l2(outputs[spec], ref_bf16)
            rows.append(row)
        for row in official_rows:
            row["tflops"] = flops1.total / row["dit_forward_s"] / 1e12
            if ceilings:
                row["pct_of_floor"] = 100 * flops1.floor_s(ceilings["gemm_tflops"], ceilings["attention_tflops"]) / row["dit_forward_s"]
        rows[:0] = official_rows
        add_ratios(rows)
        save()
        for row in rows:  # CFG steps, one variant at a time (captured graphs of other variants released)
            spec = row["variant"]
            if Variant(spec).is_official:
                row["step_s"] = 2 * row["dit_forward_s"]
                row["step_note"] = "two forward calls per step, as the official loop"
                continue
            fwd, step = runners[spec]
            if step is None or spec not in step_set:
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                ts = time_fn(step, device, warmup=1, repeat=max(1, args.repeat - 1))
                row["step_s"], row["step_all_s"] = median(ts), ts
                if device.type == "cuda":
                    row["peak_mem_gib_step"] = torch.cuda.max_memory_allocated(device) / 2**30
            except Exception as e:
                err(spec, e)
            backend = getattr(fwd, "__defaults__", (None,))[0]
            if hasattr(backend, "drop_graphs"):
                backend.drop_graphs()
            print(f"[{spec}] step {row.get('step_s')}", flush=True)
            save()
    del runners, outputs, official, official_out, state, x, cond, uncond, both
    if device.type == "cuda":
        torch.cuda.empty_cache()
    common = stage_rows(scn, device, args.repeat, stages) if stages & {"vae", "encoders"} else []
    vae_s = sum(r["seconds"] for r in common if r["stage"].startswith("vae")) if "vae" in stages else None
    for row in rows:
        if vae_s is not None and row.get("step_s"):
            row["clip_s"] = scn.steps * row["step_s"] + vae_s
    rows += [{"device": device_slug(device), "scenario": scn.name, **r} for r in common]
    table = save()
    plot([r for r in rows if "dit_forward_s" in r], scn, path.with_suffix(".png"))
    print(table)
    return 0


def run_official_process(scn: Scenario, repo: str, kernels: list[str], repeat: int, device) -> tuple[list[dict], dict]:
    """Measure the official model in a fresh process (``benchmarks.official_process``) before this one allocates
    anything on the GPU: its rows, and its outputs by variant name (for the rel-L2 columns)."""
    import json
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="s2v-official-") as tmp:
        cmd = [sys.executable, "-m", "benchmarks.official_process", "--scenario", scn.name, "--official-repo", repo,
               "--attention", ",".join(kernels), "--repeat", str(repeat), "--out", tmp]
        print("official model in its own process: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        rows = json.loads((Path(tmp) / "rows.json").read_text())
        outputs = {name: t.to(device) for name, t in load_file(Path(tmp) / "outputs.safetensors").items()}
    return rows, outputs


def add_ratios(rows: list[dict]) -> None:
    """Ours against the official forward at the same attention kernel, and against the official SDPA fallback
    (how the official runs without flash_attn installed): official seconds / ours with prepare pro rata."""
    official = {r["official_attention"]: r["dit_forward_s"] for r in rows if r.get("official_attention")}
    for r in rows:
        ours = r.get("forward_with_prepare_s")
        if not ours:
            continue
        kernel = r.get("attention")
        if kernel in official:
            r["ratio_same_kernel"] = official[kernel] / ours
        if "sdpa" in official:
            r["ratio_vs_official_sdpa"] = official["sdpa"] / ours


def plot(rows: list[dict], scn: Scenario, path: Path) -> None:
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("step_s")]
    if not rows:
        return
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
