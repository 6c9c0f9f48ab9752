"""TensorRT optimization profiles for the DiT and VAE graphs.

The sizes come from the official target-size rule: every (height, width) it can produce for the 480p–720p
areas of ``--size`` at aspect ratios from 1:3 to 3:1, with 48–80 frames per clip. The DiT gets two
profiles, first clip (reference tokens only) and later clips (+ frame-pack motion tokens), both tuned
(``opt``) for 704×1024 at 80 frames, the project's headline shape.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from runtime.config import SIZE_AREAS, DiTConfig
from runtime.models.rope import s2v_token_groups
from runtime.preprocess import target_size
from runtime.sampler import latent_frames

AREAS = sorted(set(SIZE_AREAS.values()))
FRAMES = (48, 80)
OPT_SIZE = (704, 1024)


def reachable_sizes(areas=AREAS, ratios: int = 241) -> set[tuple[int, int]]:
    """Every target size the official rule returns for these areas and aspect ratios 1:3 … 3:1."""
    sizes = set()
    for area in areas:
        for i in range(ratios):
            r = 3.0 ** (2 * i / (ratios - 1) - 1)  # h/w from 1/3 to 3, geometric
            h, w = max(1, round(1000 * r ** 0.5)), max(1, round(1000 / r ** 0.5))
            sizes.add(target_size(h, w, area))
    return sizes


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class DiTProfile:
    name: str          # "first" or "later"
    batch: Range
    frames: Range      # latent frames
    grid_h: Range      # patch grid = pixel height / 16
    grid_w: Range
    extra: Range       # reference (+ motion) tokens

    def shapes(self, cfg: DiTConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """min/opt/max shape of every graph input (names as ``export.onnx_dit.INPUT_NAMES``)."""
        d, n = cfg.dim, cfg.head_dim // 2
        nt = (cfg.head_dim - 4 * (cfg.head_dim // 6)) // 2
        nh = (cfg.head_dim // 6)

        def at(k: str):
            b, f, gh, gw, e = (getattr(getattr(self, a), k) for a in ("batch", "frames", "grid_h", "grid_w", "extra"))
            return {"x": (b, cfg.in_dim, f, 2 * gh, 2 * gw), "t_freq": (b, cfg.freq_dim), "context": (b, cfg.text_len, d),
                    "audio_tokens": (b, f, cfg.num_audio_token + 1, d), "audio_global": (b, f, d),
                    "pose": (b, f, gh, gw, d), "extra": (b, e, d), "rope_t": (f, nt, 2), "rope_h": (gh, nh, 2),
                    "rope_w": (gw, nh, 2), "rope_extra": (e, n, 2)}

        lo, op, hi = at("min"), at("opt"), at("max")
        return {k: (lo[k], op[k], hi[k]) for k in lo}

    def to_dict(self) -> dict:
        return asdict(self)


def extra_tokens(cfg: DiTConfig, height: int, width: int, motion: bool) -> int:
    groups = s2v_token_groups(cfg, 1, height // 8, width // 8, motion)
    return sum(g.num_tokens for g in groups[1:])


def dit_profiles(cfg: DiTConfig, sizes: set[tuple[int, int]] | None = None, frames=FRAMES, batch=(1, 2, 2),
                 opt_size=OPT_SIZE, opt_frames: int = 80) -> list[DiTProfile]:
    sizes = sizes or reachable_sizes()
    gh = [h // 16 for h, _ in sizes]
    gw = [w // 16 for _, w in sizes]
    lat = [latent_frames(f) for f in frames]
    profiles = []
    for name, motion in (("first", False), ("later", True)):
        ext = [extra_tokens(cfg, h, w, motion) for h, w in sizes]
        profiles.append(DiTProfile(
            name, Range(*batch), Range(min(lat), latent_frames(opt_frames), max(lat)),
            Range(min(gh), opt_size[0] // 16, max(gh)), Range(min(gw), opt_size[1] // 16, max(gw)),
            Range(min(ext), extra_tokens(cfg, *opt_size, motion), max(ext))))
    return profiles


def covers(profile: DiTProfile, frames: int, grid_h: int, grid_w: int, extra: int, batch: int = 1) -> bool:
    val = {"batch": batch, "frames": frames, "grid_h": grid_h, "grid_w": grid_w, "extra": extra}
    return all(getattr(profile, k).min <= v <= getattr(profile, k).max for k, v in val.items())


def vae_profile(sizes: set[tuple[int, int]] | None = None, opt_size: tuple[int, int] | None = None) -> dict[str, Range]:
    """Pixel height/width ranges (multiples of 64) for the VAE graphs."""
    sizes = sizes or reachable_sizes()
    opt = opt_size or OPT_SIZE
    hs, ws = [h for h, _ in sizes], [w for _, w in sizes]
    return {"height": Range(min(hs), opt[0], max(hs)), "width": Range(min(ws), opt[1], max(ws))}
