"""Configuration of the S2V diffusion transformer, read from the checkpoint's ``config.json``.

The official code builds ``WanModel_S2V`` from the checkpoint folder's ``config.json`` (not from its
Python config), so that file is the single source of truth at load time. Options that this project
does not implement are rejected by name instead of being silently ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

# Keys the official constructor accepts but that do not change inference for the supported variant,
# or that diffusers adds to every config.json.
_IGNORED_KEYS = {
    "_class_name", "_diffusers_version", "_name_or_path", "zero_init", "motion_token_num", "model_type",
    "enable_tsm", "trainable_token_pos_emb", "framepack_drop_mode", "args", "kwargs",
}


# Sane ranges, checked before anything is built or allocated (S2V-14B: dim 5120, ffn 13824, 40 heads, 40 layers).
_INT_RANGES = {
    "dim": (1, 1 << 15), "ffn_dim": (1, 1 << 17), "num_heads": (1, 512), "num_layers": (1, 512),
    "in_dim": (1, 1024), "out_dim": (1, 1024), "freq_dim": (2, 1 << 14), "text_dim": (1, 1 << 15),
    "text_len": (1, 1 << 14), "cond_dim": (1, 1024), "audio_dim": (1, 1 << 14), "num_audio_token": (1, 256),
    "audio_layers": (1, 256), "ref_time_position": (0, 1 << 16),
}
@dataclass(frozen=True)
class RunDefaults:
    """The official run defaults (``generate.py`` of Wan2.2 for the s2v task): every CLI, the library and the
    service read them from here."""
    sample_steps: int = 40
    sample_shift: float = 3.0
    guide_scale: float = 4.5
    solver: str = "unipc"
    infer_frames: int = 80


RUN = RunDefaults()
SOLVERS = ("unipc", "dpm++", "euler")
MAX_SEED = 2**63 - 1  # the official random.randint(0, sys.maxsize); torch generators take < 2**64
MAX_STEPS = 1000  # the schedule has 1000 training timesteps; more steps cannot add anything

# Official ``--size`` choices for s2v-14B and the area each one stands for (MAX_AREA_CONFIGS). Only the area
# is used: the aspect ratio of the output follows the reference image.
SIZE_AREAS: dict[str, int] = {
    "720*1280": 720 * 1280,
    "1280*720": 1280 * 720,
    "480*832": 480 * 832,
    "832*480": 832 * 480,
    "1024*704": 1024 * 704,
    "704*1024": 704 * 1024,
    "704*1280": 704 * 1280,
    "1280*704": 1280 * 704,
}
MIN_AREA = 64 * 64  # one tile of the 64-px output grid (runtime.preprocess.DIVISOR): no smaller H x W exists
# Largest accepted area: 1920*1080, 2.25x the largest official choice (1280*720). The DiT's attention grows with
# the square of the area, so a typo like 10240*7040 would otherwise ask for days of work and terabytes.
MAX_AREA = 1920 * 1080

TINY_SEED = 20250901  # the built-in tiny model's random weights (runtime.tiny): part of its identity in manifests

MAX_PARAMETERS = 50e9  # 3.5x the 14B model; a bigger config.json is damaged or for another model


@dataclass(frozen=True)
class DiTConfig:
    """Hyper-parameters of ``WanModel_S2V`` (names as in the official ``config.json``)."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 16
    out_dim: int = 16
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cond_dim: int = 16
    audio_dim: int = 1024
    num_audio_token: int = 4
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    enable_adain: bool = True
    adain_mode: str = "attn_norm"
    zero_timestep: bool = True
    enable_framepack: bool = True
    enable_motioner: bool = False
    add_last_motion: bool = True
    qk_norm: bool = True
    cross_attn_norm: bool = True
    window_size: tuple[int, int] = (-1, -1)
    # Not in config.json: fixed by the official architecture.
    audio_layers: int = 25            # wav2vec2 hidden states mixed by ``casual_audio_encoder.weights``
    zip_frame_buckets: tuple[int, int, int] = (1, 2, 16)  # frame-pack: newest 1 | next 2 | oldest 16
    ref_time_position: int = 30       # RoPE temporal position of the reference tokens (hard-coded upstream)
    rope_theta: float = 10000.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    # ----------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def lat_motion_frames(self) -> int:
        return sum(self.zip_frame_buckets)

    @property
    def inject_map(self) -> dict[int, int]:
        """Block index -> audio injector index."""
        return {block: j for j, block in enumerate(self.audio_inject_layers)}

    # ----------------------------------------------------------------- presets
    @classmethod
    def s2v_14b(cls) -> "DiTConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "DiTConfig":
        """A few-MB model with the same structure; used by tests and ``--ckpt_dir tiny``."""
        return cls(dim=64, ffn_dim=128, num_heads=4, num_layers=4, text_dim=48, audio_dim=32,
                   audio_inject_layers=(0, 2, 3))

    # ----------------------------------------------------------------- I/O
    def to_official_dict(self) -> dict:
        """The official ``WanModel_S2V`` config (``config.json`` keys, constructor arguments) of this config."""
        out = self.to_dict()
        for k in ("audio_layers", "zip_frame_buckets", "ref_time_position", "rope_theta"):  # fixed in the official code
            out.pop(k)
        out.update(model_type="s2v", **{k: v for k, v in self.extra.items() if k != "_class_name"})
        out.setdefault("framepack_drop_mode", "padd")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> "DiTConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            if key in known:
                values[key] = value
            else:
                extra[key] = value
        model_type = raw.get("model_type", "s2v")
        if model_type != "s2v":
            raise ConfigError(f"{source}: model_type={model_type!r}; this project runs only the S2V model (model_type 's2v')")
        unknown = sorted(k for k in extra if k not in _IGNORED_KEYS)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; remove them or use the official Wan2.2-S2V config.json")
        for key in ("patch_size", "window_size", "audio_inject_layers", "zip_frame_buckets"):
            if key in values:
                v = values[key]
                if not isinstance(v, (list, tuple)) or len(v) > 512 or not all(_is_int(x) for x in v):
                    raise ConfigError(f"{source}: {key} must be a list of integers, got {_short(v)}")
                values[key] = tuple(v)
        for key in _INT_RANGES:
            if key in values and not _is_int(values[key]):
                raise ConfigError(f"{source}: {key} must be an integer, got {_short(values[key])}")
        for key in ("eps", "rope_theta"):
            v = values.get(key)
            if key in values and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{source}: {key} must be a number, got {_short(v)}")
        for key in ("enable_adain", "zero_timestep", "enable_framepack", "enable_motioner", "add_last_motion",
                    "qk_norm", "cross_attn_norm"):
            if key in values and not isinstance(values[key], bool):
                raise ConfigError(f"{source}: {key} must be true or false, got {_short(values[key])}")
        cfg = cls(**values, extra=extra)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "DiTConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config.json not found; point --ckpt_dir at the Wan2.2-S2V-14B folder")
        try:
            raw = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not valid JSON ({err}); re-download config.json from the official checkpoint") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a config.json; re-download it from the official checkpoint") from None
        return cls.from_dict(raw, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d

    def validate(self, source: str = "config") -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        # Numbers first: everything below (and the model build) may allocate or divide by them.
        for name, (lo, hi) in _INT_RANGES.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise bad(f"{name}={value} is outside the sane range [{lo}, {hi}]; use the official Wan2.2-S2V config.json")
        if not (math.isfinite(self.eps) and 0 < self.eps < 1):
            raise bad(f"eps={self.eps} must be a small positive number (official 1e-06); use the official config.json")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise bad(f"rope_theta={self.rope_theta} must be a finite number > 1 (official 10000)")
        params = self.num_layers * (8 * self.dim ** 2 + 2 * self.dim * self.ffn_dim)
        if params > MAX_PARAMETERS:
            raise bad(f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_layers={self.num_layers} describe ~{params / 1e9:.0f}B "
                      f"parameters, above the {MAX_PARAMETERS / 1e9:.0f}B this engine accepts; use the official config.json")
        if self.enable_motioner:
            raise bad("enable_motioner=true (the transformer motioner) is not supported; use the official S2V config (enable_framepack=true)")
        if not self.enable_framepack:
            raise bad("enable_framepack=false is not supported; the S2V-14B checkpoint uses frame-pack motion tokens")
        if not self.enable_adain or self.adain_mode != "attn_norm":
            raise bad(f"enable_adain={self.enable_adain}, adain_mode={self.adain_mode!r} not supported; S2V-14B uses enable_adain=true, adain_mode='attn_norm'")
        if not self.zero_timestep:
            raise bad("zero_timestep=false is not supported; S2V-14B uses zero_timestep=true")
        if not self.add_last_motion:
            raise bad("add_last_motion=false is not supported; S2V-14B uses add_last_motion=true")
        if not self.qk_norm or not self.cross_attn_norm:
            raise bad("qk_norm and cross_attn_norm must be true (as in S2V-14B)")
        if tuple(self.window_size) != (-1, -1):
            raise bad(f"window_size={list(self.window_size)} (local attention) is not supported; use [-1, -1]")
        if self.dim % self.num_heads or self.head_dim % 2:
            raise bad(f"dim={self.dim} must split into num_heads={self.num_heads} heads of even size")
        if self.head_dim < 6:
            raise bad(f"head_dim={self.head_dim} too small for 3-axis RoPE")
        if self.freq_dim % 2:
            raise bad(f"freq_dim={self.freq_dim} must be even")
        if self.dim % 4:
            raise bad(f"dim={self.dim} must be divisible by 4 (audio encoder widths dim/4, dim/2)")
        if tuple(self.patch_size) != (1, 2, 2):
            raise bad(f"patch_size={list(self.patch_size)} not supported; S2V uses [1, 2, 2]")
        layers = list(self.audio_inject_layers)
        if not layers or sorted(set(layers)) != layers or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise bad(f"audio_inject_layers={layers} must be strictly increasing block indices in [0, {self.num_layers})")
        if tuple(self.zip_frame_buckets) != (1, 2, 16):
            raise bad("zip_frame_buckets must be [1, 2, 16] (frame-pack layout of S2V)")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
