"""``python -m benchmarks.step_cache``: a clip's wall time with the step cache (``--cache``) beside the same clip
computed in full, in one process on the same random weights and inputs.

A later-clip-shaped clip (``start_from_ref``: motion latents from the first clip on, so the DiT sees exactly the
tokens of a later clip) at 704×1024×80 on random 14B weights, the official recipe by default (40 steps, CFG
4.5, shift 3, UniPC), once per ``--caches`` entry. ``half`` is a fixed schedule that skips every even step
(20 of 40): it measures what a skipped step costs, whatever a real calibration would choose. Before each timed
clip a short generation with that row's step kinds (plain; residual-recording and skipped) pays compilation and
CUDA-graph capture, so the timed clip replays graphs only; the graphs of the row before are dropped first, so one
graph at a time is held. With UMT5 on the host between encodes, and on an 80 GB card the low-memory VAE
(``--vae-low-memory auto``), the run is meant to fit an H100 as well as an H200 (a prediction of the memory
model: each row's ``peak_gib`` and ``peak_reserved_gib`` say what it held).

Rows: ``cache``, ``steps``, ``steps_computed``, ``clip_s`` (denoise + VAE decode; the encoders and the reference
and motion VAE encodes are ``encode_s``, apart), ``computed_step_s`` / ``skipped_step_s`` (medians), ``capture_s``
(graph capture inside the timed clip: 0 unless an out-of-memory retry dropped a graph), ``peak_gib``, ``speedup``
over the uncached row, and the frames' ``rel_l2`` / ``psnr_db`` against the uncached clip. Random weights: the quality
columns say how far the cache moves *this* output, nothing about quality on real weights (``runtime.quality``
measures that on the user's checkpoint).

    python -m benchmarks.step_cache --out DIR                        # one GPU
    torchrun --nproc_per_node 4 -m benchmarks.step_cache --cfg-parallel --ulysses 2 --out DIR
    python -m benchmarks.step_cache --tiny --out /tmp/sc             # CPU dry run on the tiny model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.clip import StageClock, clip_stages
from benchmarks.common import (code_revision, demo_image_at, device_description, markdown_table, median, results_dir,
                               small_gpu, write_results)
from runtime import distributed, tiny
from runtime.demo import demo_speech
from runtime.pipeline import S2VPipeline
from runtime.quality import psnr

COLUMNS = ["variant", "cache", "scenario", "gpus", "steps", "steps_computed", "steps_skipped", "clip", "clip_s",
           "denoise_s", "vae_decode_s", "computed_step_s", "skipped_step_s", "capture_s", "peak_gib", "speedup",
           "rel_l2", "psnr_db"]


def half_schedule(steps: int) -> str:
    """``steps:2,4,...``: every even step skipped (1-based), so every skipped step follows a computed one."""
    return "steps:" + ",".join(str(i) for i in range(2, steps + 1, 2))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def finite(v: float) -> float | None:
    """JSON has no infinity: identical frames give None."""
    return float(v) if np.isfinite(v) else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_cache", description=__doc__.splitlines()[0])
    ap.add_argument("--caches", default="off,half", help="comma list of --cache values run in turn ('half': every "
                    "even step skipped); 'off' is always run first, as the reference")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guide-scale", type=float, default=4.5)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp8"],
                    help="fp8: FP8 block linears (exact attention), as --precision fp8 of runtime.generate")
    ap.add_argument("--cfg-parallel", action="store_true", help="under torchrun: each CFG branch on its own ranks")
    ap.add_argument("--ulysses", type=int, default=1, help="under torchrun: sequence-parallel ranks per branch")
    ap.add_argument("--vae-low-memory", default="auto", choices=["auto", "on", "off"],
                    help="the VAE's low-memory chunk form (a smaller decode peak, a slower decode; the same in every "
                         "row); auto: on where the GPU has less than 100 GiB (an 80 GB card)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny model")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    caches = ["off"] + [c for c in args.caches.split(",") if c and c != "off"]
    spec = {c: half_schedule(args.steps) if c == "half" else c for c in caches}

    if args.tiny:
        device = torch.device("cpu")
        layout = distributed.init(args.ulysses, args.cfg_parallel, device) if args.cfg_parallel or args.ulysses > 1 else None
        dit, vae = tiny.tiny_dit(torch.float32), tiny.tiny_vae()
        text, audio_enc = tiny.tiny_text_encoder(), tiny.tiny_audio_encoder()
        height, width, frames, backend = 64, 96, 16, "torch"
    else:
        from benchmarks.run import full_size_encoders
        from runtime.config import DiTConfig
        from runtime.models.dit import build_dit
        from runtime.models.vae import VAEConfig, WanVAE

        layout = distributed.init(args.ulysses, args.cfg_parallel) if args.cfg_parallel or args.ulysses > 1 else None
        device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(0)  # every rank builds the same random weights
        with torch.device(device):
            vae = WanVAE(VAEConfig.wan21()).eval().requires_grad_(False)
        text, audio_enc = full_size_encoders(device)
        dit = build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)
        height, width, frames, backend = 704, 1024, 80, "torch-graph"
    gpus = 1 if layout is None else torch.distributed.get_world_size()
    # UMT5 (10.6 GiB) on the host between its encodes, timed apart from the clip: with one graph pool at a time
    # (below) a resident batch-2 clip and its VAE decode then fit an 80 GB card as well as an H200.
    if args.vae_low_memory == "auto":
        args.vae_low_memory = "on" if small_gpu(device) else "off"
    pipe = S2VPipeline(dit, vae, text, audio_enc, device, backend=backend, name="tiny" if args.tiny else "random-14b",
                       attention=args.attention, parallel=layout, precision=None if args.tiny else args.precision,
                       move_text=not args.tiny, vae_low_memory=args.vae_low_memory == "on")
    variant = f"{pipe.backend_name}:{pipe.dit.attention_impl}"
    precision = "fp8" if pipe.dit.precision == "fp8" else str(pipe.dit.dtype).replace("torch.", "")
    print(f"variant {variant}, {precision}", flush=True)  # a missing kernel build shows in the first minute
    image = demo_image_at(height, width)
    speech = demo_speech(frames / 16 + 0.5)
    common = dict(prompt="a person talking to the camera", seed=0, infer_frames=frames, guide_scale=args.guide_scale,
                  sample_shift=args.shift, num_clip=1, size=f"{height}*{width}", start_from_ref=True)

    clock = StageClock(device)
    # The encoders (UMT5 moved in and out, wav2vec2) and the reference and motion VAE encodes run before the first
    # step; timed apart, they are not part of a later clip's denoise (its motion encode ends the previous clip).
    pipe.encode_audio = clock.wrap_encoder(pipe.encode_audio)
    pipe.encode_prompts = clock.wrap_encoder(pipe.encode_prompts)
    pipe.sampler._encode = clock.wrap_encoder(pipe.sampler._encode)
    graphs = getattr(pipe.backend, "graphs", None)
    if graphs is not None:  # a capture inside a timed clip (after an out-of-memory retry) is then in capture_s
        pipe.backend._capture = clock.wrap_capture(pipe.backend._capture)

    both_kinds = [c for c in caches if c not in ("off", "half")]
    if both_kinds and args.vae_low_memory == "on":
        print(f"WARNING: {', '.join(both_kinds)} replay plain and residual-recording graphs in one clip; on an 80 GB "
              "card both may not fit beside each other (a capture inside the clip then shows in capture_s)", flush=True)
    rows, ref, warmup_s = [], None, 0.0
    for c in caches:
        # One graph at a time (they share one pool, but each keeps its static inputs and outputs, GBs at batch 2):
        # this row's step kinds are captured just before it, outside its timing. "half" computes only
        # residual-recording steps.
        if graphs:
            pipe.backend.drop_graphs()
        t0 = time.perf_counter()
        if c == "off":
            pipe.generate(image, speech, sample_steps=1, **common)                     # plain steps
        elif c == "half":
            pipe.generate(image, speech, sample_steps=2, cache="steps:2", **common)    # residual + skipped steps
        else:
            pipe.generate(image, speech, sample_steps=3, cache="steps:2", **common)    # and a plain step
        warmup_s += time.perf_counter() - t0
        print(f"warm-up of the {c!r} row's step kinds (compilation, capture): {time.perf_counter() - t0:.1f} s",
              flush=True)
        clock.events.clear()
        clock.captures.clear()
        clock.encoders = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = clock.now()
        res = pipe.generate(image, speech, sample_steps=args.steps, progress=clock.progress, cache=spec[c], **common)
        st = clip_stages(clock, start, 1)[0]
        skipped = set(res.info["cache"]["clips"][0]["skipped"]) if "cache" in res.info else set()
        computed_s, skipped_s = step_times(clock, skipped)
        ref = res.frames if ref is None else ref
        denoise_s = st["denoise_s"] - clock.encoders
        row = {"variant": variant, "precision": precision, "cache": c if c != "half" else
               "half: every even step", "schedule": spec[c], "scenario": f"later-{height}x{width}-{frames}f", "gpus": gpus,
               "steps": args.steps, "guide_scale": args.guide_scale, "steps_computed": args.steps - len(skipped),
               "steps_skipped": len(skipped), "clip": "later", "clip_s": denoise_s + st["vae_decode_s"],
               "denoise_s": denoise_s, "vae_decode_s": st["vae_decode_s"], "encode_s": clock.encoders,
               "computed_step_s": computed_s, "skipped_step_s": skipped_s, "capture_s": st["capture_s"],
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
               "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None,
               "rel_l2": rel_l2(res.frames, ref), "psnr_db": finite(psnr(res.frames, ref))}
        row["speedup"] = (rows[0]["clip_s"] if rows else row["clip_s"]) / row["clip_s"]
        if st["capture_s"] > 0:
            print(f"WARNING: {st['capture_s']:.1f} s of graph capture inside the timed {c!r} clip (an out-of-memory "
                  "retry dropped a graph): its clip_s is not a replay-only time", flush=True)
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if distributed.is_main():  # after every row: a run cut off by a time limit keeps what it measured
            _write(args, rows, device, precision, height, width, frames, gpus, layout, warmup_s, t_start, argv,
                   done=len(rows) == len(caches))
    distributed.shutdown()
    return 0


def step_times(clock: StageClock, skipped: set[int]) -> tuple[float | None, float | None]:
    """Median time of a computed and of a skipped step (1-based step numbers), from the progress stamps: step k's
    time is the interval that ends at its stamp (step 1, which follows the encoders and prepare, is left out)."""
    den = [e[3] for e in clock.events if e[1] == "denoise"]
    times = {k + 2: b - a for k, (a, b) in enumerate(zip(den, den[1:]))}
    computed = [t for k, t in times.items() if k not in skipped]
    skip = [t for k, t in times.items() if k in skipped]
    return (median(computed) if computed else None), (median(skip) if skip else None)


def _write(args, rows, device, precision, height, width, frames, gpus, layout, warmup_s, t_start, argv, done):
    meta = {"device": device_description(device), "date": time.strftime("%Y-%m-%d %H:%M"), "git": code_revision(),
            "command": ("torchrun ... " if gpus > 1 else "") + "python -m benchmarks.step_cache "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "shapes": {"height": height, "width": width, "infer_frames": frames, "clip": "later (start_from_ref)"},
            "recipe": {"steps": args.steps, "guide_scale": args.guide_scale, "shift": args.shift, "solver": "unipc"},
            "dtype": f"DiT {precision}" + (" (FP8 block linears, bf16 activations and attention)" if precision == "fp8" else "")
                     + ", VAE float32", "layout": None if layout is None else
            {"cfg_parallel": args.cfg_parallel, "ulysses": args.ulysses},
            "weights": "random at the real configuration: rel_l2/psnr_db say nothing about quality on real weights",
            "warmup_s": warmup_s, "process_total_s": time.perf_counter() - t_start, "complete": done,
            "notes": "clip_s = denoise + VAE decode after a device sync at every progress event; denoise_s leaves out "
                     "the encoders and the reference/motion VAE encodes (encode_s); each row's step kinds are "
                     "compiled and captured just before it (one graph pool at a time); the uncached row and the "
                     "cached rows run in this process on the same weights and inputs",
            "vae": "low-memory chunk form" if args.vae_low_memory == "on" else "default",
            "umt5": None if args.tiny else "on the host, moved to the GPU while it encodes"}
    name = f"step_cache_{height}x{width}-{frames}f_{args.steps}steps_{precision}_{gpus}gpu.json"
    table = markdown_table(rows, COLUMNS)
    write_results(results_dir(args.out, device) / name, rows, meta, table)
    if done:
        print(table)


if __name__ == "__main__":
    raise SystemExit(main())
