"""Atomic output files: checks on the destination, an exclusive temp file beside it, rename into place."""
from __future__ import annotations

import errno
import logging
import os
import secrets
from pathlib import Path

from ..errors import OutputError

log = logging.getLogger(__name__)


def _check_destination(dest: Path, overwrite: bool) -> None:
    parent = dest.parent
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist; create it or choose another path")
    if dest.is_dir():
        raise OutputError(f"output path {dest} is a directory; give a file name ending in .mp4")
    if dest.exists() and not overwrite:
        raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable; fix its permissions or choose another path")


def _create_temp(dest: Path) -> Path:
    # O_EXCL with 0o666 lets the umask set the final file's permissions, unlike mkstemp's 0o600.
    for _ in range(16):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(exc, dest) from exc
    raise OutputError(f"cannot create a temporary file beside {dest}; clean up stale .part files")


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, dest)
        return
    # link() fails if dest appeared meanwhile, so a concurrent writer is never clobbered.
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True") from None
    except OSError:  # filesystem without hard links
        if dest.exists():
            raise OutputError(f"output file {dest} already exists; delete it or pass overwrite=True") from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", path, exc)


def _output_error(exc: BaseException, dest: Path) -> OutputError:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"disk full or file too large while writing {dest}; free space or choose another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"no permission to write {dest}; fix the directory permissions or choose another path")
    return OutputError(f"writing {dest} failed ({type(exc).__name__}: {exc}); check the path and free space")
