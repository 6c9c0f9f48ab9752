"""``python -m benchmarks.vae_speed``: the VAE decode and motion re-encode of one later clip, by variant.

Random Wan2.1 VAE weights (float32, the real configuration), a later clip at 704×1024: decode of
[19 motion ‖ 20 new] latents (153 frames; the sampler keeps the last 80) and the re-encode of the 73-frame motion
history. Each variant is timed after a warm-up on a shorter input of the same chunk shapes, and compared with the
baseline's output (max / mean absolute difference in grey levels, 1 = 1/255 of the range). A profile of the
baseline's chunk step groups its GPU time by kernel family.

    python -m benchmarks.vae_speed --out DIR [--variants baseline,cudnn-benchmark,channels-last,compiled]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.common import code_revision, device_description, markdown_table, peak_mem_gib, results_dir, sync, write_results


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

# name[:N]: N latents (4·N pixel frames) per chunk step instead of 1 (the chunked form is exact for any N)
VARIANTS = ("baseline", "cudnn-benchmark", "channels-last", "cudnn-benchmark:2", "channels-last:2", "channels-last:4",
            "compiled", "compiled-channels-last")
FAMILIES = (("conv", re.compile(r"conv|implicit|xmma|cudnn|sm90|sm80|gemm|nvjet|cutlass", re.I)),
            ("cat / copy", re.compile(r"cat|copy", re.I)),
            ("norm / reduce", re.compile(r"reduce|norm", re.I)),
            ("elementwise (eager)", re.compile(r"elementwise", re.I)),
            ("fused (triton)", re.compile(r"triton", re.I)),
            ("softmax / attention", re.compile(r"softmax|fmha|attention", re.I)))


def family(name: str) -> str:
    for fam, pat in FAMILIES:
        if pat.search(name):
            return fam
    return "other"


def setup(vae, variant: str):
    """Apply a variant to the VAE; returns (decode_step, encode_step, input transform)."""
    torch.backends.cudnn.benchmark = variant != "baseline"
    channels_last = "channels-last" in variant
    if channels_last:
        for p in vae.parameters():
            if p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    else:
        for p in vae.parameters():
            p.data = p.data.contiguous()
    dec, enc = vae.decode_step, vae.encode_step
    if variant.startswith("compiled"):
        torch._dynamo.reset()
        dec = torch.compile(vae.decode_step, dynamic=False)
        enc = torch.compile(vae.encode_step, dynamic=False)

    def prep(x):
        return x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
    return dec, enc, prep


def decode(vae, z, step, prep, n=1):
    frames, caches = vae.decode_first(prep(z[:, :, :1]))
    out = [frames]
    for i in range(1, z.shape[2], n):
        f, caches = step(prep(z[:, :, i:i + n]), caches)
        out.append(f)
    return torch.cat(out, dim=2)


def encode(vae, video, step, prep, n=1):
    z0, caches = vae.encode_first(prep(video[:, :, :1]))
    out = [z0]
    for s in range(1, 1 + 4 * ((video.shape[2] - 1) // 4), 4 * n):
        z, caches = step(prep(video[:, :, s:s + 4 * n]), caches)
        out.append(z)
    return torch.cat(out, dim=2)


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    from runtime.models.vae import VAEConfig, WanVAE

    ap = argparse.ArgumentParser(prog="python -m benchmarks.vae_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--height", type=int, default=704)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--latents", type=int, default=39, help="latent frames decoded (19 motion + 20 new)")
    ap.add_argument("--motion_frames", type=int, default=73)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda", help="cpu for a dry run at a small size")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    with torch.device(dev):
        vae = WanVAE(VAEConfig.wan21()).eval().requires_grad_(False)
    g = torch.Generator(device=dev).manual_seed(1)
    z = torch.randn(1, 16, args.latents, args.height // 8, args.width // 8, device=dev, generator=g)
    video = torch.rand(1, 3, args.motion_frames, args.height, args.width, device=dev, generator=g) * 2 - 1
    rows, ref_dec, ref_enc = [], None, None
    for variant in args.variants.split(","):
        name, _, n = variant.partition(":")
        n = int(n or 1)
        dec_step, enc_step, prep = setup(vae, name)
        t0 = time.perf_counter()
        decode(vae, z[:, :, :1 + 2 * n], dec_step, prep, n)  # warm-up: compilation, cuDNN algorithm search
        encode(vae, video[:, :, :1 + 8 * n], enc_step, prep, n)
        sync(dev)
        warm = time.perf_counter() - t0
        reset_peak(dev)
        d, dt = timed(lambda: decode(vae, z, dec_step, prep, n), dev)
        dec_peak = peak_mem_gib(dev) or 0.0
        reset_peak(dev)
        e, et = timed(lambda: encode(vae, video, enc_step, prep, n), dev)
        enc_peak = peak_mem_gib(dev) or 0.0
        d = d.float().clamp(-1, 1)
        if ref_dec is None:
            ref_dec, ref_enc = d, e
        grey = (d - ref_dec).abs() * 127.5
        rows.append({"variant": variant, "precision": "fp32 (TF32 convs)", "scenario": f"later-{args.height}x{args.width}",
                     "gpus": 1, "decode_s": round(dt, 3), "encode_s": round(et, 3), "total_s": round(dt + et, 3),
                     "warmup_s": round(warm, 1), "decode_max_grey": float(grey.max()), "decode_mean_grey": float(grey.mean()),
                     "encode_rel_l2": float((e - ref_enc).norm() / ref_enc.norm()),
                     "decode_peak_gib": round(dec_peak, 2), "encode_peak_gib": round(enc_peak, 2)})
        print(rows[-1], flush=True)
        del d, e
    # where the baseline's chunk step spends its time
    dec_step, enc_step, prep = setup(vae, "baseline")
    caches = vae.decode_first(z[:, :, :1])[1]
    act = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act]) as prof:
        dec_step(z[:, :, 1:2], caches)
        sync(dev)
    kern: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        t = ev.device_time if cuda else ev.cpu_time
        if (not cuda or ev.device_type == torch.autograd.DeviceType.CUDA) and t > 0:
            kern[ev.name] += t / 1e3
    fams: dict[str, float] = defaultdict(float)
    for name, ms in kern.items():
        fams[family(name)] += ms
    prof_rows = [{"variant": "baseline decode_step profile", "family": f, "ms": round(ms, 2)}
                 for f, ms in sorted(fams.items(), key=lambda kv: -kv[1])]
    top = sorted(kern.items(), key=lambda kv: -kv[1])[:15]
    for name, ms in top:
        print(f"{ms:9.2f} ms  {name[:140]}")
    meta = {"device": device_description(dev), "command": "python -m benchmarks.vae_speed " + " ".join(argv or sys.argv[1:]),
            "git": code_revision(), "date": time.strftime("%Y-%m-%d"), "dtype": "float32 weights and activations, TF32 convolutions (cuDNN default)",
            "shapes": {"decode_latents": list(z.shape), "encode_video": list(video.shape)},
            "weights": "random Wan2.1 VAE (real configuration)", "profile": prof_rows,
            "top_kernels_ms": [[n[:160], round(ms, 2)] for n, ms in top]}
    out = results_dir(args.out, dev) / f"vae_speed_later-{args.height}x{args.width}.json"
    cols = ["variant", "decode_s", "encode_s", "total_s", "warmup_s", "decode_max_grey", "decode_mean_grey",
            "encode_rel_l2", "decode_peak_gib", "encode_peak_gib"]
    table = markdown_table(rows, cols) + "\n\n" + markdown_table(prof_rows, ["variant", "family", "ms"])
    write_results(out, rows, meta, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
