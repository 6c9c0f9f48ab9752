"""``S2VPipeline``: the embeddable entry point. Load once, call ``generate`` many times.

    from runtime import S2VPipeline
    pipe = S2VPipeline.from_pretrained("Wan2.2-S2V-14B")        # or "tiny"
    result = pipe.generate("face.jpg", "speech.wav", prompt="a person talking", seed=0)
    result.save("out.mp4")
"""
from __future__ import annotations

import inspect
import logging
import math
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from runtime import checkpoint as ck
from runtime import lora, media, memory_plan, offload as block_offload, tiny
from runtime.backends import CHOICES, make_backend, make_vae, resolve_backend
from runtime.cache import (CALIBRATION_NAME, CacheSpec, Calibration, StepCache, calibrate_command, model_identity,
                           recipe_of)
from runtime.checks import check_mp4_name, check_num_clip, check_size
from runtime.config import RUN, DiTConfig
from runtime.errors import BackendUnavailable, CheckpointError, ConfigError, InputError, OutputError
from runtime.kernels import fp8
from runtime.models.attention import unavailable_reason
from runtime.models.audio import Wav2Vec2Features, bucket_audio, interpolate_50_to_30
from runtime.models.dit import WanS2VDiT, load_dit
from runtime.models.text import TextEncoder, resolve_negative_prompt
from runtime.models.vae import load_vae
from runtime.offload import OffloadSpec
from runtime.parallel import CFGParallelDiT, shard_model
from runtime.preprocess import load_pose_video, prepare_reference, target_size
from runtime.sampler import S2VSampler, SampleOptions, check_finite

log = logging.getLogger(__name__)

FPS = 16
TINY = "tiny"
DEFAULT_SIZE = "1280*720"   # the official --size default (only its area is used)
TINY_SIZE = "64*64"


@dataclass
class S2VResult:
    """Frames exactly as they go into the MP4 (already trimmed to the audio, like ffmpeg ``-shortest``).

    ``frames`` is None when they were handed to ``generate(on_clip=...)`` instead (``info["frames"]`` counts them).
    """

    frames: np.ndarray | None     # uint8 [T, H, W, 3]
    fps: int
    audio: Any                    # runtime.media.AudioClip (waveform at 16 kHz + the original for muxing)
    seed: int
    info: dict = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return (self.info["frames"] if self.frames is None else self.frames.shape[0]) / self.fps

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        if self.frames is None:
            raise OutputError("this result's frames were streamed to on_clip and not kept; write them as they come "
                              "(S2VPipeline.generate_mp4 or runtime.media.Mp4Writer)")
        check_mp4_name(path)
        return media.write_mp4(path, self.frames, fps=self.fps, audio=self.audio, overwrite=overwrite)


def _arg(name: str, value, cli: bool) -> str:
    """How a message names an option: ``--name value`` for the CLI, ``name='value'`` for the library."""
    return f"--{name} {value}" if cli else f"{name}={value!r}"


def check_backend(backend: str, offload_model: bool = False, device: torch.device | None = None,
                  cli: bool = False, offload: OffloadSpec | None = None) -> None:
    if backend not in CHOICES:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of: {', '.join(CHOICES)}")
    if offload is not None and offload.enabled:
        check_offload(offload, backend, offload_model, cli)
    if offload_model and backend == "torch-graph":
        raise ConfigError("offload_model cannot be used with backend torch-graph (its CUDA graphs pin the DiT weights "
                          "on the GPU); use backend torch or torch-compile, or turn offloading off")
    if backend == "torch-graph" and device is not None and device.type != "cuda":
        raise BackendUnavailable(f"{_arg('backend', backend, cli)} replays CUDA graphs and needs a CUDA device, not "
                                 f"{device}; use {_arg('backend', 'auto', cli)} or torch")


def check_offload(spec: OffloadSpec, backend: str, offload_model: bool = False, cli: bool = False,
                  parallel=None) -> None:
    """Block offload with the other options: refused in one line where they cannot work together."""
    flag = _arg("offload", str(spec), cli)
    if offload_model:
        raise ConfigError(f"{flag} streams the DiT's blocks from host memory; {_arg('offload_model', True, cli)} "
                          "moves the whole DiT between clips: choose one")
    if backend == "torch-graph":
        raise ConfigError(f"{flag} cannot be used with backend torch-graph: CUDA graphs capture the weights' addresses "
                          "but not the copies that stream them; use backend torch-compile (auto picks it) or torch")
    if backend in ("onnxruntime", "tensorrt"):
        raise ConfigError(f"{flag} streams PyTorch blocks; backend {backend} runs an engine that holds its own "
                          "weights: use backend torch-compile or torch")
    if parallel is not None:
        raise ConfigError(f"{flag} runs on one GPU; drop it under torchrun (each rank holds the whole DiT)")


def plan_memory(path, device: torch.device, dtype: torch.dtype | None, precision: str | None, max_gpu_memory: float,
                size: str | None = None, frames: int = RUN.infer_frames, batch: int = 2, t5_cpu: bool = False,
                cli: bool = False, backend: str = "auto") -> memory_plan.Placement:
    """The least offloading that fits ``max_gpu_memory`` GiB at ``size`` (an ``H*W`` area; default the official
    1280*720, 64*64 for the tiny model), or one line saying why not. Reads only config files. ``backend``: what a
    resident DiT would run (torch-graph keeps its graphs' memory pool beside the other stages)."""
    tiny_model = str(path) == TINY
    area = size or (TINY_SIZE if tiny_model else DEFAULT_SIZE)
    check_size(area, "size", flag=cli)
    height, width = (int(v) for v in area.split("*"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = (memory_plan.ModelSizes.tiny(dtype) if tiny_model
             else memory_plan.ModelSizes.for_checkpoint(path, dtype, precision))
    shape = memory_plan.Shape(height, width, frames, batch)
    graphs = resolve_backend(backend, device) == "torch-graph"
    place = memory_plan.choose(sizes, shape, max_gpu_memory, text_cpu=t5_cpu,
                               name="--max_gpu_memory" if cli else "max_gpu_memory",
                               size_name="--size" if cli else "size", graphs=graphs)
    log.info("max_gpu_memory %g GiB at %s: %s", max_gpu_memory, area,
             memory_plan.describe(sizes, place, shape, graphs=graphs))
    return place


def _placement(offload: OffloadSpec, t5_cpu: bool, offload_model: bool) -> memory_plan.Placement:
    """The encoders' places that --t5_cpu and --offload_model choose (as the official flags do)."""
    text = "cpu" if t5_cpu else ("moved" if offload_model else "gpu")
    return memory_plan.Placement(offload, text, "cpu" if offload_model else "gpu")


def check_runnable(device: torch.device, precision: str | None, attention: str, cli: bool = False) -> None:
    """FP8 and a named attention kernel on ``device``: refused before any loading, with the reason."""
    if precision == "fp8":
        why = fp8.unsupported_reason(device)
        if why:
            raise ConfigError(why)
    if attention != "auto":
        why = unavailable_reason(attention, device)
        if why:
            raise BackendUnavailable(f"{_arg('attention', attention, cli)} cannot run here: {why}; use "
                                     f"{_arg('attention', 'auto', cli)} or sdpa")


def check_loras(loras, config) -> None:
    """Match the LoRA files' keys and shapes to a DiT of ``config`` (a meta-device model: no memory, no weights)."""
    if not loras:
        return
    with torch.device("meta"):
        model = WanS2VDiT(config)
    lora.check(loras, lora.checkpoint_shapes(model))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` that this PyTorch build can use, else one line naming the fix."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"device {spec!r} is not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"device {spec!r}: only cpu and cuda devices are supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "has no CUDA support" if torch.version.cuda is None else "sees no GPU"
        raise InputError(f"device {spec!r}: this PyTorch ({torch.__version__}) {build}; use cpu, or install a CUDA build of torch")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {spec!r}: only {torch.cuda.device_count()} GPU(s) visible; use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")
    return device


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3, T, H, W] in [−1, 1] → uint8 [T, H, W, 3]; truncation, as the official writer (255 only at 1.0)."""
    x = ((video.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().numpy()


def _layout_key(parallel) -> tuple[int, bool]:
    return (1, False) if parallel is None else (parallel.ulysses, parallel.cfg_parallel)


class S2VPipeline:
    def __init__(self, dit, vae, text_encoder, audio_encoder, device: torch.device, backend: str = "auto",
                 t5_cpu: bool = False, offload_model: bool = False, name: str = "", engines_dir: str = "engines",
                 attention: str = "auto", precision: str | None = None, parallel=None, loras=None,
                 offload: OffloadSpec | str | None = None, move_text: bool | None = None,
                 vae_low_memory: bool = False):
        """``offload``: ``"blocks"``/``"blocks:N"`` streams the DiT's blocks from host memory (``runtime.offload``);
        ``move_text``: UMT5 is held on the host and moved to the device while it encodes (default: with
        ``offload_model``, unless ``t5_cpu``); ``vae_low_memory``: the VAE's low-memory chunk form
        (``WanVAE.decode_low_memory``: eager, one latent per step, frames to the host) instead of the compiled one."""
        self.dit, self.vae, self.text_encoder, self.audio_encoder = dit, vae, text_encoder, audio_encoder
        self.device = device
        self.t5_cpu, self.offload_model = t5_cpu, offload_model
        self.move_text = (offload_model and not t5_cpu) if move_text is None else move_text
        self.name = name
        self.parallel = parallel  # runtime.parallel.Layout under torchrun, else None
        self.offload = OffloadSpec.parse(offload)
        check_backend(backend, offload_model, offload=self.offload)
        requested, backend = backend, resolve_backend(backend, device, offload_model)
        if self.offload.enabled:
            self.offload.check(dit.cfg.num_layers)
            if requested == "auto" and backend == "torch-graph":
                backend = "torch-compile"  # compiled blocks without a graph: the streamed weights change under it
            check_offload(self.offload, backend, parallel=parallel)
        self.backend_name = backend
        if vae_low_memory and backend in ("onnxruntime", "tensorrt"):
            raise ConfigError(f"the low-memory VAE runs the PyTorch VAE; backend {backend} runs its exported VAE graphs: "
                              "use backend torch-compile or torch, or a larger max_gpu_memory")
        vae.low_memory = bool(vae_low_memory)
        # LoRAs are merged into the weights first: before FP8 quantisation and before any compilation or capture
        # (with block offload: into the host copy, before it is pinned).
        self.loras = lora.as_specs(loras)
        lora.merge(dit, self.loras, round_dtype=dit.dtype, device=device if device.type == "cuda" else None)
        self.streamer = None
        if self.offload.enabled:
            if precision == "fp8":
                block_offload.quantize_on_host(dit, device)  # the host keeps e4m3 weights: fewer bytes to copy
            self.streamer = block_offload.attach(dit, device, self.offload)
        elif precision == "fp8":
            dit.set_precision("fp8")  # refuses (ConfigError) where FP8 does not run: never a silent fallback
        dit.set_attention(attention)
        if device.type == "cuda" and backend in ("torch-graph", "torch-compile") and not vae_low_memory:
            vae.optimize()  # compiled chunk steps over channels-last weights, 2 latents per step
        if parallel is not None:
            shard_model(dit, parallel)
        self._engines_dir = engines_dir
        self.backend = self._make_backend(parallel)
        # The official offload_model moves the DiT to the GPU for each clip's denoising only.
        # The engine backends run the VAE through its exported graphs too (the PyTorch VAE otherwise).
        sampler_vae = make_vae(backend, vae, engines_dir=engines_dir, checkpoint=name or None)
        self.sampler = S2VSampler(self.backend, sampler_vae, device, offload=offload_model)
        self._layouts = {_layout_key(parallel): self.backend}   # a backend per layout used (use_layout)
        if offload_model:
            self.sampler.move_dit("cpu")
        self._lock = threading.Lock()
        self._identity: dict | None = None

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | Path = TINY, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, backend: str = "auto", t5_cpu: bool = False,
                        offload_model: bool = False, engines_dir: str = "engines", attention: str = "auto",
                        precision: str | None = None, parallel=None, loras=None, offload: str | None = None,
                        max_gpu_memory: float | None = None, fit_size: str | None = None,
                        fit_frames: int = RUN.infer_frames, fit_batch: int = 2) -> "S2VPipeline":
        """Load the official ``Wan2.2-S2V-14B/`` folder unchanged, or ``"tiny"`` (built-in random toy model).

        dtype: DiT parameter dtype (default bf16 on CUDA, float32 on CPU). The VAE runs in float32, wav2vec2
        in float32, UMT5 in bf16 (float32 on CPU), as the official pipeline. backend: auto (torch-graph on CUDA,
        torch on the CPU or with offload_model), torch, torch-compile, torch-graph, onnxruntime or tensorrt (the last
        two read ``engines_dir`` written by ``export.build``).
        attention: self-attention kernel (``runtime.models.attention.CHOICES``; auto = the fastest exact one here).
        precision: None/"bf16"/"fp16" (the DiT dtype) or "fp8" (FP8 block linears on Hopper+, refused elsewhere;
        attention stays bf16 unless an FP8 kernel is named). parallel: the
        ``runtime.parallel.init(...)`` layout when running under torchrun (CFG parallel / Ulysses).
        loras: ``[(path, strength), ...]`` (or paths, strength 1) of LoRA ``.safetensors`` files merged into the DiT
        weights at load (``runtime.lora``); their keys and shapes are checked before the weights load.
        offload: ``"blocks"`` (every DiT block streamed from host memory, each copied one block ahead of its use) or
        ``"blocks:N"`` (the first N blocks kept on the GPU); None/``"none"``: everything resident (docs/memory.md).
        max_gpu_memory: GiB to fit in: the least offloading (resident blocks, encoders' places, the VAE's form) whose
        every stage fits ``fit_size`` (an ``H*W`` area), ``fit_frames`` per clip and DiT batch ``fit_batch`` (2: CFG
        batched) is chosen from ``runtime.memory_plan``, and refused before loading when even full offload cannot fit.
        """
        if precision in ("bf16", "fp16", "fp8") and dtype is None:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16

        loras = lora.as_specs(loras)
        spec = OffloadSpec.parse(offload)
        device = resolve_device(device)
        check_backend(backend, offload_model, device, offload=spec)  # before minutes of loading
        check_runnable(device, precision, attention)
        if max_gpu_memory is not None:
            if spec.enabled or offload_model:
                raise ConfigError("max_gpu_memory chooses the offloading itself; drop offload/offload_model, or "
                                  "drop max_gpu_memory to fix the offloading by hand")
            place = plan_memory(path, device, dtype, precision, max_gpu_memory, fit_size, fit_frames, fit_batch,
                                t5_cpu, backend=backend)
            spec = place.offload
            if spec.enabled:
                check_backend(backend, False, device, offload=spec)
        else:
            place = _placement(spec, t5_cpu, offload_model)
        extra = dict(attention=attention, precision=precision, parallel=parallel, loras=loras, offload=spec,
                     move_text=place.text == "moved", vae_low_memory=place.vae == "low_memory")
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        if str(path) == TINY:
            check_loras(loras, DiTConfig.tiny())
            spec.check(DiTConfig.tiny().num_layers)
            t5_dev = device if place.text == "gpu" else "cpu"
            dit_dev = "cpu" if spec.enabled else device  # streamed blocks stay on the host
            return cls(tiny.tiny_dit(dtype, dit_dev), tiny.tiny_vae(device), tiny.tiny_text_encoder(t5_dev),
                       tiny.tiny_audio_encoder(device if place.audio == "gpu" else "cpu"), device, backend, t5_cpu,
                       offload_model, name=TINY, engines_dir=engines_dir, **extra)
        return cls._from_folder(Path(path), device, dtype, backend, t5_cpu, offload_model, engines_dir, extra, place)

    @classmethod
    def _from_folder(cls, folder: Path, device, dtype, backend, t5_cpu, offload_model, engines_dir,
                     extra: dict, place: memory_plan.Placement) -> "S2VPipeline":
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: checkpoint folder not found; pass the Wan2.2-S2V-14B folder (CLI: --ckpt_dir) "
                                  "(or 'tiny' for the built-in test model)")
        for rel in (ck.DIT_CONFIG, ck.VAE_FILE, ck.T5_FILE, ck.T5_TOKENIZER, ck.WAV2VEC_DIR):
            if not (folder / rel).exists():
                raise CheckpointError(f"{folder / rel}: missing from the checkpoint folder; download the complete "
                                      "Wan2.2-S2V-14B folder")
        ck.check_folder(folder)  # every file read stays inside the folder; before anything loads
        # config.json is validated before anything is loaded: a damaged one must not cost a UMT5/VAE load first.
        config = DiTConfig.from_json(folder / ck.DIT_CONFIG)
        check_loras(extra["loras"], config)  # key names and shapes from the headers, before any weights load
        place.offload.check(config.num_layers)
        t5_dtype = torch.bfloat16 if device.type == "cuda" and not t5_cpu else torch.float32
        t5_dev = device if place.text == "gpu" else "cpu"
        text = TextEncoder.from_checkpoint(folder, device=t5_dev, dtype=t5_dtype if t5_dev != "cpu" else torch.bfloat16)
        audio = Wav2Vec2Features.from_checkpoint(folder, device=device if place.audio == "gpu" else "cpu")
        vae = load_vae(folder / ck.VAE_FILE, device=device)
        # with block offload the DiT loads into host memory; its non-block parts and resident blocks move later
        dit = load_dit(folder, dtype=dtype, device="cpu" if place.offload.enabled else device, config=config)
        return cls(dit, vae, text, audio, device, backend, t5_cpu, offload_model, name=str(folder), engines_dir=engines_dir,
                   **extra)

    # ----------------------------------------------------------------- step caches
    def model_identity(self) -> dict:
        """What a step-cache calibration is tied to (``runtime.cache.model_identity``), computed once."""
        if self._identity is None:
            self._identity = model_identity(self.name, self.loras)
        return self._identity

    def default_calibration(self) -> Path | None:
        """Where ``runtime.calibrate`` writes by default: beside the checkpoint's config.json (None for the
        built-in tiny model, which has no folder)."""
        folder = Path(self.name) if self.name and self.name != TINY else None
        return folder / CALIBRATION_NAME if folder is not None and folder.is_dir() else None

    def step_cache(self, cache, calibration: str | Path | None = None):
        """``cache`` (a ``--cache`` string, ``CacheSpec``, ``StepCache`` or None) → a ``StepCache`` or None. Refused
        here, before any work: a backend without step caches (the engines compute whole steps), magcache
        without a calibration file."""
        if isinstance(cache, StepCache):
            step_cache = cache
        else:
            spec = CacheSpec.parse(cache)
            if not spec.enabled:
                return None
            cal = None
            if spec.method == "magcache":
                path = Path(calibration) if calibration is not None else self.default_calibration()
                if path is None:
                    raise ConfigError("cache magcache with the tiny model needs cache_calibration=FILE (CLI: "
                                      "--cache_calibration), made by python -m runtime.calibrate --out FILE")
                cal = Calibration.load(path)
            step_cache = StepCache(spec, cal)
        if not getattr(self.backend, "caches", False):
            raise ConfigError(f"step caches need a PyTorch backend (torch, torch-compile or torch-graph); backend "
                              f"{self.backend.name} runs whole steps in an engine: drop the cache or change backend")
        return step_cache

    # ----------------------------------------------------------------- encoders
    def encode_prompts(self, prompt: str, negative_prompt: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.text_encoder
        moved = self.move_text and self.device.type == "cuda"
        if moved:
            enc.model.to(self.device)
        try:
            # one call per prompt, as official (batching could change the last bf16 bit)
            context = enc.encode([prompt])[0]
            context_null = enc.encode([resolve_negative_prompt(negative_prompt)])[0]
        finally:
            if moved:
                enc.model.to("cpu")
        return context.to(self.device), context_null.to(self.device)

    def encode_audio(self, clip, infer_frames: int) -> tuple[torch.Tensor, int]:
        """AudioClip → ([1, layers, C, clips·infer_frames] features, official clip count)."""
        feats = self.audio_encoder(clip.samples)                       # [layers, T50, C]
        buckets, clips = bucket_audio(interpolate_50_to_30(feats.float()), fps=FPS, batch_frames=infer_frames)
        return buckets.permute(1, 2, 0).unsqueeze(0), clips            # [1, layers, C, frames]

    # ----------------------------------------------------------------- generate
    def generate(self, image, audio, prompt: str = "", seed: int = 0, infer_frames: int = 80, sample_steps: int | None = None,
                 num_clip: int | None = None, pose_video: str | Path | bytes | None = None, size: str | None = None,
                 sample_shift: float = RUN.sample_shift, guide_scale: float = RUN.guide_scale, sample_solver: str = RUN.solver,
                 negative_prompt: str = "", start_from_ref: bool = False, batch_cfg: bool = True,
                 progress: bool | Callable[..., None] | None = None,
                 max_audio_s: float | None = 600.0, on_clip: Callable[[np.ndarray], None] | None = None,
                 denoising_steps: tuple[int, ...] | list[int] | None = None, cache=None,
                 cache_calibration: str | Path | None = None) -> S2VResult:
        """Reference image + audio (+ prompt, pose video) → S2VResult. Thread-safe: calls are serialized.

        sample_steps None = 40 (official), or one per ``denoising_steps`` entry: the timesteps of the ``euler``
        solver (LightX2V's distill schedule, e.g. (1000, 750, 500, 250); default evenly spaced from 1000).
        guide_scale ≤ 1 turns CFG off (one DiT call per step), as official.

        image: path, bytes, numpy array or PIL image; audio: path, bytes, AudioClip or (array, rate); pose_video:
        path or bytes. seed -1 picks a random seed (logged, and returned as ``result.seed``). num_clip None = as
        many clips as the audio needs (official rule); clips whose frames would all be cut by the audio length are
        not rendered. batch_cfg False runs cond and uncond as two DiT calls per step (as the official; same math).
        progress: None/True = tqdm bars, False = silent, or a callable ``(clip, clips, step, steps, stage)`` called
        after each denoising step (stage "denoise") and each VAE decode / motion encode ("vae_decode",
        "vae_encode", step = steps = 1); a callable taking only the first four gets the denoising steps.
        max_audio_s: longer audio is refused before it is decoded (None: no limit; the whole audio always goes
        through wav2vec2, as official, even when num_clip uses only part of it).
        on_clip: called with each clip's uint8 frames [n, H, W, 3] (already trimmed to the audio) as soon as it is
        decoded; nothing is kept, so memory stays flat in the audio length, and the result's ``frames`` is None.
        An exception raised by ``progress`` or ``on_clip`` stops the generation.
        cache: a step cache (``runtime.cache``: ``"magcache"``, ``"easy:0.05"``, ``"steps:10,12"``, …; None or
        ``"off"``: every step computed, the exact result); lossy, so logged per clip and reported in
        ``result.info["cache"]``. magcache reads ``cache_calibration`` (default: the file ``runtime.calibrate``
        writes beside the checkpoint) and refuses one made for another checkpoint or recipe.
        """
        if isinstance(seed, int) and not isinstance(seed, bool) and seed == -1:
            seed = random.randint(0, 2**31 - 1)
            log.info("seed %d (picked at random; pass seed=%d to repeat this video)", seed, seed)
        if denoising_steps is not None:
            denoising_steps = tuple(denoising_steps)
        if sample_steps is None:
            sample_steps = len(denoising_steps) if denoising_steps else 40
        opts = SampleOptions(infer_frames=infer_frames, sample_steps=sample_steps, sample_shift=sample_shift,
                             guide_scale=guide_scale, solver=sample_solver, seed=seed, start_from_ref=start_from_ref,
                             batch_cfg=bool(batch_cfg), denoising_steps=denoising_steps)
        if self.parallel is not None and self.parallel.cfg_parallel and not guide_scale > 1:
            raise InputError(f"guide_scale={guide_scale} turns CFG off, so CFG parallel has nothing to split; run "
                             "without cfg_parallel (use Ulysses sequence parallelism to spread one branch over GPUs)")
        if num_clip is not None:
            check_num_clip(num_clip)
        step_cache = self.step_cache(cache, cache_calibration)
        area = check_size(size or (TINY_SIZE if self.name == TINY else DEFAULT_SIZE))
        img = media.load_image(image)
        clip = _load_audio(audio, max_audio_s)

        with self._lock, torch.no_grad():
            height, width = target_size(img.height, img.width, area)
            if step_cache is not None and step_cache.calibration is not None:
                self._check_calibration(step_cache.calibration, opts, (height, width))
            ref = prepare_reference(img, height, width)
            audio_emb, official_clips = self.encode_audio(clip, infer_frames)
            check_finite(audio_emb, "wav2vec2 audio encoder", limit=math.inf)  # its features have large outliers
            clips = official_clips if num_clip is None else min(num_clip, official_clips)
            keep = int(np.floor(clip.native_duration_s * FPS + 1e-9))   # frames that survive the mux
            drop = 0 if start_from_ref else 3
            while clips > 1 and (clips - 1) * infer_frames - drop >= keep:
                clips -= 1                                              # fully cut by -shortest: skip the work
            context, context_null = self.encode_prompts(prompt, negative_prompt)
            for c in (context, context_null):
                check_finite(c, "UMT5 text encoder", limit=math.inf)
            pose = None if pose_video is None else _load_pose(pose_video, clips, infer_frames, height, width, keep)
            sink = None if on_clip is None else _FrameSink(on_clip, max(keep, 1))
            with _progress(progress, clips, sample_steps) as cb:
                video = self.sampler.sample(ref, context, context_null, audio_emb, clips, opts, pose_pixels=pose, progress=cb,
                                            on_clip=sink, cache=step_cache)
        frames = video_to_uint8(video)[:max(keep, 1)] if sink is None else None
        info = {"size": (height, width), "clips": clips, "official_clips": official_clips, "steps": sample_steps,
                "backend": self.backend.name, "dtype": str(self.dit.dtype), "seed": seed, "offload": str(self.offload),
                "frames": frames.shape[0] if sink is None else sink.sent}
        if step_cache is not None:
            info["cache"] = {"method": str(step_cache.spec), "clips": step_cache.log[-clips:]}
        return S2VResult(frames, FPS, clip, seed, info)

    def _check_calibration(self, cal, opts, size: tuple[int, int]) -> None:
        cal.check(self.model_identity(), recipe_of(opts, size), cal.path,
                  calibrate_command(self.name, opts, size, self.loras))

    def _make_backend(self, parallel):
        """The DiT backend for a ``runtime.parallel`` layout (None: one process): the CFG split wraps it."""
        backend = make_backend(self.backend_name, self.dit, engines_dir=self._engines_dir,
                               checkpoint=self.name or None, loras=self.loras)
        return CFGParallelDiT(backend, parallel) if parallel is not None and parallel.cfg_parallel else backend

    def use_layout(self, parallel) -> None:
        """Run the next requests in another ``runtime.parallel`` layout of the same ranks (None: unsharded, no CFG
        split), as a multi-GPU server worker does per job. Each layout keeps a backend of its own: a CUDA-graph
        backend keys its graphs by input shape, and a sharded and an unsharded step of one shape differ."""
        key = _layout_key(parallel)
        backend = self._layouts.get(key)
        if backend is None:
            backend = self._layouts[key] = self._make_backend(parallel)
        if parallel is not None and parallel.ulysses > 1:
            shard_model(self.dit, parallel)
        else:
            self.dit.set_sequence_shard(None)
        self.parallel = parallel
        self.backend = self.sampler.backend = backend

    def generate_mp4(self, path: str | Path, image, audio, *, overwrite: bool = False, **kwargs) -> S2VResult:
        """``generate`` straight into an MP4: each clip is encoded as soon as it is decoded (audio muxed and trimmed
        as :meth:`S2VResult.save`), written to a temp file renamed to ``path`` at the end; on any error or interrupt
        nothing is left behind. ``path`` is checked before any work. Returns the result with ``frames`` None."""
        check_mp4_name(path)
        clip = _load_audio(audio, kwargs.get("max_audio_s", 600.0))
        with media.Mp4Writer(path, fps=FPS, audio=clip, overwrite=overwrite) as writer:
            result = self.generate(image, clip, on_clip=writer.write, **kwargs)
        return result


def _load_audio(audio, max_audio_s: float | None):
    if isinstance(audio, tuple):
        return media.load_audio(audio[0], src_rate=audio[1], max_seconds=max_audio_s)
    return media.load_audio(audio, max_seconds=max_audio_s)


class _FrameSink:
    """Sampler clips → uint8 frames for the caller, trimmed to the frames that survive the mux."""

    def __init__(self, fn: Callable[[np.ndarray], None], limit: int):
        self.fn, self.limit, self.sent = fn, limit, 0

    def __call__(self, video: torch.Tensor) -> None:
        frames = video_to_uint8(video)[:self.limit - self.sent]
        if len(frames):
            self.sent += len(frames)
            self.fn(frames)


def _load_pose(src, clips: int, infer_frames: int, height: int, width: int, audio_frames: int) -> torch.Tensor:
    if not isinstance(src, (str, os.PathLike, bytes, bytearray, memoryview)):
        raise InputError(f"pose_video of type {type(src).__name__}; pass a path or the bytes of a video file")
    return load_pose_video(src, clips, infer_frames, height, width, FPS, needed=audio_frames)


def _accepts_stage(fn) -> bool:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature: assume the current form
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 5


class _progress:
    """tqdm bars per clip (default), nothing (False), or a user callback."""

    def __init__(self, progress, clips: int, steps: int):
        self.progress, self.clips, self.steps, self.bar = progress, clips, steps, None

    def __enter__(self):
        if callable(self.progress):
            if _accepts_stage(self.progress):
                return self.progress
            user = self.progress  # the older (clip, clips, step, steps) form: denoising steps only
            return lambda clip, clips, step, steps, stage: user(clip, clips, step, steps) if stage == "denoise" else None
        if self.progress is False:
            return None
        from tqdm.auto import tqdm

        def cb(clip, clips, step, steps, stage):
            if stage != "denoise":
                if self.bar is not None:
                    self.bar.set_postfix_str(f"{stage} done")
                return
            if self.bar is None or step == 1:
                if self.bar is not None:
                    self.bar.close()
                self.bar = tqdm(total=steps, desc=f"clip {clip + 1}/{clips}", unit="step", leave=True)
            self.bar.update(1)

        return cb

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
