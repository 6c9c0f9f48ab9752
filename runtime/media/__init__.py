"""Media in/out: reference image, driving audio, pose video, final MP4 -- one module per medium.

Everything decodes and encodes through PyAV (bundled FFmpeg) and Pillow, so no ffmpeg binary,
librosa or decord is needed. Each module says where it differs from the official code:

* :mod:`.image` -- reference image in;
* :mod:`.audio` -- driving audio in (16 kHz for the features, the original kept for the mux);
* :mod:`.pose` -- pose video frames in (one at a time, for callers that shrink them as they come);
* :mod:`.mp4` -- the MP4 writer and a probe; :mod:`.atomic` -- temp file + rename for outputs.

Every user-fixable problem raises :class:`InputError` / :class:`OutputError` with a one-line
message naming the problem and the fix.
"""
from .audio import FEATURE_SAMPLE_RATE, MIN_AUDIO_SECONDS, AudioClip, load_audio
from .common import VIDEO_FPS, PathLike
from .image import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, load_image
from .mp4 import Mp4Writer, probe_mp4, write_mp4
from .pose import iter_pose_frames, read_pose_frames

__all__ = [
    "AudioClip", "FEATURE_SAMPLE_RATE", "Mp4Writer", "MAX_IMAGE_PIXELS", "MIN_AUDIO_SECONDS", "MIN_IMAGE_SIDE",
    "PathLike", "VIDEO_FPS", "iter_pose_frames", "load_audio", "load_image", "probe_mp4", "read_pose_frames",
    "write_mp4",
]
