"""Pose video in: decord's frame selection and its RGB conversion (FFmpeg swscale) reproduced.

Checked bit-identical to decord 0.6.0 on samples/pose.mp4 (yuv420p) and golden/e2e_pose.mkv.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from collections.abc import Iterator
from typing import Union

import av
import numpy as np

from ..errors import InputError
from ..quoting import shown
from .common import VIDEO_FPS, PathLike, _check_readable_file
from .image import MAX_IMAGE_PIXELS

log = logging.getLogger(__name__)


def iter_pose_frames(src: Union[PathLike, bytes], num_frames: int, fps: int = VIDEO_FPS) -> Iterator[np.ndarray]:
    """The frames of a pose video (a path, or the bytes of a video file), one uint8 ``[H, W, 3]`` array at a time,
    at most ``num_frames``; nothing is kept between frames, so a caller that shrinks each frame as it comes holds
    one source-size frame at a time, whatever the video's length.

    As official ``read_last_n_frames(..., reverse=True)``: interval = max(1, round(src_fps / fps))
    (Python round, half to even; src_fps is the stream's average frame rate), indices
    0, interval, 2*interval, ... below the frame count, at most ``num_frames``. The caller
    resizes, crops and pads (official pads with -1 frames).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        if not len(src):
            raise InputError("pose video bytes are empty; pass the contents of an mp4/mkv file")
        path, source = "pose video bytes", io.BytesIO(bytes(src))
    else:
        path = Path(src)
        _check_readable_file(path, "pose video")
        source = str(path)
    if num_frames <= 0:
        raise InputError(f"num_frames is {num_frames}; ask for at least one pose frame")
    sent = 0
    try:
        with av.open(source, mode="r") as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream; pass a pose video (mp4/mkv)")
            stream = container.streams.video[0]
            # the reference image's pixel cap, before a frame is decoded (and again per frame, below)
            _check_frame_size(stream.codec_context.width, stream.codec_context.height, path)
            stream.thread_type = "AUTO"
            src_fps = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not src_fps:
                log.warning("%s has no frame rate; assuming %s fps (every frame used)", shown(path), fps)
                src_fps = fps
            interval = max(1, round(float(src_fps) / fps))
            for index, frame in enumerate(container.decode(stream)):
                if index % interval:
                    continue
                _check_frame_size(frame.width, frame.height, path)
                rgb = frame.to_ndarray(format="rgb24")
                del frame  # the decoded picture is released before the caller works on its RGB copy
                yield rgb
                sent += 1
                if sent == num_frames:
                    break
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise InputError(f"{path} is not a readable video ({type(exc).__name__}: {exc}); "
                         "re-encode it as H.264 mp4") from None
    if not sent:
        raise InputError(f"{path} contains no decodable frames; pass a non-empty pose video")


def read_pose_frames(src: Union[PathLike, bytes], num_frames: int, fps: int = VIDEO_FPS) -> np.ndarray:
    """:func:`iter_pose_frames` as one uint8 ``[N, H, W, 3]`` array, N <= num_frames (all frames at source size:
    for a check of a few frames; the pipeline shrinks them one by one instead, ``preprocess.load_pose_video``)."""
    frames = list(iter_pose_frames(src, num_frames, fps))
    if len({f.shape for f in frames}) > 1:
        raise InputError(f"{src if not isinstance(src, (bytes, bytearray, memoryview)) else 'pose video bytes'} changes "
                         "frame size mid-stream; re-encode it at one size")
    return np.stack(frames)


def _check_frame_size(width: int, height: int, path: Union[Path, str]) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{path} has {width}x{height} px frames, more than {MAX_IMAGE_PIXELS:,} pixels; "
                         "downscale the pose video before use")
