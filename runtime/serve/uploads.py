"""Checks on a ``POST /v1/videos`` request, done before the job is queued.

Every problem becomes a :class:`RequestError` naming the form field; the API turns it into a JSON error with
status 400 (unusable) or 413 (over a limit). Files are decoded once here with the same loaders the pipeline
uses, so a job that enters the queue does not fail later on its inputs.
"""
from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.config import MAX_SEED, RUN, SOLVERS
from runtime.errors import InputError

FILE_FIELDS = ("image", "audio", "pose_video")
_SUFFIX_MAX = 8


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 200 << 20      # one request, all files together
    max_audio_s: float = 600.0
    max_area: int = 1280 * 720             # output pixels (the --size area)
    max_steps: int = 100
    max_infer_frames: int = 160


class RequestError(Exception):
    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


def parse_fields(form: dict[str, str], limits: Limits, default_size: str) -> dict[str, Any]:
    """Form text fields → generate() keyword arguments (unknown fields are refused, not ignored)."""
    from runtime.preprocess import parse_size

    known = {"prompt", "negative_prompt", "seed", "sample_steps", "infer_frames", "size", "num_clip", "guide_scale",
             "sample_shift", "sample_solver", "start_from_ref", "model"}
    for name in form:
        if name not in known:
            raise RequestError(name, f"unknown field {name!r}; accepted: image, audio, pose_video, "
                                     f"{', '.join(sorted(known))}")
    out: dict[str, Any] = {
        "prompt": form.get("prompt", ""),
        "negative_prompt": form.get("negative_prompt", ""),
        "seed": _int(form, "seed", random.randint(0, 2**31 - 1), 0, MAX_SEED),
        "sample_steps": _int(form, "sample_steps", RUN.sample_steps, 1, limits.max_steps),
        "infer_frames": _int(form, "infer_frames", RUN.infer_frames, 4, limits.max_infer_frames),
        "guide_scale": _float(form, "guide_scale", RUN.guide_scale, 0.0, 100.0),
        "sample_shift": _float(form, "sample_shift", RUN.sample_shift, 0.01, 100.0),
        "sample_solver": form.get("sample_solver", RUN.solver),
        "start_from_ref": _bool(form, "start_from_ref"),
        "size": form.get("size", default_size).strip(),
    }
    if out["infer_frames"] % 4:
        raise RequestError("infer_frames", f"infer_frames={out['infer_frames']} must be a multiple of 4 (e.g. 48 or 80)")
    if "num_clip" in form and form["num_clip"].strip():
        out["num_clip"] = _int(form, "num_clip", None, 1, 10_000)
    if out["sample_solver"] not in SOLVERS:
        raise RequestError("sample_solver", f"sample_solver={out['sample_solver']!r}; use one of {', '.join(SOLVERS)}")
    try:
        area = parse_size(out["size"])
    except InputError as exc:
        raise RequestError("size", str(exc).replace("--size", "size")) from None
    if area > limits.max_area:
        raise RequestError("size", f"size {out['size']} is {area} px, over this server's limit of {limits.max_area} px; "
                                   "ask for a smaller size", 413)
    return out


def check_files(folder: Path, files: dict[str, Path], limits: Limits) -> None:
    """Decode each saved upload with the pipeline's own loaders; raise RequestError naming the bad one."""
    from runtime.media import load_audio, load_image, read_pose_frames

    for name in ("image", "audio"):
        if name not in files:
            raise RequestError(name, f"missing file field {name!r}; send it as multipart/form-data")
    try:
        load_image(folder / files["image"], draft=(2048, 2048))
    except InputError as exc:
        raise RequestError("image", str(exc)) from None
    try:
        # The loader refuses audio over the limit before decoding it when the container declares its length.
        clip = load_audio(folder / files["audio"], max_seconds=limits.max_audio_s)
    except InputError as exc:
        if "s limit" in str(exc):
            raise RequestError("audio", f"audio is over this server's limit of {limits.max_audio_s:g} s "
                                        "(--max_audio_s); send a shorter recording", 413) from None
        raise RequestError("audio", str(exc)) from None
    if clip.native_duration_s > limits.max_audio_s:  # the loader's own rounding aside, the same limit
        raise RequestError("audio", f"audio lasts {clip.native_duration_s:.1f} s, over this server's limit of "
                                    f"{limits.max_audio_s:g} s (--max_audio_s); send a shorter recording", 413)
    if "pose_video" in files:
        try:
            read_pose_frames(folder / files["pose_video"], 1)
        except InputError as exc:
            raise RequestError("pose_video", str(exc)) from None


def save_upload(upload, field: str, folder: Path, budget: int) -> tuple[Path, int]:
    """Copy one uploaded file into the job folder as ``<field><suffix>``; returns (name, bytes) within ``budget``."""
    suffix = Path(upload.filename or "").suffix.lower()
    if not suffix[1:].isalnum() or len(suffix) > _SUFFIX_MAX:
        suffix = ""  # the loaders sniff the content; the suffix is only a hint for people browsing --data_dir
    name = Path(field + suffix)
    written = 0
    with open(folder / name, "wb") as fh:
        upload.file.seek(0)
        while chunk := upload.file.read(1 << 20):
            written += len(chunk)
            if written > budget:
                raise RequestError(field, f"uploads exceed this server's limit of {_mib(budget)} per request; "
                                          "send smaller files", 413)
            fh.write(chunk)
    if written == 0:
        raise RequestError(field, f"{field} file is empty; send the file's contents")
    return name, written


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def _number(form, name, default, lo, hi, cast, what):
    raw = form.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = cast(raw.strip())
    except ValueError:
        raise RequestError(name, f"{name}={raw!r} is not {what}") from None
    if (cast is float and not math.isfinite(v)) or not lo <= v <= hi:
        fmt = "{:g}" if cast is float else "{}"
        raise RequestError(name, f"{name}={v} is out of range; use {fmt.format(lo)}..{fmt.format(hi)}")
    return v


def _int(form, name, default, lo, hi):
    return _number(form, name, default, lo, hi, int, "an integer")


def _float(form, name, default, lo, hi):
    return _number(form, name, default, lo, hi, float, "a number")


def _bool(form, name) -> bool:
    raw = form.get(name, "false").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(name, f"{name}={raw!r} is not a boolean; use true or false")
