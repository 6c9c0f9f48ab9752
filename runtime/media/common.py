"""What the media modules share: the video frame rate and the readable-input check."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import InputError

PathLike = Union[str, os.PathLike]

VIDEO_FPS = 16


def _check_readable_file(path: Path, what: str, flag: str | None = None) -> None:
    """One line naming the problem: missing, a directory, unreadable or empty. ``flag`` (a CLI option) leads the
    message when the path came from the command line."""
    subject = f"{flag} {path}: {what} file" if flag else f"{what} file {path}"
    if not path.exists():
        raise InputError(f"{subject} does not exist; check the path")
    if path.is_dir():
        raise InputError(f"{f'{flag} {path}:' if flag else f'{what} path {path}'} is a directory; pass the {what} file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{subject} is not readable; fix its permissions")
    if path.stat().st_size == 0:
        raise InputError(f"{subject} is empty (0 bytes); pass a complete file")