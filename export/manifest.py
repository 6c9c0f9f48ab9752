"""Engine manifests: what an artefact was built from, the key derived from it, and refusal on mismatch.

``engines/<component>/<key>/`` holds ``engine.plan`` (or ``model.onnx``) and ``manifest.json``. The key is a
hash of everything that makes a build valid (ONNX hash, checkpoint identity, TensorRT version, GPU and
compute capability, profiles, flags), never "the file exists". Loading compares the manifest with the
request and refuses a mismatch with one line naming the field and the rebuild command.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from runtime.errors import EngineMismatch

IDENTITY_FIELDS = ("component", "precision", "onnx_sha256", "checkpoint", "tensorrt_version", "gpu",
                   "compute_capability", "profiles", "flags")


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(path: str | Path) -> str:
    """Hash of the graph file and its external-data files (sorted by name), i.e. of everything TensorRT parses."""
    path = Path(path)
    h = hashlib.sha256(sha256_file(path).encode())
    for extra in sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".") or p.suffix == ".data"):
        if extra != path:
            h.update(extra.name.encode() + sha256_file(extra).encode())
    return h.hexdigest()


def checkpoint_identity(ckpt: str | Path) -> str:
    """Cheap identity of a checkpoint: hash of config.json, the index and every weight file's name and size.

    (Hashing 33 GB of shards at every load would cost a minute; name+size+index catches a different or
    partially downloaded checkpoint, which is the failure that matters.)"""
    if str(ckpt) == "tiny":
        from runtime.tiny import SEED

        return f"tiny-builtin-{SEED}"
    if str(ckpt) == "random-14b":
        return "random-14b-seed0"
    ckpt = Path(ckpt)
    h = hashlib.sha256()
    files = [ckpt] if ckpt.is_file() else sorted(p for p in ckpt.iterdir() if p.is_file() and
                                                 (p.suffix in (".json", ".safetensors", ".pth")))
    for p in files:
        h.update(p.name.encode() + str(p.stat().st_size).encode())
        if p.suffix == ".json":
            h.update(p.read_bytes())
    return h.hexdigest()[:32]


def engine_key(fields: dict) -> str:
    ident = {k: fields.get(k) for k in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_manifest(folder: str | Path, fields: dict) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {**fields, "key": engine_key(fields), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, folder / "manifest.json")
    return folder / "manifest.json"


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise EngineMismatch(f"{folder}: no manifest.json; rebuild with: python -m export.build")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EngineMismatch(f"{path}: unreadable manifest ({err}); rebuild with: python -m export.build") from None


def verify(manifest: dict, request: dict, rebuild: str) -> None:
    """Raise EngineMismatch naming the first field where ``manifest`` differs from ``request``.

    ``request`` holds the fields the caller knows (e.g. the current TensorRT version and GPU); fields it does
    not mention are not compared. ``profiles`` is checked by the caller (shape coverage, not equality)."""
    for name in IDENTITY_FIELDS:
        if name in request and name != "profiles" and manifest.get(name) != request[name]:
            raise EngineMismatch(f"engine {manifest.get('key', '?')} was built for {name}={manifest.get(name)!r}, "
                                 f"this run needs {request[name]!r}; rebuild with: {rebuild}")
    key = engine_key(manifest)
    if manifest.get("key") not in (None, key):
        raise EngineMismatch(f"engine manifest key {manifest.get('key')} does not match its contents ({key}); "
                             f"the manifest was edited; rebuild with: {rebuild}")


def select_engine(root: str | Path, component: str, request: dict, rebuild: str) -> Path:
    """The folder under ``root/component`` whose manifest matches ``request``; otherwise EngineMismatch with the
    reason the closest candidate was refused (or that none exists) and the rebuild command."""
    base = Path(root) / component
    candidates = sorted(p for p in base.glob("*/manifest.json")) if base.is_dir() else []
    if not candidates:
        raise EngineMismatch(f"no {component} engine under {base}; build one with: {rebuild}")
    first_error = None
    for path in candidates:
        try:
            verify(read_manifest(path.parent), request, rebuild)
        except EngineMismatch as err:
            first_error = first_error or err
            continue
        if not (path.parent / "engine.plan").is_file():
            first_error = first_error or EngineMismatch(f"{path.parent}: manifest without engine.plan; rebuild with: {rebuild}")
            continue
        return path.parent
    raise first_error
