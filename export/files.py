"""Writing export artefacts without clobbering anything else: exclusive, randomly named temporaries beside the
destination, renamed into place.

A fixed temporary name (``.model.onnx.partial``) lets anyone who can write the output folder plant a symlink
there and have the export move, overwrite or delete files elsewhere. Here every temporary is created with
``O_EXCL | O_NOFOLLOW`` (or ``mkdtemp``) under a random name, so it is always a new file of ours; ``os.replace``
onto the destination replaces a symlink found there instead of writing through it.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path


def _new_temp(dest: Path) -> tuple[int, Path]:
    for _ in range(16):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.partial")
        try:  # 0o666: the umask sets the final permissions (mkstemp would make them 0o600)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {dest}")


def write_bytes(dest: str | Path, data) -> Path:
    """Write ``data`` (bytes or a buffer) to ``dest`` through an exclusive temporary and a rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(dest)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def write_text(dest: str | Path, text: str) -> Path:
    return write_bytes(dest, text.encode())


@contextlib.contextmanager
def staged(dest: str | Path):
    """Yield a path with ``dest``'s name inside a fresh private directory beside it; on success every file the
    body wrote there (the graph and its external data) is renamed into ``dest``'s folder. The directory is
    removed in any case (it is ours: ``mkdtemp`` created it, and rmtree does not follow symlinks)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp_dir / dest.name
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, dest.parent / f.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def read_regular(path: str | Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink), else None."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    return path.read_bytes()
