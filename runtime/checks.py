"""The checks on a run's settings (steps, shift, guide scale, seed, solver, frames, clips, size, output name), written
once.

The CLI (``runtime.generate``), the library (``SampleOptions`` and ``S2VPipeline.generate``) and the service's form
fields (``runtime.serve.uploads``) call these, so a value means the same and is refused the same way everywhere.
Each check names the value as its caller spells it: ``flag=True`` reads ``--sample_steps 0`` (a command-line
flag), otherwise ``sample_steps=0`` (a keyword argument or a form field); the caller passes its own name for the
setting (the CLI's ``--sample_guide_scale`` is the library's ``guide_scale``). A service passes its own, tighter
limits as the bounds; the defaults are what the engine itself accepts. Every refusal is one ``InputError`` line.

Torch-free on purpose: the CLI imports this before its signal handlers are installed.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

from runtime.config import MAX_AREA, MAX_SEED, MAX_STEPS, MIN_AREA, RUN, SIZE_AREAS, SOLVERS
from runtime.errors import InputError, OutputError

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[*xX]\s*(\d+)\s*$")
_CFG_NOTE = f"official default {RUN.guide_scale:g}; 1 or less turns CFG off"


def said(name: str, value, flag: bool = False) -> str:
    """How a message names a value: ``--name value`` for a command-line flag, ``name=value`` otherwise."""
    shown = repr(value) if isinstance(value, str) else value
    return f"--{name} {shown}" if flag else f"{name}={shown}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _out_of_range(subject: str, lo, hi, note: str = "") -> InputError:
    fmt = "{:g}" if isinstance(lo, float) or isinstance(hi, float) else "{}"
    return InputError(f"{subject}: out of range; use {fmt.format(lo)}..{fmt.format(hi)}" + (f" ({note})" if note else ""))


def check_sample_steps(value, name: str = "sample_steps", flag: bool = False, hi: int = MAX_STEPS) -> int:
    if not _is_int(value) or not 1 <= value <= hi:
        raise InputError(f"{said(name, value, flag)}: must be an integer in [1, {hi}] "
                         f"(official default {RUN.sample_steps})")
    return value


def check_sample_shift(value, name: str = "sample_shift", flag: bool = False,
                       lo: float = 0.0, hi: float = math.inf) -> float:
    subject = said(name, value, flag)
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{subject}: must be a positive finite number (official default {RUN.sample_shift:g})")
    if not lo <= value <= hi:
        raise _out_of_range(subject, float(lo), float(hi), f"official default {RUN.sample_shift:g}")
    return value


def check_guide_scale(value, name: str = "guide_scale", flag: bool = False,
                      lo: float = -math.inf, hi: float = math.inf) -> float:
    subject = said(name, value, flag)
    if not _is_real(value) or not math.isfinite(value):
        raise InputError(f"{subject}: must be a finite number ({_CFG_NOTE})")
    if not lo <= value <= hi:
        raise _out_of_range(subject, float(lo), float(hi), _CFG_NOTE)
    return value


def check_seed(value, name: str = "seed", flag: bool = False, random_hint: bool = True) -> int:
    """A seed in [0, 2**63 - 1]. -1 (a random seed) is resolved by the callers that accept it, before this check;
    ``random_hint`` says so in the message."""
    if not _is_int(value) or not 0 <= value <= MAX_SEED:
        hint = ", or -1 for a random seed" if random_hint else ""
        raise InputError(f"{said(name, value, flag)}: must be in [0, 2**63 - 1]{hint}")
    return value


def check_solver(value, name: str = "sample_solver", flag: bool = False) -> str:
    if value not in SOLVERS:
        raise InputError(f"{said(name, value, flag)}: unknown sample solver; choose one of: {', '.join(SOLVERS)}")
    return value


def check_infer_frames(value, name: str = "infer_frames", flag: bool = False, hi: int | None = None) -> int:
    subject = said(name, value, flag)
    if not _is_int(value) or value <= 0 or value % 4:
        raise InputError(f"{subject}: must be a positive multiple of 4 (e.g. 48 or 80)")
    if hi is not None and value > hi:
        raise _out_of_range(subject, 4, hi)
    return value


def check_num_clip(value, name: str = "num_clip", flag: bool = False, hi: int | None = None) -> int:
    subject = said(name, value, flag)
    if not _is_int(value) or value <= 0:
        raise InputError(f"{subject}: must be a positive integer (or omit it to follow the audio length)")
    if hi is not None and value > hi:
        raise _out_of_range(subject, 1, hi)
    return value


def check_mp4_name(path, flag: str = "path") -> None:
    """The output is always H.264/AAC in MP4; another extension would mislabel it."""
    if Path(path).suffix.lower() != ".mp4":
        raise OutputError(f"{flag} {path}: the output is an MP4 video; give a file name ending in .mp4")


def check_size(value, name: str = "size", flag: bool = False) -> int:
    """The pixel area of a size ``H*W`` (or ``HxW``).

    Accepts the official s2v strings (``SIZE_AREAS``) and, beyond the official, any well-formed ``H*W`` of positive
    integers with ``64*64 <= H*W <= 1920*1080``; sides need not be multiples of anything since only the product is
    used as a pixel budget (the output's aspect follows the reference image)."""
    subject = said(name, value, flag)
    if not isinstance(value, str):
        raise InputError(f"{subject}: must be a string like '480*832'")
    key = value.strip()
    if key in SIZE_AREAS:
        return SIZE_AREAS[key]
    match = _SIZE_RE.match(key)
    if not match:
        raise InputError(f"{subject} is not of the form H*W; use one of {', '.join(SIZE_AREAS)} (or any H*W, "
                         "e.g. 480*832)")
    h, w = int(match[1]), int(match[2])
    if h * w < MIN_AREA:
        raise InputError(f"{subject} gives an area of {h * w} px, below the minimum {MIN_AREA} (64*64); "
                         "use e.g. 480*832")
    if h * w > MAX_AREA:
        raise InputError(f"{subject} gives an area of {h * w:,} px, above the maximum {MAX_AREA:,} (1920*1080; "
                         "the model was trained up to 1280*720); use e.g. 1280*720")
    return h * w
