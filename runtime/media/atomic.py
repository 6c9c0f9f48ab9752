"""Atomic output files: checks on the destination, an exclusive temp file beside it, rename into place."""
from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
from pathlib import Path

from ..errors import OutputError
from ..procs import pid_gone
from ..quoting import shown

log = logging.getLogger(__name__)
# Temporary files this process has created and not yet published or removed: a process that must exit at once
# (a signal while the main thread is stuck in a native call) removes them first (``remove_live_temps``).
_LIVE: set[Path] = set()


def remove_live_temps() -> None:
    """Remove this process's unpublished temporary files (called right before a forced exit)."""
    for tmp in list(_LIVE):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _LIVE.discard(tmp)


def _host() -> str:
    return "".join(c for c in socket.gethostname() if c.isalnum() or c == "-")[:32] or "host"


def _remove_stale(dest: Path) -> None:
    """Remove ``.<name>.<host>.<pid>.<token>.part`` files beside ``dest`` left by dead processes of this host (a
    SIGKILL, a power cut). Temp files of other hosts (a shared folder) and of live processes are left alone."""
    prefix, host = f".{dest.name}.", _host()
    try:
        names = os.listdir(dest.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".part")):
            continue
        parts = name[len(prefix):-len(".part")].split(".")
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        if not pid_gone(pid):
            continue  # alive (or not ours to signal): leave it
        try:
            os.unlink(dest.parent / name)
            log.info("removed %r, a temporary file of a process that no longer runs", name)
        except OSError:
            pass


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
    # O_EXCL with 0o666 lets the umask set the final file's permissions, unlike mkstemp's 0o600. The name carries
    # the host and pid, so the next run can tell a dead process's leftover from a live writer's file.
    _remove_stale(dest)
    for _ in range(16):
        tmp = dest.with_name(f".{dest.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            _LIVE.add(tmp)
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise _output_error(exc, dest) from exc
    raise OutputError(f"cannot create a temporary file beside {dest}; clean up stale .part files")


def _publish(tmp: Path, dest: Path, overwrite: bool) -> None:
    _LIVE.discard(tmp)
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
    _LIVE.discard(path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", shown(path), exc)


def _output_error(exc: BaseException, dest: Path) -> OutputError:
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return OutputError(f"disk full or file too large while writing {dest}; free space or choose another disk")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"no permission to write {dest}; fix the directory permissions or choose another path")
    return OutputError(f"writing {dest} failed ({type(exc).__name__}: {exc}); check the path and free space")


def write_file(dest: str | Path, data: bytes, overwrite: bool = False) -> Path:
    """Write ``data`` to ``dest`` atomically (temp file beside it, fsync, then published); an existing ``dest`` is
    refused unless ``overwrite``."""
    dest = Path(dest)
    _check_destination(dest, overwrite)
    tmp = _create_temp(dest)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        _fsync(tmp)
        _publish(tmp, dest, overwrite)
    except OutputError:
        _remove_quietly(tmp)
        raise
    except OSError as exc:
        _remove_quietly(tmp)
        raise _output_error(exc, dest) from exc
    except BaseException:
        _remove_quietly(tmp)
        raise
    return dest
