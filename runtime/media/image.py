"""Reference image in: any path/bytes/array/PIL image -> RGB ``PIL.Image``, with size guards.

Every user-fixable problem raises :class:`InputError` with a one-line message naming the problem and the fix.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError
from .common import _check_readable_file

# Smallest accepted image side: the model works on multiples of 64 px; anything under 16 px is
# almost certainly a wrong file (an icon, a 1x1 tracking pixel) rather than a face.
MIN_IMAGE_SIDE = 16
# Largest accepted image (pixels). 160 MP covers 12000x9000 (108 MP) photos while bounding the
# decoded RGB buffer to ~480 MB; Pillow's own bomb guard (2 x 89.5 MP) would refuse at 179 MP.
MAX_IMAGE_PIXELS = 160_000_000


def load_image(src: Any, *, draft: tuple[int, int] | None = None) -> Image.Image:
    """Load a reference image as an RGB ``PIL.Image``.

    ``src``: a path, encoded bytes, a PIL image, or a uint8 numpy array (HxW, HxWx1, HxWx3, HxWx4).
    Alpha is dropped (not composited), as the official ``Image.open(p).convert('RGB')`` does;
    EXIF orientation is *not* applied, also as official. 16-bit greyscale is scaled to 8 bits
    (plain ``convert('RGB')`` would clip it to white).

    Memory: the pixel count is checked from the header *before* decoding, so a bomb never
    allocates. Accepted images are decoded at full size (exact, like official); pass
    ``draft=(w, h)`` to let JPEGs decode at a 1/2, 1/4 or 1/8 DCT scale that still covers
    (w, h) -- much less memory for huge photos, pixels differ slightly from a full decode + resize.
    """
    if isinstance(src, Image.Image):
        _check_image_size(src.size, "image")
        return _to_rgb(src, "image")
    if isinstance(src, np.ndarray):
        return _image_from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if not data:
            raise InputError("image bytes are empty; pass the contents of a PNG/JPEG/WebP file")
        return _decode_image(io.BytesIO(data), "image bytes", draft)
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        _check_readable_file(path, "image")
        with open(path, "rb") as fh:
            return _decode_image(fh, str(path), draft)
    raise InputError(f"unsupported image source of type {type(src).__name__}; "
                     "pass a path, bytes, a PIL image or a uint8 numpy array")


def _decode_image(fh, name: str, draft: tuple[int, int] | None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # We apply our own, documented limit; Pillow's warning band (89-179 MP) is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fh)
            _check_image_size(im.size, name)
            if draft is not None:
                im.draft(None, (int(draft[0]), int(draft[1])))
            im.load()
    except InputError:
        raise
    except Image.DecompressionBombError:
        raise InputError(f"{name} is larger than {MAX_IMAGE_PIXELS:,} pixels; "
                         "downscale it before use") from None
    except Image.UnidentifiedImageError:
        raise InputError(f"{name} is not a readable image; pass a PNG, JPEG or WebP file") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow plugins raise many types on corrupt data (OSError, SyntaxError, ...)
        raise InputError(f"{name} is corrupt or truncated ({type(exc).__name__}: {exc}); "
                         "re-export the image as PNG or JPEG") from None
    return _to_rgb(im, name)


def _check_image_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise InputError(f"{name} is {w}x{h} px, below the {MIN_IMAGE_SIDE} px minimum side; "
                         "use a real photo of the subject")
    if w * h > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} is {w}x{h} px, more than {MAX_IMAGE_PIXELS:,} pixels; "
                         "downscale it before use")


def _image_from_array(a: np.ndarray) -> Image.Image:
    if a.dtype != np.uint8:
        raise InputError(f"image array has dtype {a.dtype}; convert it to uint8 (0-255) first")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise InputError(f"image array has shape {a.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    _check_image_size((a.shape[1], a.shape[0]), "image array")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[a.shape[2] if a.ndim == 3 else 2]
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a), mode=mode), "image array")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    try:
        if im.mode.startswith("I;16") or im.mode == "I":
            arr = np.asarray(im, dtype=np.int64)
            if im.mode != "I" or arr.max(initial=0) > 255:
                arr = arr >> 8  # 16-bit samples -> 8 bits
            im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
        if im.mode == "La":  # premultiplied alpha has no direct path to RGB in Pillow
            im = im.convert("LA")
        if im.mode == "RGB":
            # fromarray() images share the caller's numpy buffer (readonly); detach them.
            return im.copy() if im.readonly else im
        return im.convert("RGB")
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"{name} has pixel mode {im.mode!r} that cannot be converted to RGB "
                         f"({exc}); re-export it as 8-bit RGB PNG or JPEG") from None
