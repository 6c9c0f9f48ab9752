"""Full-size DiT forward timing with random weights: first and later clip, one or more variants.

    python -m benchmarks.dit_forward --size 704*1024 --frames 80 --variants eager,compile --out DIR

Variants (measured in the same process, interleaved per clip kind):
  eager    — ``WanS2VDiT.step`` in bf16 with PyTorch's default SDPA dispatch
  compile  — the same with every transformer block under ``torch.compile`` (one compiled graph reused
             by all 40 blocks)
Also times SDPA backends (cuDNN / flash / efficient) at the later-clip sequence length.
Writes ``dit_forward.json`` + ``dit_forward.md`` into --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (device_description, device_slug, markdown_table, median, peak_mem_gib, results_dir,
                               time_fn, write_results)
from runtime.backends.torch_backend import compile_blocks
from runtime.config import DiTConfig
from runtime.models.dit import build_dit, timestep_frequencies
from runtime.sampler import latent_frames

SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def clip_inputs(cfg: DiTConfig, height: int, width: int, infer_frames: int, device, dtype, seed: int = 0):
    frames = latent_frames(infer_frames)
    h, w = height // 8, width // 8
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    return frames, dict(x=r(1, 16, frames, h, w), context=r(1, 77, cfg.text_dim), ref=r(1, 16, 1, h, w),
                        motion=r(1, 16, 19, h, w), audio=r(1, cfg.audio_layers, cfg.audio_dim, infer_frames))


def sdpa_rows(cfg: DiTConfig, seq: int, device, repeat: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, cfg.num_heads, seq, cfg.head_dim, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4 * seq * seq * cfg.dim
    rows = []
    for name, member in SDPA.items():
        try:
            with sdpa_kernel(getattr(SDPBackend, member)):
                ts = time_fn(lambda: F.scaled_dot_product_attention(q, k, v), device, warmup=1, repeat=repeat)
            rows.append({"backend": name, "seq": seq, "attention_s": median(ts), "tflops": flops / median(ts) / 1e12})
        except Exception as err:  # a backend may refuse this shape/dtype on this GPU
            rows.append({"backend": name, "seq": seq, "error": f"{type(err).__name__}: {str(err)[:120]}"})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="704*1024", help="pixel H*W of the clip")
    ap.add_argument("--frames", type=int, default=80, help="pixel frames per clip (infer_frames)")
    ap.add_argument("--variants", default="eager", help="comma list: eager,compile")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--config", default="14b", help="14b or tiny")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--sdpa", action="store_true", help="also time the SDPA backends at the later-clip length")
    ap.add_argument("--budget-s", type=float, default=480, help="skip remaining variants past this wall time")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DiTConfig.s2v_14b() if args.config == "14b" else DiTConfig.tiny()
    height, width = (int(v) for v in args.size.split("*"))
    torch.set_grad_enabled(False)

    t0 = time.perf_counter()
    model = build_dit(cfg, dtype=dtype, device=device)
    build_s = time.perf_counter() - t0
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    print(f"built {args.config} DiT on {device_description(device)} in {build_s:.1f}s ({weights_gib:.1f} GiB)", flush=True)

    frames, inp = clip_inputs(cfg, height, width, args.frames, device, dtype)
    conds = {
        "later": model.prepare(inp["context"], inp["ref"], inp["motion"], None, inp["audio"], frames),
        "first": model.prepare(inp["context"], inp["ref"], None, None, inp["audio"], frames),
    }
    t_freq = timestep_frequencies(999.0, cfg.freq_dim).to(device)
    rows = []
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"variant": variant, "error": "skipped: wall-time budget spent"})
            continue
        if variant == "compile":
            t0 = time.perf_counter()
            compile_blocks(model)
        for kind in ("later", "first"):
            c = conds[kind]
            seq = c.num_tokens
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                w0 = time.perf_counter()
                model.step(inp["x"], t_freq, *c.as_tuple())  # warm-up (compiles for 'compile')
                warm_s = time.perf_counter() - w0
                ts = time_fn(lambda: model.step(inp["x"], t_freq, *c.as_tuple()), device, warmup=0, repeat=args.repeat)
            except torch.cuda.OutOfMemoryError as err:
                rows.append({"variant": variant, "clip": kind, "error": f"OOM: {str(err)[:100]}"})
                continue
            row = {"device": device_slug(device), "variant": f"torch-{variant}-bf16", "clip": kind,
                   "shape": f"{height}x{width}, {args.frames} frames ({frames} latent), {seq} tokens, batch 1",
                   "tokens": seq, "dit_forward_s": median(ts), "all_s": [round(t, 4) for t in ts],
                   "first_call_s": round(warm_s, 2), "peak_mem_gib": peak_mem_gib(device)}
            rows.append(row)
            print(row, flush=True)

    sdpa = []
    if args.sdpa and device.type == "cuda":
        seq = conds["later"].num_tokens
        del model, conds
        torch.cuda.empty_cache()
        sdpa = sdpa_rows(cfg, seq, device, repeat=3)
        for r in sdpa:
            print(r, flush=True)

    meta = {"device": device_description(device), "config": args.config, "dtype": str(dtype),
            "weights_gib": round(weights_gib, 2), "build_s": round(build_s, 1),
            "command": "python -m benchmarks.dit_forward " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
            "sdpa": sdpa, "note": "random weights, one DiT forward (= half a CFG step), CUDA events, median"}
    table = markdown_table([r for r in rows if "dit_forward_s" in r],
                           ["device", "variant", "clip", "tokens", "dit_forward_s", "peak_mem_gib"])
    if sdpa:
        table += "\n\n" + markdown_table(sdpa, ["backend", "seq", "attention_s", "tflops"])
    print(table)
    out = results_dir(args.out, device)
    write_results(out / "dit_forward.json", rows, meta, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
