"""``python -m runtime.quality --ckpt_dir DIR --image I --audio A [--precision fp8] [--lora L --test_steps 4 ...]``:
the same request as an exact reference (bf16, no LoRA, no cache, the official recipe unless the reference flags
say otherwise) and as a tested setting (precision, attention kernel, LoRAs, few-step recipe, step cache), same
seed, compared clip by clip.

Prints per clip: PSNR and SSIM of the decoded frames (uint8, as written to the MP4), the PSNR of the lower face
(where lip sync lives, and what a step cache harms first) and the rel-L2 of the final latents, so a lossy setting
can be checked on one's own checkpoint and inputs before it is used. The lower-face box is the lower half of the
largest face OpenCV's Haar detector finds in the reference image as the video frames it (``pip install
wan-s2v-trt[quality]``); without a detector or a face, the frame's central-lower third. The two pipelines are
loaded one after the other (the first is freed before the second loads).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from runtime.config import RUN
from runtime.demo import demo_image, demo_speech
from runtime.errors import S2VError
from runtime.media import load_image
from runtime.options import add_cache_args, add_pipeline_args, check_cache_args, check_pipeline_args
from runtime.pipeline import S2VPipeline
from runtime.preprocess import prepare_reference
from runtime.sampler import SampleOptions, latent_frames
from runtime.scheduler import parse_denoising_steps


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 frame stacks (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM (Wang et al. 2004: 11×11 Gaussian window, σ 1.5, K1 0.01, K2 0.03) over frames and channels of
    uint8 [T, H, W, 3] stacks."""
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2).reshape(-1, 1, *a.shape[1:3])
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2).reshape(-1, 1, *b.shape[1:3])
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5 ** 2))
    g = (g / g.sum())
    win = (g[:, None] * g[None, :])[None, None]
    f = lambda t: F.conv2d(t, win)  # noqa: E731  ("valid" window positions, as the reference implementation)
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx ** 2, f(y * y) - my ** 2, f(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())


def lower_face_box(image, height: int, width: int) -> tuple[tuple[int, int, int, int], str]:
    """(y0, y1, x0, x1) of the lower face in the video frame, and how it was found ("haar" or "central-lower
    third"). ``image``: the reference (a PIL image), framed as the pipeline frames it (``prepare_reference``)."""
    ref = prepare_reference(image, height, width)[0, :, 0]           # [3, H, W] in [-1, 1]
    grey = ((ref.mean(0) + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None and hasattr(cv2, "data"):
        detector = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
        side = max(24, min(height, width) // 10)
        faces = detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        if len(faces):
            x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
            return (int(y + h // 2), int(y + h), int(x), int(x + w)), "haar"
    return (height // 2, height * 5 // 6, width // 3, width * 2 // 3), "central-lower third"


def _run(args, precision: str, attention: str = "auto", loras=(), recipe: dict | None = None, cache=None,
         cache_calibration=None):
    """One generation; returns (frames uint8, per-clip latents, frames per clip)."""
    pipe = S2VPipeline.from_pretrained(args.ckpt_dir, device=args.device, backend=args.backend, precision=precision,
                                       attention=attention, loras=list(loras), t5_cpu=args.t5_cpu,
                                       offload_model=bool(args.offload_model), engines_dir=args.engines_dir)
    latents: list[torch.Tensor] = []
    decode = pipe.sampler._decode

    n = latent_frames(args.infer_frames)

    def keep(z):  # the sampler decodes each clip's latents (after its motion/reference head) once: record them
        latents.append(z[:, :, -n:].detach().float().cpu())
        return decode(z)

    pipe.sampler._decode = keep
    r = pipe.generate(args.image, args.audio, prompt=args.prompt, seed=args.seed, infer_frames=args.infer_frames,
                      num_clip=args.num_clip, size=args.size, progress=False, cache=cache,
                      cache_calibration=cache_calibration, **(recipe or reference_recipe(args)))
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return r.frames, latents, r.info


def reference_recipe(args) -> dict:
    return dict(sample_steps=args.sample_steps, guide_scale=args.sample_guide_scale, sample_shift=args.sample_shift,
                sample_solver=args.sample_solver)


def test_recipe(args) -> dict:
    """The tested run's recipe: each --test_* flag, else the reference's value."""
    ref = reference_recipe(args)
    out = {k: getattr(args, f"test_{k.replace('sample_', '')}") for k in ref}
    out = {k: (ref[k] if v is None else v) for k, v in out.items()}
    if args.test_denoising_steps is not None:
        out["denoising_steps"] = parse_denoising_steps(args.test_denoising_steps)
        if args.test_steps is None:
            out["sample_steps"] = len(out["denoising_steps"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.quality", description=__doc__.splitlines()[0])
    add_pipeline_args(ap, precision_help="the tested run's precision (default: fp8 when nothing else is tested, else "
                      "the reference's)", lora_help="merge this LoRA in the tested run only (repeatable)",
                      attention_help="the tested run's attention kernel (fp8 / fa3-fp8: FP8 attention); the reference "
                      "uses auto")
    ap.add_argument("--image", default=None)
    ap.add_argument("--audio", default=None)
    ap.add_argument("--prompt", default="a person talking to the camera")
    ap.add_argument("--reference", default="bf16", choices=["bf16", "fp16"], help="what it is compared with")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--infer_frames", type=int, default=80)
    ap.add_argument("--sample_steps", type=int, default=RUN.sample_steps, help="the reference's steps (official default)")
    ap.add_argument("--sample_guide_scale", type=float, default=RUN.guide_scale, help="the reference's CFG scale (official default)")
    ap.add_argument("--sample_shift", type=float, default=RUN.sample_shift, help="the reference's flow shift (official default)")
    ap.add_argument("--sample_solver", default="unipc", help="the reference's solver (official unipc)")
    ap.add_argument("--test_steps", type=int, default=None, help="the tested run's steps (default: the reference's)")
    ap.add_argument("--test_guide_scale", type=float, default=None, help="the tested run's CFG scale (e.g. 1)")
    ap.add_argument("--test_shift", type=float, default=None, help="the tested run's flow shift (e.g. 8)")
    ap.add_argument("--test_solver", default=None, help="the tested run's solver (unipc, dpm++, euler)")
    ap.add_argument("--test_denoising_steps", default=None, help="the tested run's euler timesteps, e.g. 1000,750,500,250")
    add_cache_args(ap, prefix="test_")
    ap.add_argument("--num_clip", type=int, default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)
    try:
        # refuse before loading anything (the reference run alone takes minutes)
        recipe = test_recipe(args)
        if args.precision is None:
            same = (not args.lora and recipe == reference_recipe(args) and args.attention == "auto"
                    and args.test_cache == "off")
            args.precision = "fp8" if same else args.reference
        check_pipeline_args(args)  # the tested run's device, backend, precision, attention kernel, LoRA files
        check_cache_args(args, prefix="test_")
        loras = args.loras

        for r in (reference_recipe(args), recipe):  # the recipes' values, checked as generate would
            SampleOptions(sample_steps=r["sample_steps"], sample_shift=r["sample_shift"], guide_scale=r["guide_scale"],
                          solver=r["sample_solver"], denoising_steps=r.get("denoising_steps"))
        if args.ckpt_dir == "tiny":
            args.image = args.image or demo_image()
            args.audio = args.audio or demo_speech()
        elif args.image is None or args.audio is None:
            raise S2VError("--image and --audio are required with a real checkpoint")
        ref_frames, ref_lat, info = _run(args, args.reference)
        test_frames, test_lat, test_info = _run(args, args.precision, args.attention, loras, recipe,
                                                args.test_cache_spec, args.test_cache_calibration)

        (y0, y1, x0, x1), box_source = lower_face_box(load_image(args.image), *info["size"])
    except S2VError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, start = [], 0
    for i, (lr, lt) in enumerate(zip(ref_lat, test_lat)):
        n = min(args.infer_frames - (3 if i == 0 and start == 0 else 0), ref_frames.shape[0] - start)
        if n <= 0:
            break
        a, b = ref_frames[start:start + n], test_frames[start:start + n]
        rows.append({"clip": i, "frames": n, "psnr_db": psnr(a, b), "ssim": ssim(a, b),
                     "lower_face_psnr_db": psnr(a[:, y0:y1, x0:x1], b[:, y0:y1, x0:x1]),
                     "latent_rel_l2": float((lt - lr).norm() / lr.norm())})
        start += n
    out = {"reference": args.reference, "precision": args.precision, "attention": args.attention, "seed": args.seed,
           "size": info["size"], "reference_recipe": reference_recipe(args), "test_recipe": recipe,
           "loras": [f"{x.path}:{x.strength:g}" for x in loras], "cache": test_info.get("cache"),
           "lower_face_box": {"y0": y0, "y1": y1, "x0": x0, "x1": x1, "found_by": box_source}, "clips": rows}
    if args.json:
        print(json.dumps(out))
    else:
        tested = ", ".join([args.precision, f"attention {args.attention}", *out["loras"],
                            *(f"{k}={v}" for k, v in recipe.items() if reference_recipe(args).get(k) != v),
                            *([f"cache {args.test_cache_spec}"] if args.test_cache_spec.enabled else [])])
        print(f"tested ({tested}) vs reference ({args.reference}, {reference_recipe(args)}), seed {args.seed}, "
              f"{info['size'][0]}x{info['size'][1]}")
        print(f"lower face: rows {y0}-{y1}, columns {x0}-{x1} ({box_source})")
        if out["cache"]:
            print("cache: " + "; ".join(f"clip {c['clip']} computed {c['computed']} steps" for c in out["cache"]["clips"]))
        print("clip  frames  PSNR dB   SSIM    face PSNR  latent rel-L2")
        for r in rows:
            print(f"{r['clip']:4d}  {r['frames']:6d}  {r['psnr_db']:7.2f}  {r['ssim']:.4f}  {r['lower_face_psnr_db']:9.2f}  "
                  f"{r['latent_rel_l2']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
