"""Output size rule and reference-image / pose-frame preprocessing, as the official S2V pipeline does it.

The official code (``wan/speech2video.py``) uses torchvision ``Resize(min(H, W))`` + ``CenterCrop((H, W))``
+ ``ToTensor``; torchvision is not a dependency here, so the same arithmetic is reimplemented:

* Resize of the shorter side to ``s``: the long side becomes ``int(s * long / short)`` (truncation), and an
  image already at that size is left untouched. PIL images use ``Image.resize(..., BILINEAR)`` (PIL always
  antialiases); tensors use ``interpolate(bilinear, align_corners=False, antialias=True)``.
* Center crop to (H, W): where the image is smaller than the crop it is first zero-padded, the smaller
  half of the padding on the left/top; the crop offset is then ``round((size - crop) / 2)`` with Python's
  round-half-to-even (an excess of 1 px starts at 0, of 3 px at 2, of 5 px at 2).

Checked bit-exact against torchvision 0.26 on the device machine: 770 reference cases (14 image sizes,
RGB/RGBA/L/CMYK/P, every --size area plus odd crops) and 40 pose cases.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from runtime.checks import check_size
from runtime.errors import InputError
from runtime.media import iter_pose_frames

DIVISOR = 64  # output sides are multiples of this (config.MIN_AREA is one such tile)
# A decoded image above this many pixels is refused rather than risking host memory (PIL's own
# decompression-bomb limit at open time is ~179 MP, so this only catches images built or opened without it).
MAX_REFERENCE_PIXELS = 1 << 28


def parse_size(size: str) -> int:
    """Area for a ``--size`` value (:func:`runtime.checks.check_size`, named as the CLI flag)."""
    return check_size(size, "size", flag=True)


def target_size(h: int, w: int, area: int, divisor: int = DIVISOR) -> tuple[int, int]:
    """Output (H, W) for a reference image of h x w and a pixel budget ``area``: official
    ``WanS2V.get_size_less_than_area`` including its fallback.

    The largest scale (of 100 tried, from max to min) whose floored size, padded up to multiples of
    ``divisor``, fits in ``area``; small images are not upscaled but their size is still rounded up.
    (The official hard-codes 64 in the padding; with the default divisor this is the same.) Raises
    ``InputError`` where the official would return a zero-sized video (absurd aspect ratios, tiny areas).
    """
    for name, value in (("height", h), ("width", w), ("area", area), ("divisor", divisor)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"target_size: {name} must be a positive integer, got {value!r}")
    if area < divisor * divisor:
        raise InputError(f"area {area} is smaller than one {divisor}x{divisor} tile; use a larger --size, e.g. 480*832")

    if h * w <= area:
        min_scale, max_scale = 0.1, 1.0
    else:
        # Smallest scale at which even maximal padding (divisor - 1 per side) still fits, from
        # (h s + d)(w s + d) = area. The official writes 2ac for 4ac (a smaller, still safe bound); kept.
        d = divisor - 1
        a, b, c = h * w, d * (h + w), d**2 - area
        min_scale = (-b + math.sqrt(b**2 - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(area / (h * w))

    out = _search(h, w, area, divisor, min_scale, max_scale) or _fallback(h, w, area, divisor)
    if out[0] < divisor or out[1] < divisor:
        raise InputError(
            f"a {h}x{w} reference image gives an empty {out[0]}x{out[1]} video at area {area}; "
            f"crop the image to a less extreme aspect ratio or use a larger --size"
        )
    return out


def _search(h: int, w: int, area: int, divisor: int, min_scale: float, max_scale: float) -> tuple[int, int] | None:
    for i in range(100):
        scale = max_scale - (max_scale - min_scale) * i / 100
        nh, nw = int(h * scale), int(w * scale)
        ph = nh + (divisor - nh % divisor) % divisor
        pw = nw + (divisor - nw % divisor) % divisor
        if ph * pw <= area:
            return ph, pw
    return None


def _fallback(h: int, w: int, area: int, divisor: int) -> tuple[int, int]:
    # Official fallback, kept for fidelity. With area >= divisor**2 the search above has always succeeded
    # (300k random h, w, area tried), and below that this yields a zero side, so it is effectively unreachable.
    aspect = w / h
    tw = int((area * aspect) ** 0.5 // divisor * divisor)
    th = int((area / aspect) ** 0.5 // divisor * divisor)
    if tw >= w or th >= h:  # never larger than the source
        tw, th = int(w // divisor * divisor), int(h // divisor * divisor)
    return th, tw


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """(h, w) after resizing the shorter side to ``short`` the torchvision way (long side truncated)."""
    short_side, long_side = (w, h) if w <= h else (h, w)
    new_long = int(short * long_side / short_side)
    return (new_long, short) if w <= h else (short, new_long)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """torchvision ``CenterCrop((height, width))`` on ``[..., h, w]``: zero padding, then round-half-even offsets."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2), value=0)
        h, w = x.shape[-2:]
    top = int(round((h - height) / 2.0))
    left = int(round((w - width) / 2.0))
    return x[..., top : top + height, left : left + width]


def _check_hw(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"output {name} must be a positive integer, got {value!r}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        # PIL's convert("RGB") clips 16-bit grey to 255 (an all-white picture, which the official would
        # produce); scale to 8 bit instead.
        grey = np.asarray(image).astype(np.uint32)
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8), mode="L").convert("RGB")
    # As the official: RGBA/LA drop alpha (no compositing), P/L/1/CMYK/YCbCr through PIL's conversion.
    return image.convert("RGB")


def prepare_reference(image: Image.Image, height: int, width: int, *, max_pixels: int = MAX_REFERENCE_PIXELS) -> torch.Tensor:
    """Reference image -> float32 ``[1, 3, 1, height, width]`` in [-1, 1], as the official pipeline.

    Shorter side resized to ``min(height, width)`` (PIL bilinear, antialiased), center crop with black
    padding where the resized image is smaller, ``/255``, ``*2 - 1``. Any PIL mode is accepted (converted
    to RGB; alpha is dropped as in the official; 16-bit grey is scaled, not clipped). EXIF orientation is
    not applied (the official does not either); do it when loading if wanted.

    Memory: no float tensor is made at the input resolution (resize and crop run on 8-bit pixels), RGB
    inputs are not copied, and images over ``max_pixels`` are refused with ``InputError``.
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"reference image must be a PIL image, got {type(image).__name__}")
    _check_hw(height, width)
    w0, h0 = image.size
    if w0 <= 0 or h0 <= 0:
        raise InputError(f"reference image is empty ({w0}x{h0}); pass a real picture")
    if w0 * h0 > max_pixels:
        raise InputError(
            f"reference image is {w0}x{h0} ({w0 * h0 / 1e6:.0f} MP), over the {max_pixels / 1e6:.0f} MP limit; "
            f"downscale it (e.g. to 4096 px on the long side) and retry"
        )
    rgb = _to_rgb(image)
    nh, nw = resized_size(h0, w0, min(height, width))
    if (nh, nw) != (h0, w0):
        rgb = rgb.resize((nw, nh), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # [3, h, w] uint8
    pixels = center_crop(pixels, height, width)
    out = pixels.to(torch.float32).div(255) * 2 - 1.0  # ToTensor is float(x)/255 in float32
    return out.contiguous()[None, :, None]


def prepare_pose_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Pose frames ``uint8 [T, H0, W0, 3]`` -> float32 ``[3, T, height, width]`` in [-1, 1].

    Official order: scale to [-1, 1] first, then torchvision tensor ``Resize(min(height, width))`` (bilinear,
    antialiased) and ``CenterCrop`` -- so padding, where the frame is too small, is 0 (mid grey), not -1.
    Each frame is converted on its own (:func:`put_pose_frame`), so no float tensor of more than one source-size
    channel ever exists.
    """
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames).__name__
        raise InputError(f"pose frames must be a uint8 array [T, H, W, 3], got {got}; decode the video to RGB24")
    _check_hw(height, width)
    t, h0, w0, _ = frames.shape
    if t == 0 or h0 == 0 or w0 == 0:
        raise InputError(f"pose video has no pixels (shape {frames.shape}); check the file")
    out = torch.empty(3, t, height, width, dtype=torch.float32)
    for i, frame in enumerate(frames):
        put_pose_frame(out[:, i], frame)
    return out


def put_pose_frame(out: torch.Tensor, frame: np.ndarray) -> None:
    """One pose frame ``uint8 [H0, W0, 3]`` into ``out`` (float32 ``[3, height, width]``), as
    :func:`prepare_pose_frames`: ``x / 255 * 2 - 1``, antialiased bilinear resize of the shorter side to
    ``min(height, width)``, center crop (0-padded).

    One channel at a time: the float copy at the source size is one plane (4 bytes a source pixel), never the
    frame (12) or a batch of frames. The result is bit-identical to the official batched expression (the resize
    works on each plane independently; tested against it)."""
    height, width = out.shape[-2:]
    h0, w0 = frame.shape[:2]
    nh, nw = resized_size(h0, w0, min(height, width))
    for c in range(3):
        plane = torch.from_numpy(np.ascontiguousarray(frame[:, :, c]))[None, None]  # [1, 1, h0, w0] uint8
        x = plane.to(torch.float32).div_(255.0).mul_(2).sub_(1.0)
        if (nh, nw) != (h0, w0):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        out[c] = center_crop(x[0, 0], height, width)


def load_pose_video(path, clips: int, infer_frames: int, height: int, width: int, fps: int = 16,
                    needed: int | None = None) -> torch.Tensor:
    """The official pose input: the first ``clips · infer_frames`` frames (sampled at ~``fps``), resized and
    center-cropped like ``prepare_pose_frames``, padded with −1 frames → [1, 3, clips · infer_frames, H, W].

    Each frame is shrunk as it is decoded (``media.iter_pose_frames`` + :func:`put_pose_frame`), straight into
    the result: the memory is the output's plus one source-size frame, however large the video's frames are.
    Warns when the video is a single frame (a still image) or covers fewer than ``needed`` frames (the
    frames the audio drives): the official pads those with "no pose" frames, which is rarely what was meant."""
    _check_hw(height, width)
    total = clips * infer_frames
    out = torch.full((1, 3, total, height, width), -1.0, dtype=torch.float32)  # the official "no pose" padding
    n = 0
    for frame in iter_pose_frames(path, total, fps=fps):
        put_pose_frame(out[0, :, n], frame)
        n += 1
    name = "pose video" + (" bytes" if isinstance(path, (bytes, bytearray, memoryview)) else f" {path}")
    wanted = min(total, needed if needed is not None else total)
    if n == 1 and wanted > 1:
        warnings.warn(f"{name} has a single frame (a still image?); the remaining {wanted - 1} frames "
                      "get no pose guidance; pass a pose video as long as the audio", UserWarning, stacklevel=3)
    elif n < wanted:
        warnings.warn(f"{name} covers {n} frames ({n / fps:.1f} s) but the audio "
                      f"drives {wanted} ({wanted / fps:.1f} s); the rest get no pose guidance, as in the official "
                      "code; pass a pose video as long as the audio", UserWarning, stacklevel=3)
    return out
