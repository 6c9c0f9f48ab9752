"""API keys: ``--api_key KEY`` (repeatable), ``--api_keys_file FILE`` (one key per line, optional ``name:``
prefix, ``#`` comments; re-read on SIGHUP) and ``S2V_API_KEYS`` (comma-separated, same ``name:`` prefix).

A request carries ``Authorization: Bearer KEY``. The presented key is hashed and compared with every
configured key's hash in constant time (no early exit). A job records its *owner*: a hash of the key, never
the key; without keys configured every caller is the owner "" and sees every job.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import InputError

log = logging.getLogger(__name__)

ENV = "S2V_API_KEYS"
MIN_KEY_CHARS = 16
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def owner_of(key: str) -> str:
    """The job owner recorded for a key: a hash (the key itself is never stored)."""
    return hashlib.sha256(b"s2v-owner:" + key.encode()).hexdigest()[:32]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class Key:
    name: str
    owner: str
    digest: bytes


class KeyRing:
    """The configured keys; ``reload()`` re-reads the file (keeping the old keys if the file is now bad)."""

    def __init__(self, keys: list[str] = (), keys_file: str | Path | None = None, env: str | None = None):
        self._cli, self._file, self._env = list(keys), None if keys_file is None else Path(keys_file), env
        self._lock = threading.Lock()
        self._keys: tuple[Key, ...] = self._collect()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def _collect(self) -> tuple[Key, ...]:
        found: list[tuple[str, str, str]] = []  # (name, key, where)
        for i, k in enumerate(self._cli, 1):
            found.append((*_split(k, f"--api_key #{i}"), f"--api_key #{i}"))
        if self._env:
            for i, k in enumerate(p for p in self._env.split(",") if p.strip()):
                found.append((*_split(k.strip(), f"{ENV} entry {i + 1}"), f"{ENV} entry {i + 1}"))
        if self._file is not None:
            try:
                text = self._file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"--api_keys_file {str(self._file)!r}: cannot read it ({type(exc).__name__}: "
                                 f"{getattr(exc, 'strerror', None) or exc}); pass a readable UTF-8 file") from None
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    where = f"--api_keys_file line {n}"
                    found.append((*_split(line, where), where))
        keys, seen = [], set()
        for name, key, where in found:
            if len(key) < MIN_KEY_CHARS or not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
                raise InputError(f"the API key of {where} is not {MIN_KEY_CHARS}+ printable ASCII characters without "
                                 "spaces; make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
            if key not in seen:
                seen.add(key)
                keys.append(Key(name or f"key{len(keys) + 1}", owner_of(key), _digest(key)))
        return tuple(keys)

    def reload(self) -> bool:
        """Re-read the keys file (SIGHUP). On an error the keys stay as they were and the error is logged."""
        try:
            keys = self._collect()
        except InputError as exc:
            log.error("API keys not reloaded (the old keys stay): %s", exc)
            return False
        with self._lock:
            self._keys = keys
        log.info("API keys reloaded: %d key(s)", len(keys))
        return True

    def check(self, authorization: str | None) -> Key | None:
        """The key an ``Authorization: Bearer KEY`` header names, or None. Every configured key is compared."""
        if not authorization:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = _digest(presented.strip())
        match = None
        with self._lock:
            keys = self._keys
        for key in keys:  # no early exit: the time does not say which key (or how much of it) matched
            if hmac.compare_digest(digest, key.digest):
                match = key
        return match


def _split(entry: str, where: str) -> tuple[str, str]:
    """``name:key`` or ``key``."""
    name, sep, key = entry.partition(":")
    if not sep:
        return "", entry
    if not name.strip() or not key:
        raise InputError(f"{where}: expected KEY or NAME:KEY")
    return name.strip(), key.strip()


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
