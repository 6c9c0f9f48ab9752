"""Size rule and reference / pose preprocessing against the official behaviour."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import InputError
from runtime.preprocess import (
    _fallback,
    SIZE_AREAS,
    center_crop,
    parse_size,
    prepare_pose_frames,
    prepare_reference,
    resized_size,
    target_size,
)

from tests.conftest import golden_dir, golden_manifest


# ---------------------------------------------------------------------------------------------
# target size
def test_golden_target_size():
    from runtime.golden_checks.target_size import check

    manifest = golden_manifest()
    rows = check(golden_dir(), manifest)
    assert len(rows) == len(manifest["target_size"]) > 0
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


@pytest.mark.parametrize(
    "h,w,area,out",
    [  # examples worked out in the specs (dit spec §5.1, components spec §7) and the e2e golden
        (704, 1024, 720896, (704, 1024)),
        (720, 1280, 720896, (640, 1088)),
        (1080, 1920, 720896, (640, 1088)),
        (1024, 1024, 720896, (832, 832)),
        (512, 512, 720896, (512, 512)),
        (768, 1024, 720896, (704, 960)),
        (480, 832, 399360, (448, 832)),
        (720, 1280, 399360, (448, 832)),
        (720, 1280, 921600, (704, 1280)),
        (1024, 1024, 399360, (576, 576)),
        (1024, 1024, 921600, (960, 960)),
        (100, 140, 8192, (64, 128)),
        # Pins of two official quirks, computed with the official rule (not in the golden set): the
        # quadratic's "2ac" (4ac would give 960x704 / 576x1600) and the i/100 scale grid (i/99 would
        # give 704x384).
        (5130, 4029, 720896, (896, 704)),
        (1806, 5629, 921600, (512, 1600)),
        (4479, 2440, 307200, (768, 384)),
    ],
)
def test_target_size_examples(h, w, area, out):
    assert target_size(h, w, area) == out


@settings(max_examples=400, deadline=None)
@given(
    h=st.integers(32, 6000),
    aspect=st.floats(0.25, 4.0),
    area=st.sampled_from(sorted(set(SIZE_AREAS.values())) + [8192, 307200]),
)
def test_target_size_invariants(h, aspect, area):
    w = max(1, int(h * aspect))
    H, W = target_size(h, w, area)
    assert H % 64 == 0 and W % 64 == 0 and H >= 64 and W >= 64
    assert H * W <= area
    if h * w <= area:  # no upscaling: only rounded up to the next multiple of 64
        assert H < h + 64 and W < w + 64
    # Aspect kept up to the padding: one scale s makes int(h*s) and int(w*s) both round up to (H, W),
    # i.e. the intervals of s allowed by each side overlap.
    lo = max((H - 63) / h, (W - 63) / w)
    hi = min((H + 1) / h, (W + 1) / w)
    assert lo < hi


def test_target_size_rejects_degenerate():
    with pytest.raises(InputError, match="aspect"):
        target_size(1, 399360, 399360)
    with pytest.raises(InputError, match="64x64"):
        target_size(100, 100, 1000)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(InputError):
            target_size(bad, 100, 399360)


def test_target_size_zero_rows_and_fallback_rule():
    # 5 x 3000 at area 4096: the official search accepts 0 x 640 (int(5 * s) == 0); we refuse it.
    with pytest.raises(InputError, match="empty 0x640"):
        target_size(5, 3000, 4096)
    # The official aspect-ratio fallback (unreachable through target_size in practice, see _fallback):
    assert _fallback(100, 200, 8192, 64) == (64, 128)
    assert _fallback(50, 100, 8192, 64) == (0, 64)  # would exceed the source: floor the source instead


def test_parse_size():
    for key, area in SIZE_AREAS.items():
        assert parse_size(key) == area
    assert len(SIZE_AREAS) == 8 and SIZE_AREAS["1024*704"] == 720896 and SIZE_AREAS["480*832"] == 399360
    assert parse_size(" 480x832 ") == 399360
    assert parse_size("64*128") == 8192
    for bad in ("480", "480*", "a*b", "480*832*2", "-480*832", "", "480.5*832"):
        with pytest.raises(InputError, match=r"H\*W"):
            parse_size(bad)
    with pytest.raises(InputError, match="minimum"):
        parse_size("16*16")
    with pytest.raises(InputError):
        parse_size(480)  # type: ignore[arg-type]
    msg = None
    try:
        parse_size("big")
    except InputError as err:
        msg = str(err)
    assert msg is not None and "\n" not in msg and "720*1280" in msg


# ---------------------------------------------------------------------------------------------
# resize / crop arithmetic
def test_resized_size_truncates_long_side():
    assert resized_size(100, 140, 64) == (64, 89)  # 89.6
    assert resized_size(333, 500, 384) == (384, 576)  # 576.58
    assert resized_size(1280, 720, 704) == (1251, 704)  # portrait: 1251.56
    assert resized_size(480, 480, 448) == (448, 448)
    assert resized_size(64, 100, 64) == (64, 100)  # already there


@pytest.mark.parametrize(
    "h,w,H,W,top,left",
    [
        (64, 100, 64, 64, 0, 18),  # even excess 36 -> 18
        (64, 67, 64, 64, 0, 2),  # excess 3: round(1.5) = 2
        (64, 65, 64, 64, 0, 0),  # excess 1: round(0.5) = 0 (half to even)
        (69, 64, 64, 64, 2, 0),  # excess 5: round(2.5) = 2
        (71, 64, 64, 64, 4, 0),  # excess 7: round(3.5) = 4
    ],
)
def test_center_crop_offsets(h, w, H, W, top, left):
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    out = center_crop(torch.stack([yy, xx]), H, W)
    assert out.shape == (2, H, W)
    assert int(out[0, 0, 0]) == top and int(out[1, 0, 0]) == left


@pytest.mark.parametrize("w,left,right", [(40, 12, 12), (41, 11, 12), (1, 31, 32)])
def test_center_crop_pads_smaller_half_first(w, left, right):
    x = torch.ones(1, 64, w)
    out = center_crop(x, 64, 64)
    cols = out[0, 0]
    assert out.shape == (1, 64, 64)
    assert cols[:left].eq(0).all() and cols[left : 64 - right].eq(1).all() and cols[64 - right :].eq(0).all()


# ---------------------------------------------------------------------------------------------
# reference image
def _coord_image(h: int, w: int) -> Image.Image:
    """R = column, G = row, B = 7: every output pixel says where it came from."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = np.arange(w)[None, :]
    arr[..., 1] = np.arange(h)[:, None]
    arr[..., 2] = 7
    return Image.fromarray(arr, mode="RGB")


def _to_u8(t: torch.Tensor) -> np.ndarray:
    # inverse of x/255*2-1, exact for the 256 levels
    return torch.round((t[0, :, 0] + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()


def test_reference_crop_without_resize():
    ref = prepare_reference(_coord_image(64, 103), 64, 64)  # shorter side already 64: crop only, excess 39
    assert ref.shape == (1, 3, 1, 64, 64) and ref.dtype == torch.float32
    px = _to_u8(ref)
    assert (px[..., 0] == np.arange(20, 84)[None, :]).all()  # left = round(19.5) = 20
    assert (px[..., 1] == np.arange(64)[:, None]).all()
    assert (px[..., 2] == 7).all()
    # value mapping is ToTensor (float32 x / 255) then *2 - 1, bit for bit
    want = torch.tensor(7, dtype=torch.float32).div(255) * 2 - 1.0
    assert torch.equal(ref[0, 2, 0], torch.full((64, 64), float(want)))


def test_reference_resize_then_pad():
    # The e2e golden case: a 140x100 (w x h) picture into 64x128: PIL bilinear to 89x64, 19 + 20 black columns.
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (100, 140, 3), dtype=np.uint8), mode="RGB")
    ref = prepare_reference(img, 64, 128)
    resized = np.asarray(img.resize((89, 64), Image.BILINEAR))
    want = np.zeros((64, 128, 3), dtype=np.uint8)
    want[:, 19 : 19 + 89] = resized
    assert (_to_u8(ref) == want).all()
    assert ref[0, :, 0, :, :19].eq(-1).all() and ref[0, :, 0, :, 108:].eq(-1).all()


def test_reference_resize_then_crop():
    img = _coord_image(100, 200)  # -> 64 x 128 exactly after resize; crop 64 x 96 takes the middle
    ref = prepare_reference(img, 64, 96)
    resized = np.asarray(img.resize((128, 64), Image.BILINEAR))
    assert (_to_u8(ref) == resized[:, 16:112]).all()
    assert ref.min() >= -1 and ref.max() <= 1


@pytest.mark.parametrize("mode", ["RGBA", "L", "LA", "CMYK", "P", "1"])
def test_reference_accepts_other_modes(mode):
    base = _coord_image(70, 90)
    img = base.convert(mode)
    ref = prepare_reference(img, 64, 64)
    assert ref.shape == (1, 3, 1, 64, 64)
    assert torch.equal(ref, prepare_reference(img.convert("RGB"), 64, 64))  # as official: plain convert("RGB")


def test_reference_16bit_grey_is_scaled_not_clipped():
    arr = np.full((64, 64), 32896, dtype=np.uint16)  # 128 * 257
    ref = prepare_reference(Image.fromarray(arr), 64, 64)
    assert (_to_u8(ref) == 128).all()


def test_reference_rgba_drops_alpha():
    arr = np.zeros((64, 64, 4), dtype=np.uint8)
    arr[..., :3] = 200
    ref = prepare_reference(Image.fromarray(arr, mode="RGBA"), 64, 64)  # fully transparent, colour kept
    assert (_to_u8(ref) == 200).all()


def test_reference_errors():
    with pytest.raises(InputError, match="MP"):
        prepare_reference(_coord_image(100, 100), 64, 64, max_pixels=5000)
    with pytest.raises(InputError):
        prepare_reference(np.zeros((64, 64, 3), np.uint8), 64, 64)  # type: ignore[arg-type]
    with pytest.raises(InputError):
        prepare_reference(_coord_image(64, 64), 0, 64)


# ---------------------------------------------------------------------------------------------
# pose frames
def _official_pose(frames: np.ndarray, H: int, W: int) -> torch.Tensor:
    """Independent straight-line version of the official tensor path (whole clip at once)."""
    x = torch.from_numpy(frames.copy()).permute(0, 3, 1, 2) / 255.0 * 2 - 1.0
    h, w = x.shape[-2:]
    s = min(H, W)
    size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return center_crop(x, H, W).permute(1, 0, 2, 3)


def test_pose_frames_shape_range_and_chunking():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (37, 90, 160, 3), dtype=np.uint8)  # more frames than one chunk
    frames.flags.writeable = False  # decoders often hand out read-only buffers
    out = prepare_pose_frames(frames, 64, 128)
    assert out.shape == (3, 37, 64, 128) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(out, _official_pose(frames, 64, 128))


def test_pose_frames_pad_is_mid_grey_and_no_resize_is_exact():
    frames = np.full((2, 64, 100, 3), 255, dtype=np.uint8)
    out = prepare_pose_frames(frames, 64, 128)  # 64 x 100 already has the short side: pad 14 | 14
    assert out[:, :, :, 14:114].eq(1).all()
    assert out[:, :, :, :14].eq(0).all() and out[:, :, :, 114:].eq(0).all()  # padded after scaling to [-1, 1]
    frames = np.random.default_rng(2).integers(0, 256, (3, 64, 70, 3), dtype=np.uint8)
    out = prepare_pose_frames(frames, 64, 64)
    want = torch.from_numpy(frames).permute(3, 0, 1, 2)[..., 3:67].float() / 255.0 * 2 - 1.0
    assert torch.equal(out, want)


def test_pose_frames_downscale_is_antialiased():
    # A 1-px checkerboard shrunk 3x: antialiased bilinear averages to ~0; plain bilinear samples single
    # pixels at this ratio and returns a full-contrast (+-1) aliased pattern.
    cb = ((np.indices((192, 192)).sum(0) % 2) * 255).astype(np.uint8)
    frames = np.repeat(cb[None, :, :, None], 3, axis=3)
    out = prepare_pose_frames(frames, 64, 64)
    assert out.shape == (3, 1, 64, 64)
    assert out.abs().max() < 0.05
    assert math.isclose(float(out.mean()), 0.0, abs_tol=1e-3)


def test_pose_frames_errors():
    with pytest.raises(InputError, match="uint8"):
        prepare_pose_frames(np.zeros((2, 8, 8, 3), np.float32), 64, 64)
    with pytest.raises(InputError):
        prepare_pose_frames(np.zeros((2, 8, 8), np.uint8), 64, 64)
    with pytest.raises(InputError):
        prepare_pose_frames(np.zeros((0, 8, 8, 3), np.uint8), 64, 64)
