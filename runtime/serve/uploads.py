"""Checks on a ``POST /v1/videos`` request, done before the job is queued.

Every problem becomes a :class:`RequestError` naming the form field; the API turns it into a JSON error with
status 400 (unusable) or 413 (over a limit). Files are decoded once here with the same loaders the pipeline
uses, so a job that enters the queue does not fail later on its inputs. Messages never name server paths
(:func:`scrub`). Text fields must be UTF-8 and numbers ASCII digits; the multipart body is parsed by
:class:`StrictMultiPartParser` (Starlette's, with those rules and a size cap on text fields).
"""
from __future__ import annotations

import math
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.formparsers import MultiPartParser

from runtime import checks
from runtime.config import RUN
from runtime.errors import InputError

FILE_FIELDS = ("image", "audio", "pose_video")
_SUFFIX_MAX = 8
_INT = re.compile(r"[0-9]+\Z")
_FLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
POSE_FPS = 16


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 200 << 20      # one request, all files together
    max_audio_s: float = 600.0
    max_area: int = 1280 * 720             # output pixels (the --size area)
    max_steps: int = 100
    max_infer_frames: int = 160
    max_prompt_bytes: int = 4096           # prompt and negative_prompt, UTF-8 bytes each
    max_pose_pixels: int = 1920 * 1080     # per pose frame (they are resized to the output anyway)
    max_pose_bytes: int = 8 << 30          # what the pipeline holds for the pose: source frames and prepared tensor


class RequestError(Exception):
    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


def parse_fields(form: dict[str, str], limits: Limits, default_size: str, recipe: dict | None = None) -> dict[str, Any]:
    """Form text fields → generate() keyword arguments (unknown fields are refused, not ignored; ``model`` is the
    caller's to read). ``recipe``: the job model's sample_steps / guide_scale / sample_shift for a job that does
    not set them (default: the official recipe)."""
    recipe = {"sample_steps": RUN.sample_steps, "guide_scale": RUN.guide_scale, "sample_shift": RUN.sample_shift,
              **(recipe or {})}
    known = {"prompt", "negative_prompt", "seed", "sample_steps", "infer_frames", "size", "num_clip", "guide_scale",
             "sample_shift", "sample_solver", "start_from_ref", "model", "cache"}
    for name in form:
        if name not in known:
            raise RequestError(name, f"unknown field {name!r}; accepted: image, audio, pose_video, "
                                     f"{', '.join(sorted(known))}")
    for name in ("prompt", "negative_prompt"):
        n = len(form.get(name, "").encode())
        if n > limits.max_prompt_bytes:
            raise RequestError(name, f"{name} is {n} bytes, over this server's limit of {limits.max_prompt_bytes}; "
                                     "send a shorter text", 413)
    # Text → number here (ASCII digits only); what a value may be is checked by the functions the CLI and the
    # library use (runtime.checks), with this server's limits as the bounds.
    out: dict[str, Any] = {
        "prompt": form.get("prompt", ""),
        "negative_prompt": form.get("negative_prompt", ""),
        "seed": _checked("seed", checks.check_seed, _int(form, "seed", random.randint(0, 2**31 - 1)),
                         random_hint=False),
        "sample_steps": _checked("sample_steps", checks.check_sample_steps,
                                 _int(form, "sample_steps", recipe["sample_steps"]), hi=limits.max_steps),
        "infer_frames": _checked("infer_frames", checks.check_infer_frames, _int(form, "infer_frames", RUN.infer_frames),
                                 hi=limits.max_infer_frames),
        "guide_scale": _checked("guide_scale", checks.check_guide_scale,
                                _float(form, "guide_scale", recipe["guide_scale"]), lo=0.0, hi=100.0),
        "sample_shift": _checked("sample_shift", checks.check_sample_shift,
                                 _float(form, "sample_shift", recipe["sample_shift"]), lo=0.01, hi=100.0),
        "sample_solver": _checked("sample_solver", checks.check_solver, form.get("sample_solver", RUN.solver)),
        "start_from_ref": _bool(form, "start_from_ref"),
        "size": form.get("size", default_size).strip(),
    }
    if form.get("cache", "").strip():  # the step cache of this job (the model's when absent): opt-in and lossy
        from runtime.cache import CacheSpec
        from runtime.errors import S2VError

        try:
            out["cache"] = str(CacheSpec.parse(form["cache"]))
        except S2VError as exc:
            raise RequestError("cache", str(exc)) from None
    if "num_clip" in form and form["num_clip"].strip():
        out["num_clip"] = _checked("num_clip", checks.check_num_clip, _int(form, "num_clip", None), hi=10_000)
    area = _checked("size", checks.check_size, out["size"])
    if area > limits.max_area:
        raise RequestError("size", f"size {out['size']} is {area} px, over this server's limit of {limits.max_area} px; "
                                   "ask for a smaller size", 413)
    return out


def check_files(folder: Path, files: dict[str, Path], limits: Limits, params: dict[str, Any]) -> float:
    """Decode each saved upload with the pipeline's own loaders; raise RequestError naming the bad one (and no
    server path). Returns the audio's length in seconds."""
    from runtime.media import load_audio, load_image

    for name in ("image", "audio"):
        if name not in files:
            raise RequestError(name, f"missing file field {name!r}; send it as multipart/form-data")
    try:
        load_image(folder / files["image"], draft=(2048, 2048))
    except InputError as exc:
        raise RequestError("image", scrub(str(exc), folder, files)) from None
    try:
        # The loader refuses audio over the limit before decoding it when the container declares its length.
        clip = load_audio(folder / files["audio"], max_seconds=limits.max_audio_s)
    except InputError as exc:
        if "s limit" in str(exc):
            raise RequestError("audio", f"audio is over this server's limit of {limits.max_audio_s:g} s "
                                        "(--max_audio_s); send a shorter recording", 413) from None
        raise RequestError("audio", scrub(str(exc), folder, files)) from None
    if clip.native_duration_s > limits.max_audio_s:  # the loader's own rounding aside, the same limit
        raise RequestError("audio", f"audio lasts {clip.native_duration_s:.1f} s, over this server's limit of "
                                    f"{limits.max_audio_s:g} s (--max_audio_s); send a shorter recording", 413)
    if "pose_video" in files:
        check_pose(folder / files["pose_video"], clip.native_duration_s, params, limits)
    return clip.native_duration_s


def check_pose(path: Path, audio_s: float, params: dict[str, Any], limits: Limits) -> None:
    """Bound the pose video's cost before any frame is decoded (at upload and again in the worker): frames of at
    most ``max_pose_pixels``, and the bytes the pipeline would hold for them (the frames it reads at source size,
    and the prepared float32 pose at the output size for every clip) within ``max_pose_bytes``. The stream is
    demuxed, not decoded; one frame is decoded to check that it is a readable video."""
    import av

    from runtime.media import read_pose_frames
    from runtime.preprocess import parse_size

    name = "pose_video"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise RequestError(name, "pose_video has no video stream; send a pose video (mp4/mkv)")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > limits.max_pose_pixels:
                raise RequestError(name, f"pose_video frames are {w}x{h} px, over this server's limit of "
                                         f"{limits.max_pose_pixels:,} px per frame; downscale it (its frames are "
                                         "resized to the output size anyway)", 413)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            interval = max(1, round(float(rate) / POSE_FPS)) if rate else 1
            frames_f = int(params.get("infer_frames", RUN.infer_frames))
            clips = math.floor(audio_s * POSE_FPS / frames_f) + 2        # the official count, with a margin
            if params.get("num_clip"):
                clips = min(clips, int(params["num_clip"]))
            total = clips * frames_f                                      # pose frames the pipeline prepares
            packets = 0
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                    if packets >= total * interval:
                        break
    except RequestError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any demuxer failure is an unreadable upload
        raise RequestError(name, f"pose_video is not a readable video ({type(exc).__name__}); re-encode it as "
                                 "H.264 mp4") from None
    read = min(total, -(-packets // interval))
    need = read * w * h * 3 * 2 + total * parse_size(params["size"]) * 4 * 3 * 2   # list + stack; tensor + pad copy
    if need > limits.max_pose_bytes:
        raise RequestError(name, f"pose_video would take about {need >> 20} MiB to prepare for this audio, over "
                                 f"this server's limit of {limits.max_pose_bytes >> 20} MiB; send a pose video with "
                                 "smaller frames, a shorter audio, or a smaller size", 413)
    try:
        read_pose_frames(path, 1)
    except InputError as exc:
        raise RequestError(name, scrub(str(exc), path.parent, {name: path.name})) from None


def scrub(message: str, folder: Path, files: dict[str, Any], root: Path | None = None) -> str:
    """``message`` without server paths: an input file's path becomes its field name, the job folder and the data
    folder become placeholders."""
    for field, name in files.items():
        message = message.replace(str(Path(folder) / name), field)
    message = message.replace(str(folder), "<job folder>")
    if root is not None:
        message = message.replace(str(root), "<data_dir>")
    return message


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


def _checked(name: str, check, value, **bounds):
    """``check(value, name, **bounds)`` (a runtime.checks function), its refusal as this field's 400."""
    try:
        return check(value, name, **bounds)
    except InputError as exc:
        raise RequestError(name, str(exc)) from None


def _number(form, name, default, cast, what):
    raw = form.get(name)
    if raw is None or not raw.strip():
        return default
    # ASCII digits only: Python's int()/float() also take "1_000", "٣", "nan" and "inf".
    if not (_INT if cast is int else _FLOAT).match(raw.strip()):
        raise RequestError(name, f"{name}={raw!r} is not {what} (ASCII digits)")
    try:
        return cast(raw.strip())
    except ValueError:
        raise RequestError(name, f"{name}={raw!r} is not {what}") from None


def _int(form, name, default):
    return _number(form, name, default, int, "an integer")


def _float(form, name, default):
    return _number(form, name, default, float, "a number")


def _bool(form, name) -> bool:
    raw = form.get(name, "false").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(name, f"{name}={raw!r} is not a boolean; use true or false")


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser with the rules of this API: text fields are UTF-8 (Starlette falls back to
    latin-1 silently) and at most ``max_text_bytes`` each (413, naming the field)."""

    def __init__(self, *args, max_text_bytes: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_text_bytes = max_text_bytes

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._current_part
        if part.file is None and len(part.data) + end - start > self.max_text_bytes:
            raise RequestError(part.field_name, f"{part.field_name} is over this server's limit of "
                                                f"{self.max_text_bytes} bytes for a text field; send a shorter text", 413)
        super().on_part_data(data, start, end)

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            return super().on_part_end()
        try:
            value = bytes(part.data).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(part.field_name, f"{part.field_name} is not valid UTF-8; send text fields as UTF-8") \
                from None
        self.items.append((part.field_name, value))
