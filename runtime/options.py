"""The command-line options every tool shares (``runtime.generate``, ``runtime.serve``, ``runtime.quality``): one
definition, one meaning, and one check of each before anything loads.

    p = argparse.ArgumentParser(...)
    add_pipeline_args(p)
    args = p.parse_args()
    check_pipeline_args(args)                       # refusals that would otherwise come after a model load
    pipe = S2VPipeline.from_pretrained(args.ckpt_dir, **pipeline_kwargs(args))

Torch-free at import: ``runtime.generate`` imports this module before its signal handlers are installed, so the
imports that load torch (the attention choices, the pipeline's checks, LoRA headers, the cache specs) are made
inside the functions that need them, which run after the handlers are in place.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from runtime.errors import ConfigError, InputError

BACKEND_HELP = ("DiT backend: auto (torch-graph on CUDA: compiled blocks replayed as a CUDA graph; torch on the CPU or "
                "with --offload_model), torch, torch-compile, torch-graph, onnxruntime, tensorrt")


def str2bool(v: str) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {v!r}")


def add_pipeline_args(p: argparse.ArgumentParser, precision_help: str | None = None,
                      lora_help: str | None = None, attention_help: str | None = None) -> None:
    """``--ckpt_dir --device --backend --attention --precision --lora --offload_model --offload --max_gpu_memory
    --t5_cpu --engines_dir``."""
    from runtime.models.attention import CHOICES as ATTENTION_CHOICES
    from runtime.offload import OFFLOAD_HELP

    p.add_argument("--ckpt_dir", default="tiny", help="the Wan2.2-S2V-14B folder, or 'tiny' for the built-in toy model")
    p.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    p.add_argument("--backend", default="auto", help=BACKEND_HELP)
    p.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES, help=attention_help or (
        "self-attention kernel. auto: the fastest exact kernel installed for this GPU (Hopper: FlashAttention-3 where "
        "built, else FlashAttention-4, else PyTorch SDPA; elsewhere SDPA). fp8 (cuDNN) and fa3-fp8 (FlashAttention-3) "
        "quantise q/k/v to FP8 (faster, lossy): only when named; check them with python -m runtime.quality"))
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp8"], help=precision_help or (
        "DiT precision (default bf16 on CUDA, fp32 on the CPU); fp8 (Hopper or newer): the self-attention qkv/o and "
        "FFN linears in FP8, attention as --attention says (lossy: check it with python -m runtime.quality)"))
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]", help=lora_help or (
        "merge a LoRA .safetensors into the DiT at load (repeatable; strength default 1.0), e.g. a few-step distill "
        "LoRA with --sample_steps 4 --sample_guide_scale 1 --sample_shift 8"))
    p.add_argument("--offload_model", type=str2bool, nargs="?", const=True, default=None,
                   help="move the DiT to the CPU between clips and keep UMT5/wav2vec2 on the CPU between uses, to save "
                        "GPU memory (default false: everything resident; the official default is true on one GPU)")
    p.add_argument("--offload", default=None, metavar="blocks[:N]", help=OFFLOAD_HELP + " (docs/memory.md)")
    p.add_argument("--max_gpu_memory", type=float, default=None, metavar="GIB",
                   help="fit the run in this many GiB of GPU memory: the least offloading (blocks kept on the GPU, "
                        "encoders on the CPU) that fits --size and --infer_frames is chosen; refused before loading "
                        "when even full offloading cannot fit, naming the largest size that would (docs/memory.md)")
    p.add_argument("--t5_cpu", action="store_true", default=False, help="run UMT5 on the CPU")
    p.add_argument("--engines_dir", default="engines", help="where export.build wrote ONNX graphs and engines")


def check_pipeline_args(args) -> None:
    """What can be refused before a model loads: the device, the backend on it, FP8 and a named attention kernel
    on it, the LoRA files (readable safetensors; their keys are matched before the weights load). Sets
    ``args.loras`` (``runtime.lora.LoraSpec`` list)."""
    from runtime import lora
    from runtime.offload import OffloadSpec
    from runtime.pipeline import check_backend, check_runnable, plan_memory, resolve_device

    try:
        device = resolve_device(args.device)
    except InputError as err:
        raise InputError(f"--{err}") from None  # "device 'x': ..." becomes "--device 'x': ..."
    offload = getattr(args, "offload", None)
    args.offload_spec = OffloadSpec.parse(offload, "--offload")
    check_backend(args.backend, bool(args.offload_model), device, cli=True,  # the library's checks, in flags' words
                  offload=args.offload_spec)
    check_runnable(device, args.precision, args.attention, cli=True)
    if getattr(args, "max_gpu_memory", None) is not None:
        if offload is not None or args.offload_model:
            raise ConfigError("--max_gpu_memory chooses the offloading itself; drop --offload/--offload_model, or drop "
                              "--max_gpu_memory to fix the offloading by hand")
        place = plan_memory(args.ckpt_dir, device, None, args.precision, args.max_gpu_memory, *_fit(args),
                            t5_cpu=args.t5_cpu, cli=True, backend=args.backend)
        if place.offload.enabled:
            check_backend(args.backend, False, device, cli=True, offload=place.offload)
    args.loras = [lora.LoraSpec.parse(s) for s in args.lora]
    for spec in args.loras:
        lora.read_header(spec.path)


def _fit(args) -> tuple:
    """What ``--max_gpu_memory`` must fit: (``--size``, ``--infer_frames``, DiT batch: 2 with CFG batched, else 1),
    from the tool's own flags where it has them."""
    from runtime.config import RUN

    guide = getattr(args, "sample_guide_scale", None)
    cfg = (RUN.guide_scale if guide is None else guide) > 1
    batch = 2 if cfg and not getattr(args, "no_batch_cfg", False) else 1
    return getattr(args, "size", None), getattr(args, "infer_frames", None) or RUN.infer_frames, batch


def pipeline_kwargs(args) -> dict:
    """``S2VPipeline.from_pretrained`` keyword arguments from the shared options (after ``check_pipeline_args``)."""
    kwargs = dict(device=args.device, backend=args.backend, attention=args.attention, precision=args.precision,
                  loras=getattr(args, "loras", None), offload_model=bool(args.offload_model), t5_cpu=args.t5_cpu,
                  engines_dir=args.engines_dir, offload=getattr(args, "offload", None))
    if getattr(args, "max_gpu_memory", None) is not None:
        size, frames, batch = _fit(args)
        kwargs.update(max_gpu_memory=args.max_gpu_memory, fit_size=size, fit_frames=frames, fit_batch=batch)
    return kwargs


def add_cache_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--cache`` and ``--cache_calibration`` (``prefix`` "test_" for runtime.quality's tested run)."""
    from runtime.cache import CACHE_HELP

    p.add_argument(f"--{prefix}cache", default="off", metavar="METHOD[:ARGS]", help=CACHE_HELP)
    p.add_argument(f"--{prefix}cache_calibration", default=None, metavar="FILE",
                   help="magcache's calibration (default: the file python -m runtime.calibrate writes beside the "
                        "checkpoint)")


def check_cache_args(args, prefix: str = "") -> None:
    """Before anything loads: the spec parses, the backend can skip blocks, and magcache's calibration file is
    there and readable (its model and recipe are compared once the request's size is known). Sets
    ``args.<prefix>cache_spec`` and ``args.<prefix>calibration`` (a ``runtime.cache.Calibration`` or None)."""
    from runtime.cache import CALIBRATION_NAME, Calibration, CacheSpec

    spec = CacheSpec.parse(getattr(args, f"{prefix}cache"))
    cal = None
    if spec.enabled and args.backend in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"--{prefix}cache needs a PyTorch backend (torch, torch-compile, torch-graph or auto); "
                          f"--backend {args.backend} runs whole steps in an engine")
    given = getattr(args, f"{prefix}cache_calibration")
    if spec.method == "magcache":
        if given is None and args.ckpt_dir == "tiny":
            raise ConfigError(f"--{prefix}cache magcache with --ckpt_dir tiny needs --{prefix}cache_calibration FILE "
                              "(made by python -m runtime.calibrate --out FILE)")
        cal = Calibration.load(Path(given) if given else Path(args.ckpt_dir) / CALIBRATION_NAME)
    elif given is not None:
        raise ConfigError(f"--{prefix}cache_calibration is read by --{prefix}cache magcache only (this run: {spec})")
    setattr(args, f"{prefix}cache_spec", spec)
    setattr(args, f"{prefix}calibration", cal)
