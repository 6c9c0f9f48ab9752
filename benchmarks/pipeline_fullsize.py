"""End-to-end ``S2VPipeline.generate`` at the real sizes with random weights (14B DiT, Wan2.1 VAE, UMT5-XXL,
wav2vec2-large): the whole request path on the GPU, timed, with peak memory.

    python -m benchmarks.pipeline_fullsize --backend torch-graph --steps 2 --seconds 3 --out DIR

The meta holds the command, git revision, date, dtypes, size and steps, as ``benchmarks.run`` writes them.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import code_revision, device_description, device_slug, markdown_table, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch-graph")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0, help="audio length (3 s = one clip)")
    ap.add_argument("--size", default="1024*704")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    torch.set_grad_enabled(False)
    from benchmarks.run import full_size_encoders
    from runtime.config import DiTConfig
    from runtime.demo import demo_image, demo_speech
    from runtime.models.dit import build_dit
    from runtime.models.vae import VAEConfig, WanVAE
    from runtime.pipeline import S2VPipeline

    t0 = time.perf_counter()
    dit = build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)
    with torch.device(device):
        vae = WanVAE(VAEConfig.wan21()).eval().requires_grad_(False)
    text, audio = full_size_encoders(device)
    pipe = S2VPipeline(dit, vae, text, audio, device, backend=args.backend, name="random-14b")
    load_s = time.perf_counter() - t0
    img = demo_image(1024).resize((704, 1024))  # portrait 704 wide × 1024 high → target 1024×704
    rows = []
    for run in ("first request (includes compile/capture)", "second request"):
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = pipe.generate(img, demo_speech(args.seconds), prompt="a person talking", seed=0, sample_steps=args.steps,
                            size=args.size, progress=False)
        torch.cuda.synchronize()
        rows.append({"device": device_slug(device), "variant": args.backend, "run": run, "steps": args.steps,
                     "seconds": time.perf_counter() - t0, "frames": int(res.frames.shape[0]),
                     "size": "x".join(map(str, res.info["size"])), "clips": res.info["clips"],
                     "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30})
        print(rows[-1], flush=True)
    res.save(args.out / "fullsize_random.mp4", overwrite=True)
    meta = {"device": device_description(device), "load_s": round(load_s, 1), "git": code_revision(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "dtype": "DiT bf16, VAE float32 (TF32 convolutions), UMT5 and wav2vec2 as S2VPipeline loads them",
            "shapes": {"size": args.size, "audio_s": args.seconds}, "steps": args.steps, "backend": args.backend,
            "command": "python -m benchmarks.pipeline_fullsize " + " ".join(argv or __import__("sys").argv[1:]),
            "note": "random weights: the video is noise; this checks the request path at the real sizes"}
    table = markdown_table(rows, ["device", "variant", "run", "steps", "seconds", "frames", "size", "clips", "peak_mem_gib"])
    write_results(args.out / "pipeline_fullsize.json", rows, meta, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
