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

from runtime.errors import ConfigError
from runtime.quoting import shown


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


def inside(folder: str | Path, root: str | Path) -> Path:
    """``folder`` (existing or not) when its existing part resolves inside ``root``; a symlinked folder leading out
    of ``root`` is refused (writing through it would overwrite files elsewhere)."""
    folder, base = Path(folder), Path(root).resolve()
    real = folder.resolve()
    if real != base and base not in real.parents:
        raise ConfigError(f"{shown(folder)} leads out of the output folder {shown(root)} (symlink to {shown(real)}); "
                          "refused; remove the link or choose another --out")
    return folder


def check_out(out: str | Path, folders=()) -> Path:
    """Early checks of an output folder: a folder (or creatable in a writable folder), and none of the ``folders``
    (relative to it) the export will write in a symlink leading out of it. (Links elsewhere in it are never
    written through: files are replaced by a rename, and temporaries get fresh random names.)"""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {shown(out)} is not a folder; choose a folder (it is created if missing)")
    parent = out
    while not parent.exists():
        if parent.is_symlink():
            raise ConfigError(f"--out {shown(out)}: {shown(parent)} is a dangling symbolic link; choose another --out")
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {shown(out)}: {shown(parent)} is not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {shown(out)}: {shown(parent)} is not writable; choose another --out")
    for rel in folders:
        inside(out / rel, out)
    return out


def read_regular(path: str | Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (not a symlink), else None."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    return path.read_bytes()
