"""What the media modules share: the video frame rate and the readable-input check."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import InputError

PathLike = Union[str, os.PathLike]

VIDEO_FPS = 16


def _check_readable_file(path: Path, what: str) -> None:
    if not path.exists():
        raise InputError(f"{what} file {path} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{what} path {path} is a directory; pass a file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} file {path} is not readable; fix its permissions")
    if path.stat().st_size == 0:
        raise InputError(f"{what} file {path} is empty (0 bytes); pass a complete file")
