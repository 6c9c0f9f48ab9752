"""The GPU memory model behind ``--max_gpu_memory``: peak bytes per stage for a placement of the weights, and the
least offloading that fits a budget.

Weights are counted from the model configurations (meta-device models: no memory, no files read beyond the
configs) in the dtypes the pipeline holds them in. Activations are a formula in (height, width, frames, batch)
whose constants live in one dataclass, ``ActivationModel``, fitted to the committed H200 peaks (each constant names
its result file); ``benchmarks/offload.py`` measures the per-stage peaks under capped allocators to check them.

Stages: ``text_encode`` (UMT5), ``audio_encode`` (wav2vec2), ``vae_encode`` (the motion history, 73 frames),
``denoise`` (a later clip: reference and motion tokens beside the noisy ones) and ``vae_decode`` (the chunked
decode of motion + new latents). During every stage the resident weights are on the GPU: the DiT's non-block
parts, its resident blocks and staging slots, the VAE, and the encoders placed there. The VAE runs in one of two
forms (``VAE_FORMS``): the default (GPU: ``WanVAE.optimize``'s compiled 2-latent steps) or the low-memory one.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from runtime.errors import ConfigError
from runtime.offload import OffloadSpec

GIB = 2**30
STAGES = ("text_encode", "audio_encode", "vae_encode", "denoise", "vae_decode")
TEXT_PLACES = ("gpu", "moved", "cpu")   # UMT5: resident, on the host and moved in while it encodes, or run on the CPU
AUDIO_PLACES = ("gpu", "cpu")           # wav2vec2: resident or run on the CPU


# Fitted to the committed H200 results below; "harness" = tensors the benchmark held beside the stage (weights,
# inputs, outputs), subtracted before fitting. Where the GPU form was not measured, a CPU measurement of live
# tensor bytes (``python -m benchmarks.offload --vae-live``: benchmarks/results/cpu/vae_live_bytes_704x1024.json,
# scaled by area) gives the ratio between two forms.
VAE_FORMS = ("default", "low_memory")   # the chunk loop of WanVAE.optimize (GPU) / WanVAE.decode_low_memory


@dataclass(frozen=True)
class ActivationModel:
    """Activation bytes per stage: the peak allocated beyond the resident weights and the stage's own inputs and
    outputs, as formulas in (height, width, frames, batch). To be re-fitted to ``benchmarks/offload.py``'s per-stage
    peaks once it has run on the H200 (benchmarks/NOTES.md, Block offload)."""

    # DiT, per token and batch entry: benchmarks/results/nvidia-h200/pipeline_fullsize.json, row "second request",
    # peak_mem_gib 68.29 (first clip: 59,136 tokens, CFG batch 2, torch-graph, everything resident) minus the
    # resident weights counted here (43.11 GiB): 25.18 GiB = 228.6 KB per token and entry. The FFN term is the bf16
    # hidden before and after GELU (4 bytes per FFN channel); the width term takes the rest. A torch-graph run of
    # the code of 2026-11-21: compiled blocks without a graph (block offload) likely need less.
    dit_bytes_per_token_dim: float = 33.85   # per DiT token × model width × batch entry
    dit_bytes_per_token_ffn: float = 4.0     # per DiT token × FFN width × batch entry
    # VAE, per output pixel × VAE base width. vae_speed_later-704x1024.json (39 latents / 73 frames at 704x1024;
    # harness: weights 0.47, 73 input frames 0.59, latents 0.03, the 153 decoded frames 1.23 GiB, and from the
    # second row on the first row's frames, 1.23 GiB more):
    # - default decode (compiled, 2 latents per step): row "compiled" decode_peak_gib 29.38 (1 latent per step)
    #   -> 25.83 GiB, times 2-latent/1-latent steps on the CPU (cpu file: decode_chunk2 / decode) 1.289 = 33.3 GiB;
    vae_decode_bytes_per_pixel_channel: float = 517.0
    # - low-memory decode: row "baseline" decode_peak_gib 22.78 (eager, 1 latent per step) -> 20.46 GiB, 1.145x the
    #   CPU's live bytes of that form (cpu file: decode); the low-memory form on the CPU (decode_low_memory) times
    #   that 1.145 = 13.8 GiB;
    vae_decode_low_memory_bytes_per_pixel_channel: float = 214.0
    # - default encode: row "compiled" encode_peak_gib 21.88 -> 18.33 GiB, times the CPU's encode_chunk2 / encode
    #   1.447 = 26.5 GiB (per pixel of the 73 frames' size, as the decode);
    vae_encode_bytes_per_pixel_channel: float = 412.0
    # - low-memory encode: row "baseline" encode_peak_gib 16.48 -> 14.16 GiB, 1.228x the CPU's encode; the CPU's
    #   encode_low_memory times 1.228 = 11.6 GiB.
    vae_encode_low_memory_bytes_per_pixel_channel: float = 181.0
    # Not measured (no committed peak): UMT5's activations for 512 tokens and wav2vec2's hidden states are small
    # beside the DiT's; these are estimates from the tensor shapes.
    text_bytes_per_token_dim: float = 64.0   # per UMT5 token (512) × its width
    audio_bytes_per_second: float = 16e6     # wav2vec2's hidden states (all layers kept) per second of audio
    reserve_bytes: float = 1.0 * GIB         # allocator fragmentation and workspaces beyond the formula (a margin)


@dataclass(frozen=True)
class ModelSizes:
    """Weight bytes on the GPU of each component (the DiT split into its non-block parts and one block)."""

    dit_other: int
    dit_block: int
    num_blocks: int
    vae: int
    text: int
    audio: int
    dim: int
    ffn_dim: int
    text_dim: int
    vae_base_dim: int
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)

    @classmethod
    def from_configs(cls, dit_cfg, vae_cfg, text_cfg, audio_cfg, dtype: torch.dtype = torch.bfloat16,
                     precision: str | None = None, text_dtype: torch.dtype = torch.bfloat16) -> "ModelSizes":
        """``dit_cfg``: ``DiTConfig``; ``vae_cfg``: ``VAEConfig``; ``text_cfg``: ``WanT5Config``; ``audio_cfg``:
        transformers ``Wav2Vec2Config``. The VAE and wav2vec2 are held in float32, as the pipeline does."""
        from transformers import UMT5EncoderModel, Wav2Vec2Model

        from runtime.models.dit import WanS2VDiT
        from runtime.models.text import umt5_config_from_wan
        from runtime.models.vae import WanVAE

        with torch.device("meta"):
            dit = WanS2VDiT(dit_cfg)
            vae = WanVAE(vae_cfg)
            text = UMT5EncoderModel(umt5_config_from_wan(text_cfg))
            audio = Wav2Vec2Model(audio_cfg)
        block = _block_bytes(dit.blocks[0], dtype, precision == "fp8")
        total = sum(_dit_param_bytes(n, p, dtype) for n, p in dit.named_parameters())
        block_native = sum(_dit_param_bytes(f"blocks.0.{n}", p, dtype) for n, p in dit.blocks[0].named_parameters())
        return cls(dit_other=total - dit_cfg.num_layers * block_native, dit_block=block, num_blocks=dit_cfg.num_layers,
                   vae=_bytes(vae, torch.float32), text=_bytes(text, text_dtype), audio=_bytes(audio, torch.float32),
                   dim=dit_cfg.dim, ffn_dim=dit_cfg.ffn_dim, text_dim=text_cfg.dim, vae_base_dim=vae_cfg.base_dim,
                   zip_frame_buckets=tuple(dit_cfg.zip_frame_buckets))

    @classmethod
    def for_checkpoint(cls, folder: str | Path, dtype: torch.dtype = torch.bfloat16,
                       precision: str | None = None) -> "ModelSizes":
        """The official folder's components: the DiT from its config.json, wav2vec2 from its config.json, UMT5-XXL
        and the Wan2.1 VAE at their official configurations."""
        from transformers import Wav2Vec2Config

        from runtime import checkpoint as ck
        from runtime.config import DiTConfig
        from runtime.models.text import UMT5_XXL
        from runtime.models.vae import VAEConfig

        folder = Path(folder)
        audio_cfg = Wav2Vec2Config.from_json_file(str(folder / ck.WAV2VEC_DIR / "config.json"))
        return cls.from_configs(DiTConfig.from_json(folder / ck.DIT_CONFIG), VAEConfig.wan21(), UMT5_XXL, audio_cfg,
                                dtype, precision)

    @classmethod
    def s2v_14b(cls, dtype: torch.dtype = torch.bfloat16, precision: str | None = None) -> "ModelSizes":
        """The official model's configurations without a checkpoint folder (benchmarks; wav2vec2-large)."""
        from transformers import Wav2Vec2Config

        from runtime.config import DiTConfig
        from runtime.models.text import UMT5_XXL
        from runtime.models.vae import VAEConfig

        audio_cfg = Wav2Vec2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096, do_stable_layer_norm=True, feat_extract_norm="layer",
                                   conv_bias=True)
        return cls.from_configs(DiTConfig.s2v_14b(), VAEConfig.wan21(), UMT5_XXL, audio_cfg, dtype, precision)

    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32) -> "ModelSizes":
        """The built-in tiny model (its components are a few MB: built and counted)."""
        from runtime import tiny
        from runtime.config import DiTConfig

        cfg = DiTConfig.tiny()
        dit, vae = tiny.tiny_dit(dtype), tiny.tiny_vae()
        block = _bytes(dit.blocks[0])
        return cls(dit_other=_bytes(dit) - cfg.num_layers * block, dit_block=block, num_blocks=cfg.num_layers,
                   vae=_bytes(vae), text=_bytes(tiny.tiny_text_encoder().model),
                   audio=_bytes(tiny.tiny_audio_encoder().model), dim=cfg.dim, ffn_dim=cfg.ffn_dim,
                   text_dim=tiny.TEXT_DIM, vae_base_dim=vae.cfg.base_dim)


def _bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Parameter and buffer bytes, in ``dtype`` where given (floating tensors), else as held."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def _dit_param_bytes(name: str, p: torch.Tensor, dtype: torch.dtype) -> int:
    from runtime.models.dit import keeps_fp32

    return p.numel() * (4 if keeps_fp32(name) else torch.empty((), dtype=dtype).element_size())


def _block_bytes(block: torch.nn.Module, dtype: torch.dtype, fp8: bool) -> int:
    """One block's bytes; with FP8 the quantised linears hold e4m3 weights, fp32 per-channel scales, bf16 biases."""
    from runtime.kernels.fp8 import QUANTISED

    total = 0
    for name, p in block.named_parameters():
        module = name.rpartition(".")[0]
        if fp8 and module in QUANTISED:
            total += p.numel() * (1 if name.endswith(".weight") else 2)
            if name.endswith(".weight"):
                total += p.shape[0] * 4
        else:
            total += _dit_param_bytes(f"blocks.0.{name}", p, dtype)
    return total


@dataclass(frozen=True)
class Placement:
    """Where the weights live: the offload spec for the DiT, and each encoder's place."""

    offload: OffloadSpec = OffloadSpec()
    text: str = "gpu"
    audio: str = "gpu"
    vae: str = "default"    # VAE_FORMS: "low_memory" = WanVAE.low_memory (eager, one latent per step, frames to host)

    def __str__(self) -> str:
        vae = ", VAE low-memory" if self.vae == "low_memory" else ""
        return f"offload {self.offload}, UMT5 {self.text}, wav2vec2 {self.audio}{vae}"


@dataclass(frozen=True)
class Shape:
    """What a plan must fit: the output size, the frames per clip, the DiT batch (2: CFG batched), audio length."""

    height: int
    width: int
    frames: int = 80
    batch: int = 2
    audio_s: float = 60.0

    def with_size(self, height: int, width: int) -> "Shape":
        return replace(self, height=height, width=width)


def dit_tokens(sizes: ModelSizes, shape: Shape, motion_frames: int = 73) -> int:
    """Tokens of a later clip: noisy latents, the reference frame, and the frame-packed motion history."""
    lat_h, lat_w = shape.height // 8, shape.width // 8
    grid = (lat_h // 2) * (lat_w // 2)
    lat_f = (shape.frames + 3 + motion_frames) // 4 - (motion_frames + 3) // 4
    n_new, n_mid, n_old = sizes.zip_frame_buckets
    motion = n_new * grid + (n_mid // 2) * (lat_h // 4) * (lat_w // 4) + (n_old // 4) * (lat_h // 8) * (lat_w // 8)
    return grid * (lat_f + 1) + motion


def resident_bytes(sizes: ModelSizes, place: Placement) -> int:
    spec = place.offload
    if spec.enabled:
        streamed = sizes.num_blocks - spec.resident
        blocks = spec.resident + min(spec.prefetch + 1, streamed)
    else:
        blocks = sizes.num_blocks
    return (sizes.dit_other + blocks * sizes.dit_block + sizes.vae + (sizes.text if place.text == "gpu" else 0)
            + (sizes.audio if place.audio == "gpu" else 0))


def stage_peaks(sizes: ModelSizes, place: Placement, shape: Shape, act: ActivationModel = ActivationModel(),
                motion_frames: int = 73, graphs: bool = True) -> dict[str, int]:
    """Peak GPU bytes of each stage (``STAGES``) for this placement and shape. ``graphs``: a resident DiT runs as
    CUDA graphs (``torch-graph``, the default backend on a GPU); False for the eager or compiled backends."""
    base = resident_bytes(sizes, place) + act.reserve_bytes
    pixels = shape.height * shape.width
    lat_f = (shape.frames + 3 + motion_frames) // 4 - (motion_frames + 3) // 4
    decoded_frames = 1 + 4 * ((motion_frames + 3) // 4 + lat_f - 1)
    text = 0 if place.text == "cpu" else 512 * sizes.text_dim * act.text_bytes_per_token_dim
    text += sizes.text if place.text == "moved" else 0
    tokens = dit_tokens(sizes, shape, motion_frames)
    low = place.vae == "low_memory"
    decode = act.vae_decode_low_memory_bytes_per_pixel_channel if low else act.vae_decode_bytes_per_pixel_channel
    encode = act.vae_encode_low_memory_bytes_per_pixel_channel if low else act.vae_encode_bytes_per_pixel_channel
    dit_act = shape.batch * tokens * (sizes.dim * act.dit_bytes_per_token_dim
                                      + sizes.ffn_dim * act.dit_bytes_per_token_ffn)
    # CUDA graphs' memory pool keeps a step's activations reserved between replays, so every other stage runs beside
    # it: a prediction from how graph pools work, not a measured peak, and an upper bound as far as the DiT constant
    # above may be the VAE's peak (its source peak is the same in a request that only replays). Block offload runs
    # compiled blocks without a graph: nothing is kept.
    pool = dit_act if graphs and not place.offload.enabled else 0
    base_out = base + pool
    peaks = {
        "text_encode": base_out + text,
        "audio_encode": base_out + (act.audio_bytes_per_second * shape.audio_s if place.audio == "gpu" else 0),
        # the motion history (fp32 pixels) is on the device in both forms (the sampler moves it in)
        "vae_encode": base_out + pixels * (sizes.vae_base_dim * encode + 3 * 4 * motion_frames),
        "denoise": base + dit_act,
        # the default form writes the decoded frames into one device tensor; the low-memory one to the host
        "vae_decode": base_out + pixels * (sizes.vae_base_dim * decode + (0 if low else 3 * 4 * decoded_frames)),
    }
    return {k: int(v) for k, v in peaks.items()}


def candidates(sizes: ModelSizes, text_cpu: bool = False, prefetch: int = 1) -> list[Placement]:
    """Placements from the least offloading to the most: everything resident; the encoders off the GPU (UMT5 moved in
    while it encodes, else run on the CPU; wav2vec2 on the CPU); then ever fewer resident blocks; then the same again
    with the low-memory VAE. Streaming a block costs little where its copy hides behind the compute, while the
    low-memory VAE costs seconds a clip (eager, one latent per step): it comes last."""
    texts = ("cpu",) if text_cpu else ("moved", "cpu")
    out = []
    for vae in VAE_FORMS:
        out += [] if text_cpu else [Placement(vae=vae)]
        out += [Placement(OffloadSpec(), t, "cpu", vae) for t in texts]
        for n in range(sizes.num_blocks - 1, -1, -1):
            out += [Placement(OffloadSpec("blocks", n, prefetch), t, "cpu", vae) for t in texts]
    return out


def fits(sizes: ModelSizes, place: Placement, shape: Shape, cap_bytes: float, act: ActivationModel,
         graphs: bool = True) -> bool:
    return max(stage_peaks(sizes, place, shape, act, graphs=graphs).values()) <= cap_bytes


def size_arg(height: int, width: int, size_name: str = "size") -> str:
    """A size as its option takes it: ``--size 576*832`` (CLI, ``size_name`` "--size") or ``size='576*832'``."""
    return f"{size_name} {height}*{width}" if size_name.startswith("--") else f"{size_name}='{height}*{width}'"


def choose(sizes: ModelSizes, shape: Shape, max_gpu_gib: float, text_cpu: bool = False, prefetch: int = 1,
           act: ActivationModel = ActivationModel(), name: str = "max_gpu_memory",
           size_name: str = "size", graphs: bool = True) -> Placement:
    """The least offloading whose every stage fits ``max_gpu_gib``; refused in one line, naming the largest size
    (same aspect) that would fit with everything offloaded, when even that cannot fit. ``name`` and ``size_name``:
    how the message names the options (``--max_gpu_memory`` / ``--size`` on the CLI); ``graphs``: a resident DiT
    would run as CUDA graphs (see ``stage_peaks``)."""
    if not (isinstance(max_gpu_gib, (int, float)) and not isinstance(max_gpu_gib, bool) and 0 < max_gpu_gib < 1e6):
        raise ConfigError(f"{name} {max_gpu_gib!r}: give the GPU memory to fit in GiB, a positive number such as 24")
    cap = max_gpu_gib * GIB
    options = candidates(sizes, text_cpu, prefetch)
    for place in options:
        if fits(sizes, place, shape, cap, act, graphs):
            return place
    most = options[-1]
    peaks = stage_peaks(sizes, most, shape, act)
    stage = max(peaks, key=peaks.get)
    what = f"{size_arg(shape.height, shape.width, size_name)}, {shape.frames} frames, batch {shape.batch}"
    best = largest_fitting(sizes, most, shape, cap, act)
    fix = (f"the largest size that fits is {size_arg(best[0], best[1], size_name)}: use it or a GPU with more memory"
           if best else f"not even {size_arg(64, 64, size_name)} fits: use a GPU with more memory")
    if shape.batch > 1 and fits(sizes, most, replace(shape, batch=1), cap, act):
        cfg = "--no_batch_cfg" if size_name.startswith("--") else "batch_cfg=False"
        fix += f" (or {cfg}: one CFG branch at a time fits)"
    raise ConfigError(f"{name} {max_gpu_gib:g} GiB cannot fit {what} even with every block streamed, the encoders "
                      f"on the CPU and the low-memory VAE (the {stage} stage needs {peaks[stage] / GIB:.1f} GiB); {fix}")


def largest_fitting(sizes: ModelSizes, place: Placement, shape: Shape, cap: float,
                    act: ActivationModel) -> tuple[int, int] | None:
    """The largest (height, width) in multiples of 64 with about the aspect of ``shape`` that fits, or None."""
    for h in range(shape.height // 64 * 64, 63, -64):
        w = max(64, round(h * shape.width / shape.height / 64) * 64)
        if fits(sizes, place, shape.with_size(h, w), cap, act):
            return h, w
    return None


def describe(sizes: ModelSizes, place: Placement, shape: Shape, act: ActivationModel = ActivationModel(),
             graphs: bool = True) -> str:
    peaks = stage_peaks(sizes, place, shape, act, graphs=graphs)
    return f"{place}; peak " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in peaks.items()) + " GiB"
