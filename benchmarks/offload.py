"""``python -m benchmarks.offload``: a later clip at 704×1024×80 with the DiT's blocks streamed from host memory
(``--offload blocks[:N]``) under a capped allocator, beside the fully resident run of the same process.

Random 14B weights (the same seed in every row), the encoders on the CPU in every row (the rows compare the DiT's
placement; the plan's encoder choice is reported, not applied). Per precision (bf16, fp8) and recipe (few-step: 4
steps, no CFG, shift 8; official: ``--official-steps`` of the 40-step CFG recipe, projected to 40 when fewer), one
resident row (``offload: "none"``, torch-graph, no cap; the low-memory VAE on a card under 100 GiB) and one row
per ``--caps`` entry: the allocator capped with ``torch.cuda.set_per_process_memory_fraction``, the placement
chosen by ``runtime.memory_plan`` for that cap (blocks kept resident and the VAE form; where CFG's batch of 2
cannot fit, the official recipe runs its two branches one after the other, ``batch_cfg: false``, as the plan's
refusal advises; where nothing fits, the most offloaded placement, with the refusal noted), backend torch-compile.
A capped row that runs out of memory keeps the peaks measured up to then and is run once more with the most
offloaded placement. Rows run in order of what issue 27 asks first: per precision (bf16, then fp8) the resident
and 24 GiB rows of both recipes, then 32 and 48 GiB.

Per row: ``peak_gib`` (max allocated over the clip) and the per-stage peaks (motion encode, denoise, VAE decode),
``clip_s`` (denoise + decode after a device sync at each progress event; the motion VAE encode, which a real run
does at the end of the previous clip, is timed apart as ``vae_encode_s``), ``slowdown`` against the resident row of
the same recipe and precision, the measured pinned host→device bandwidth and the clip time projected for PCIe 4
(25 GB/s) from the bytes streamed per step, assuming the copies overlap compute as they do here. The stage peaks
minus the resident weights are what ``runtime.memory_plan.ActivationModel`` is to be fitted to.

    python -m benchmarks.offload --out DIR                  # one H100/H200
    python -m benchmarks.offload --tiny --out /tmp/o        # CPU dry run on the tiny model
    python -m benchmarks.offload --vae-live                 # CPU: live tensor bytes of the VAE forms (see below)
    python -m benchmarks.offload --plan                     # the memory model's choices at 24/32/48/80 GiB (no run)

``--vae-live`` runs the real-width VAE (base 96) on the CPU at a reduced size and records the peak of live tensor
bytes (``LiveBytes``) of each chunk form, scaled by area to 704x1024: what ``runtime.memory_plan`` uses to carry
the H200's measured VAE peaks from one form to another. ``--plan`` writes the model's prediction for a later clip
at 704x1024 under each cap (batch 1 and 2), with the weight bytes it counts: a prediction, to be measured.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.clip import StageClock, clip_stages
from benchmarks.common import (code_revision, demo_image_at, device_description, markdown_table, results_dir,
                               small_gpu, write_results)
from runtime import memory_plan, tiny
from runtime.demo import demo_speech
from runtime.errors import ConfigError
from runtime.offload import OffloadSpec
from runtime.pipeline import S2VPipeline

PCIE4_GBPS = 25.0
COLUMNS = ["precision", "recipe", "offload", "vae", "batch_cfg", "memory_cap_gib", "peak_gib", "peak_vae_encode_gib",
           "peak_denoise_gib", "peak_vae_decode_gib", "steps", "clip", "clip_s", "slowdown", "projected_pcie4_clip_s",
           "projected", "error"]
RECIPES = {"few-step": dict(steps=4, guide_scale=1.0, shift=8.0), "official": dict(steps=40, guide_scale=4.5, shift=3.0)}


def h2d_bandwidth_gbps(device: torch.device, gib: float = 1.0) -> float | None:
    """Pinned host → device copy bandwidth (GB/s), best of three; None without a GPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, pin_memory=True)  # 1 GiB: reused by the offload arenas
    dst = torch.empty_like(src, device=device)
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return src_bytes(gib) / best / 1e9


def src_bytes(gib: float) -> int:
    return int(gib * 2**30)


class StagePeaks:
    """Peak allocated memory between progress events, by stage (after a sync: the stage's kernels are done)."""

    def __init__(self, clock: StageClock, device: torch.device):
        self.clock, self.device, self.peaks = clock, device, {}
        self.reserved = None  # GiB the allocator held at most (the cap limits this, not what is allocated)

    def reset(self) -> None:
        self.peaks, self.reserved = {}, None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def progress(self, clip, clips, step, steps, stage):
        self.clock.progress(clip, clips, step, steps, stage)
        self.mark(stage)

    def mark(self, stage: str) -> None:
        """The peak since the last mark is ``stage``'s (call after a sync: the stage's kernels are done)."""
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            self.peaks[stage] = max(self.peaks.get(stage, 0.0), peak)
            self.reserved = max(self.reserved or 0.0, torch.cuda.max_memory_reserved(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)

    def wrap_encode(self, encode, spans: list):
        """The sampler's VAE encodes (the reference and the 73-frame motion history) run before its first progress
        event: without this their peak and time would be counted as the first denoise step's."""
        def timed(video):
            t0 = self.clock.now()
            self.mark("prepare")
            out = encode(video)
            t1 = self.clock.now()
            self.mark("vae_encode")
            spans.append((t0, t1))
            return out
        return timed


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage that ops create while the mode is on, alive at once (a storage counts until the
    last tensor viewing it is gone). Storage made before the mode (weights, inputs) and library workspaces are not
    counted: on a GPU these come on top (the fit in runtime.memory_plan carries them as a measured ratio)."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, list[int]] = {}   # storage address -> [tensors alive, bytes]
        self.live = self.peak = 0

    def _drop(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if ptr in self.refs:
                self.refs[ptr][0] += 1
            elif ptr in inputs or nbytes == 0:  # a view of a storage made before the mode
                continue
            else:
                self.refs[ptr] = [1, nbytes]
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._drop, ptr)
        return out


def vae_live_peaks(base_dim: int = 96, height: int = 64, width: int = 96, latents: int = 5) -> dict[str, int]:
    """Peak live tensor bytes on the CPU of each VAE chunk form (decoded frames not counted: the forms keep them in
    different places), for ``latents`` latents / ``1 + 4 (latents - 1)`` frames at ``height`` x ``width``."""
    from runtime.models.vae import VAEConfig, WanVAE

    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(base_dim=base_dim)).eval().requires_grad_(False)
    z = torch.randn(1, vae.cfg.z_dim, latents, height // 8, width // 8)
    video = torch.rand(1, 3, 1 + 4 * (latents - 1), height, width) * 2 - 1
    peaks = {}
    with torch.no_grad():
        for chunk in (1, 2):
            vae.chunk_latents = chunk
            tag = "" if chunk == 1 else "_chunk2"
            with LiveBytes() as m:
                frames = vae.decode_chunked(z)
            peaks[f"decode{tag}"] = m.peak - frames.nbytes
            with LiveBytes() as m:
                vae.encode_chunked(video)
            peaks[f"encode{tag}"] = m.peak
        vae.chunk_latents = 1
        with LiveBytes() as m:
            vae.decode_low_memory(z, out_device="meta")  # the frames go elsewhere (the host in a GPU run)
        peaks["decode_low_memory"] = m.peak
        with LiveBytes() as m:
            vae.encode_low_memory(video)
        peaks["encode_low_memory"] = m.peak
    return peaks


def _vae_live(args) -> int:
    height, width, latents, at = 64, 96, 5, (704, 1024)
    t0 = time.perf_counter()
    peaks = vae_live_peaks(96, height, width, latents)
    scale = at[0] * at[1] / (height * width)
    rows = [{"form": k, "live_mib": v / 2**20, "scaled_gib": v * scale / 2**30,
             "bytes_per_pixel_channel": v / (height * width * 96)} for k, v in peaks.items()]
    meta = {"device": device_description("cpu"), "date": time.strftime("%Y-%m-%d %H:%M"), "git": code_revision(),
            "command": "python -m benchmarks.offload --vae-live", "seconds": time.perf_counter() - t0,
            "shapes": {"height": height, "width": width, "latents": latents, "frames": 1 + 4 * (latents - 1),
                       "scaled_to": list(at)},
            "weights": "random Wan2.1 VAE (real configuration: base width 96), float32",
            "notes": "peak bytes of tensor storage alive at once while the form runs (benchmarks.offload.LiveBytes), "
                     "decoded frames not counted; scaled_gib = live bytes x the area ratio to 704x1024 (every "
                     "activation of a step scales with the area); no library workspaces"}
    out = results_dir(args.out, torch.device("cpu")) / f"vae_live_bytes_{at[0]}x{at[1]}.json"
    write_results(out, rows, meta, markdown_table(rows, ["form", "live_mib", "scaled_gib", "bytes_per_pixel_channel"]))
    print(markdown_table(rows, ["form", "live_mib", "scaled_gib", "bytes_per_pixel_channel"]))
    return 0


def plan_rows(caps=(24.0, 32.0, 48.0, 80.0), height: int = 704, width: int = 1024, frames: int = 80) -> list[dict]:
    """The memory model's choice and per-stage peaks for a later clip, per cap and DiT batch (bf16, UMT5 on the CPU
    as in this benchmark's runs); refused caps carry the refusal."""
    sizes = memory_plan.ModelSizes.s2v_14b()
    rows = []
    for batch in (1, 2):
        for cap in caps:
            shape = memory_plan.Shape(height, width, frames, batch)
            row = {"memory_cap_gib": cap, "batch": batch, "size": f"{height}x{width}", "frames": frames}
            try:
                place = memory_plan.choose(sizes, shape, cap, text_cpu=True)
            except ConfigError as err:  # the peaks are those of the most offloaded placement
                row["refused"] = str(err)
                place = memory_plan.candidates(sizes, text_cpu=True)[-1]
            peaks = memory_plan.stage_peaks(sizes, place, shape)
            rows.append({**row, "offload": None if "refused" in row else str(place.offload), "vae": place.vae,
                         "predicted_peak_gib": max(peaks.values()) / 2**30,
                         **{f"predicted_{k}_gib": v / 2**30 for k, v in peaks.items()}})
    return rows


def _plan_file(args) -> int:
    sizes = memory_plan.ModelSizes.s2v_14b()
    rows = plan_rows()
    weights = {"dit_gib": (sizes.dit_other + sizes.num_blocks * sizes.dit_block) / 2**30,
               "dit_non_block_gib": sizes.dit_other / 2**30, "dit_block_gib": sizes.dit_block / 2**30,
               "dit_block_fp8_gib": memory_plan.ModelSizes.s2v_14b(precision="fp8").dit_block / 2**30,
               "umt5_gib": sizes.text / 2**30, "vae_gib": sizes.vae / 2**30, "wav2vec2_gib": sizes.audio / 2**30}
    meta = {"device": "none: computed by runtime.memory_plan (a prediction, not a measurement)",
            "date": time.strftime("%Y-%m-%d %H:%M"), "git": code_revision(),
            "command": "python -m benchmarks.offload --plan", "weights": weights,
            "shapes": {"height": 704, "width": 1024, "infer_frames": 80, "clip": "later"},
            "notes": "bf16 DiT, UMT5 on the CPU (--t5_cpu), the plan's least offloading per cap; the activation "
                     "constants are runtime.memory_plan.ActivationModel's (fitted to the H200 results they name)"}
    out = results_dir(args.out, torch.device("cpu")) / "memory_plan_704x1024-80f.json"
    cols = ["memory_cap_gib", "batch", "offload", "vae", "predicted_peak_gib", "predicted_denoise_gib",
            "predicted_vae_decode_gib", "predicted_vae_encode_gib", "refused"]
    write_results(out, rows, meta, markdown_table(rows, cols))
    print(markdown_table(rows, cols))
    return 0


def _out_of_memory(err: BaseException) -> bool:
    """Out of device memory, however it surfaced: the allocator's error, or a library's (cuBLAS/cuDNN workspace,
    inductor autotuning) that PyTorch re-raises as a RuntimeError."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or any(
        k in text for k in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.offload", description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="24,32,48", help="comma list of GiB the allocator is capped at, one row each")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--recipes", default="few-step,official")
    ap.add_argument("--official-steps", type=int, default=3,
                    help="steps run of the official recipe (fewer than 40: its 40-step clip is projected from the "
                         "first step and the median of the later ones; a full 40-step CFG clip is ~10 min a row)")
    ap.add_argument("--offload-specs", default=None,
                    help="comma list of --offload values used for the capped rows in --caps order instead of the plan")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run on the tiny model (no allocator cap)")
    ap.add_argument("--vae-live", action="store_true", help="CPU: live tensor bytes of the VAE chunk forms, no run")
    ap.add_argument("--plan", action="store_true", help="the memory model's choices at 24/32/48 GiB, no run")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.vae_live:
        return _vae_live(args)
    if args.plan:
        return _plan_file(args)
    torch.set_grad_enabled(False)
    t_start = time.perf_counter()
    caps = [float(c) for c in args.caps.split(",") if c]
    specs = args.offload_specs.split(",") if args.offload_specs else (
        ["blocks:2", "blocks:1", "blocks"][:len(caps)] if args.tiny else None)
    device = torch.device("cpu" if args.tiny else "cuda")
    height, width, frames = (64, 96, 16) if args.tiny else (704, 1024, 80)
    precisions = ["float32"] if args.tiny else args.precisions.split(",")
    bandwidth = h2d_bandwidth_gbps(device)
    text, audio = _encoders(args.tiny)
    image = demo_image_at(height, width)
    speech = demo_speech(frames / 16 + 0.5)
    rows: list[dict] = []
    resident: dict[tuple, dict] = {}
    for precision, recipe, cap, spec in row_order(precisions, args.recipes.split(","), caps, specs):
        steps = args.official_steps if recipe == "official" else RECIPES[recipe]["steps"]
        if args.tiny:
            steps = min(steps, 2)
        todo = [None]
        while todo:
            fallback = todo.pop()
            row = _row(args, device, precision, recipe, steps, cap, spec, (height, width, frames), text, audio,
                       image, speech, bandwidth, fallback)
            if cap is not None and fallback is None and row.get("error") and not spec:  # once, fully offloaded
                todo.append(memory_plan.candidates(_sizes(args, precision), text_cpu=True)[-1])
            if cap is None:
                resident[(precision, recipe)] = row
            base = resident.get((precision, recipe))
            if base is not None and row.get("clip_s") and base.get("clip_s"):
                row["slowdown"] = row["clip_s"] / base["clip_s"]
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            _write(args, rows, device, bandwidth, (height, width, frames), t_start, argv, done=False)
    _write(args, rows, device, bandwidth, (height, width, frames), t_start, argv, done=True)
    return 0


def row_order(precisions: list[str], recipes: list[str], caps: list[float], specs: list[str] | None) -> list[tuple]:
    """(precision, recipe, cap, offload spec) in the order the rows run: per precision the resident row and the
    smallest cap of each recipe first (the issue's headline), then the other caps; a cap's ``--offload-specs`` entry
    goes with it."""
    spec_of = {c: (specs[i] if specs else None) for i, c in enumerate(caps)}
    first, rest = caps[:1], caps[1:]
    out = []
    for precision in precisions:
        for group in ([None] + first, rest):
            for recipe in recipes:
                out += [(precision, recipe, c, "none" if c is None else spec_of[c]) for c in group]
    return out


def _encoders(is_tiny: bool):
    if is_tiny:
        return tiny.tiny_text_encoder(), tiny.tiny_audio_encoder()
    from benchmarks.run import full_size_encoders

    return full_size_encoders(torch.device("cpu"))


def _dit(is_tiny: bool, precision: str, device: torch.device):
    if is_tiny:
        return tiny.tiny_dit(torch.float32)
    from runtime.config import DiTConfig
    from runtime.models.dit import build_dit

    return build_dit(DiTConfig.s2v_14b(), dtype=torch.bfloat16, device=device)  # same seed: same weights every row


def _vae(is_tiny: bool, device: torch.device):
    if is_tiny:
        return tiny.tiny_vae()
    from runtime.models.vae import VAEConfig, WanVAE

    with torch.device(device):
        return WanVAE(VAEConfig.wan21()).eval().requires_grad_(False)


def _sizes(args, precision: str) -> memory_plan.ModelSizes:
    return (memory_plan.ModelSizes.tiny() if args.tiny else
            memory_plan.ModelSizes.s2v_14b(precision="fp8" if precision == "fp8" else None))


def _plan(args, precision: str, cap: float, shape: tuple[int, int, int], batch: int
          ) -> tuple[memory_plan.Placement, bool, str]:
    """The plan's placement for ``cap`` and whether CFG runs batched: CFG's batch of 2 where it fits, else its two
    branches one after the other (the refusal's advice), else the most offloaded placement (with the refusal)."""
    sizes = _sizes(args, precision)
    for b in dict.fromkeys((batch, 1)):
        want = memory_plan.Shape(shape[0], shape[1], shape[2], b)
        try:
            place = memory_plan.choose(sizes, want, cap, text_cpu=True)
        except ConfigError as err:
            refusal = str(err)
            continue
        note = "" if b == batch else f"batch {batch} refused ({refusal}); "
        return place, b == 2, note + memory_plan.describe(sizes, place, want)
    return memory_plan.candidates(sizes, text_cpu=True)[-1], False, f"refused, ran the most offloaded: {refusal}"


def _row(args, device, precision, recipe, steps, cap, spec, shape, text, audio, image, speech, bandwidth,
         fallback: memory_plan.Placement | None = None) -> dict:
    """One row; ``fallback``: the placement of a second try after this cap ran out of memory with the plan's."""
    height, width, frames = shape
    base = RECIPES[recipe]
    cfg = base["guide_scale"] > 1
    plan, vae_form, batch_cfg = None, "default", cfg
    if cap is None and small_gpu(device):  # the resident rows on an 80 GB card (the row's "vae" says so)
        vae_form = "low_memory"
    if fallback is not None:
        spec, vae_form, batch_cfg = fallback.offload, fallback.vae, False
        plan = f"second try after running out of memory: {fallback}"
    elif cap is not None and spec is None:
        place, batch_cfg, plan = _plan(args, precision, cap, shape, 2 if cfg else 1)
        spec, vae_form = place.offload, place.vae
        batch_cfg = batch_cfg and cfg
    spec = OffloadSpec.parse(spec)
    row = {"precision": precision, "recipe": recipe, "offload": str(spec), "vae": vae_form,
           "batch_cfg": batch_cfg if cfg else None, "memory_cap_gib": cap, "steps": steps,
           "guide_scale": base["guide_scale"], "clip": "later", "plan": plan, "bandwidth_gbps": bandwidth}
    pipe = clock = peaks = None
    if device.type == "cuda":  # left over by earlier rows (should be ~0): it would count against this row's cap
        row["allocated_before_gib"] = torch.cuda.memory_allocated(device) / 2**30
    try:
        dit = _dit(args.tiny, precision, device)
        if spec.enabled:
            if precision == "fp8" and not args.tiny:
                dit.set_precision("fp8")  # on the GPU: the bits quantize_on_host would give, without its round trips
            dit.to("cpu")  # built on the GPU (fast, and the resident row's weights), held on the host
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else min(1.0, cap * 2**30 / total), device)
        backend = "torch" if args.tiny else ("torch-compile" if spec.enabled else "torch-graph")
        pipe = S2VPipeline(dit, _vae(args.tiny, device), text, audio, device, backend=backend, t5_cpu=True,
                           name="tiny" if args.tiny else "random-14b", offload=spec,
                           precision="fp8" if precision == "fp8" else None, vae_low_memory=vae_form == "low_memory")
        _reuse_encodings(pipe)
        common = dict(prompt="a person talking to the camera", seed=0, infer_frames=frames, num_clip=1,
                      size=f"{height}*{width}", start_from_ref=True, guide_scale=base["guide_scale"],
                      sample_shift=base["shift"], batch_cfg=batch_cfg)
        pipe.generate(image, speech, sample_steps=2, progress=False, **common)  # compilation (and capture)
        clock = StageClock(device)
        peaks = StagePeaks(clock, device)
        encodes: list = []
        pipe.sampler._encode = peaks.wrap_encode(pipe.sampler._encode, encodes)
        peaks.reset()
        start = clock.now()
        pipe.generate(image, speech, sample_steps=steps, progress=peaks.progress, **common)
        st = clip_stages(clock, start, 1)[0]
        den = [e[3] for e in clock.events if e[1] == "denoise"]
        encode_s = sum(t1 - t0 for t0, t1 in encodes if t1 <= den[0])
        denoise_s = st["denoise_s"] - encode_s  # the motion encode belongs to the previous clip of a real run
        full_steps = RECIPES[recipe]["steps"]
        # The first step carries the prepare calls and the first block copies; a projection to 40 steps multiplies
        # only the later steps' time.
        first_step_s = den[0] - start - encode_s
        step_s = (den[-1] - den[0]) / (steps - 1) if steps > 1 else first_step_s
        clip_s = denoise_s + st["vae_decode_s"]
        projected = steps < full_steps and not args.tiny
        row.update(projected=projected, step_s=step_s, first_step_s=first_step_s, denoise_s=denoise_s,
                   vae_encode_s=encode_s, vae_decode_s=st["vae_decode_s"],
                   clip_s=first_step_s + (full_steps - 1) * step_s + st["vae_decode_s"] if projected else clip_s)
        if pipe.streamer is not None:
            forwards = 2 if cfg and not batch_cfg else 1  # CFG's branches one after the other stream the blocks twice
            streamed = forwards * len(pipe.streamer.streamed) * pipe.streamer.block_bytes
            row["streamed_gib_per_step"] = streamed / 2**30
            if not args.tiny:
                pcie4_step = max(step_s, streamed / (PCIE4_GBPS * 1e9))
                row["projected_pcie4_clip_s"] = row["clip_s"] + full_steps * (pcie4_step - step_s)
    except RuntimeError as err:
        if not _out_of_memory(err):
            raise
        row["error"] = f"out of memory: {str(err).splitlines()[0]}"
        row["failed_in"] = (clock.events[-1][1] if clock is not None and clock.events else "load or warm-up")
    finally:
        row["peak_gib"] = row["peak_reserved_gib"] = None  # no device counters (the CPU) or failed before the clip
        if peaks is not None and peaks.peaks:  # what was measured, also up to an out-of-memory error
            row.update({f"peak_{k}_gib": v for k, v in peaks.peaks.items()})
            row["peak_gib"] = max(peaks.peaks.values())
            row["peak_reserved_gib"] = peaks.reserved
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return row


_ENCODED: dict = {}


def _reuse_encodings(pipe) -> None:
    """The encoders run on the CPU once per input (UMT5-XXL takes seconds a prompt there); every row reuses it."""
    prompts, audio = pipe.encode_prompts, pipe.encode_audio

    def encode_prompts(prompt, negative_prompt=""):
        key = ("text", prompt, negative_prompt)
        if key not in _ENCODED:
            _ENCODED[key] = tuple(t.cpu() for t in prompts(prompt, negative_prompt))
        return tuple(t.to(pipe.device) for t in _ENCODED[key])

    def encode_audio(clip, infer_frames):
        key = ("audio", hashlib.sha256(np.ascontiguousarray(clip.samples).tobytes()).hexdigest(), infer_frames)
        if key not in _ENCODED:
            _ENCODED[key] = audio(clip, infer_frames)
        return _ENCODED[key]

    pipe.encode_prompts, pipe.encode_audio = encode_prompts, encode_audio


def _write(args, rows, device, bandwidth, shape, t_start, argv, done):
    height, width, frames = shape
    meta = {"device": device_description(device), "date": time.strftime("%Y-%m-%d %H:%M"), "git": code_revision(),
            "command": "python -m benchmarks.offload " + " ".join(sys.argv[1:] if argv is None else argv),
            "shapes": {"height": height, "width": width, "infer_frames": frames, "clip": "later (start_from_ref)"},
            "recipes": RECIPES, "official_steps": args.official_steps, "h2d_bandwidth_gbps": bandwidth,
            "pcie4_gbps": PCIE4_GBPS, "weights": "random at the real configuration, the same seed in every row",
            "encoders": "UMT5 and wav2vec2 on the CPU in every row", "process_total_s": time.perf_counter() - t_start,
            "complete": done,
            "notes": "resident rows: torch-graph, no cap; capped rows: torch-compile with the offload the plan chose "
                     "(runtime.memory_plan); projected_pcie4_clip_s assumes the copies overlap compute"}
    name = f"offload_{height}x{width}-{frames}f.json"
    write_results(results_dir(args.out, device) / name, rows, meta, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    raise SystemExit(main())
