"""Manifests of exported artefacts (ONNX graphs and TensorRT engines): identity, integrity, selection.

``export.build`` writes them; the backends read them here, so the runtime never imports ``export/``.

- An engine lives in ``ENGINES/<component>/<key>/`` as ``engine.plan`` + ``manifest.json``; an ONNX graph
  ``ENGINES/onnx/<component>/<stem>.onnx`` has ``<stem>.manifest.json`` beside it.
- The key is a hash of everything that makes an artefact valid (ONNX hash, checkpoint identity, runtime and
  its version, target compute capabilities, profiles, flags, graph I/O), never "the file exists". A manifest
  without its key, or whose key does not match its contents, is refused.
- The files a manifest describes are hashed and compared at load (``plan_sha256``, ``onnx_sha256``), and every
  file must resolve inside the engines folder: a symlink out of it is refused.
- Loading compares the manifest with the request and refuses a mismatch in one line naming the field and
  the rebuild command.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from runtime.errors import EngineMismatch

IDENTITY_FIELDS = ("kind", "component", "precision", "onnx_sha256", "checkpoint", "runtime", "runtime_version", "gpu",
                   "compute_capabilities", "profiles", "flags", "io", "opset")


# ------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_files(path: str | Path) -> list[Path]:
    """The graph file and its external-data files (``<name>.data`` style, sorted by name)."""
    path = Path(path)
    extra = sorted(p for p in path.parent.iterdir()
                   if p != path and p.name.startswith(path.name + ".") and not p.name.endswith(".json"))
    return [path, *extra]


def onnx_sha256(path: str | Path) -> str:
    """Hash of the graph file and its external-data files, i.e. of everything a parser reads."""
    files = onnx_files(path)
    h = hashlib.sha256(sha256_file(files[0]).encode())
    for extra in files[1:]:
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
    if fields.get("loras"):  # only when merged, so the keys of artefacts without LoRAs stay what they were
        ident["loras"] = fields["loras"]
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def onnx_manifest_path(onnx_path: str | Path) -> Path:
    onnx_path = Path(onnx_path)
    return onnx_path.with_name(onnx_path.stem + ".manifest.json")


# ------------------------------------------------------------------------------------------ reading
def confined(path: str | Path, root: str | Path) -> Path:
    """``path`` resolved; refused when it (or a symlink on the way) leads out of ``root``."""
    real, base = Path(path).resolve(), Path(root).resolve()
    if real != base and base not in real.parents:
        raise EngineMismatch(f"{path}: leads out of the engines folder {root} (symlink to {real}); refused; "
                             "copy the file into the engines folder instead")
    return real


def read_manifest(path: str | Path, root: str | Path, rebuild: str = "python -m export.build") -> dict:
    """The manifest at ``path`` (inside ``root``), with its key checked against its contents."""
    path = Path(path)
    if not path.is_file():
        raise EngineMismatch(f"{path}: no manifest; rebuild with: {rebuild}")
    confined(path, root)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineMismatch(f"{path}: unreadable manifest ({err}); rebuild with: {rebuild}") from None
    except RecursionError:
        raise EngineMismatch(f"{path}: unreadable manifest (nested too deeply); rebuild with: {rebuild}") from None
    if not isinstance(data, dict) or not data.get("key"):
        raise EngineMismatch(f"{path}: manifest has no key; rebuild with: {rebuild}")
    key = engine_key(data)
    if data["key"] != key:
        raise EngineMismatch(f"{path}: manifest key {data['key']} does not match its contents ({key}); "
                             f"the manifest was edited; rebuild with: {rebuild}")
    need = ("io",) + (("profiles",) if data.get("kind") == "engine" else ())
    missing = [f for f in need if not isinstance(data.get(f), (dict, list)) or not data.get(f)]
    if missing:
        raise EngineMismatch(f"{path}: manifest without {', '.join(missing)}; rebuild with: {rebuild}")
    return data


def verify(manifest: dict, request: dict, rebuild: str) -> None:
    """Raise EngineMismatch naming the first field where ``manifest`` differs from ``request``.

    ``request`` holds the fields the caller knows; fields it does not mention are not compared.
    ``compute_capability`` (this GPU's, e.g. "8.9") must be one of the manifest's ``compute_capabilities``;
    ``runtimes`` (installed runtime -> version) must contain the manifest's runtime at its version."""
    name = manifest.get("key", "?")
    for field, want in request.items():
        if field == "compute_capability":
            have = manifest.get("compute_capabilities") or []
            if want not in have:
                raise EngineMismatch(f"engine {name} was built for compute capabilities {', '.join(have) or '?'}, this "
                                     f"GPU is {want}; rebuild with: {rebuild}")
        elif field == "runtimes":
            rt, ver = manifest.get("runtime"), manifest.get("runtime_version")
            if rt not in want:
                raise EngineMismatch(f"engine {name} was built with {rt}, which is not installed here (installed: "
                                     f"{', '.join(f'{k} {v}' for k, v in want.items()) or 'none'}); rebuild with: {rebuild}")
            if want[rt] != ver:
                raise EngineMismatch(f"engine {name} was built for {rt} {ver}, this run has {rt} {want[rt]}; "
                                     f"rebuild with: {rebuild}")
        elif field == "loras":
            have = manifest.get("loras") or []
            if have != want:
                def say(items):
                    return ", ".join(f"{i['sha256'][:12]}…:{i['strength']:g}" for i in items) or "no LoRA"
                raise EngineMismatch(f"engine {name} was built with {say(have)} merged, this run merges {say(want)}; "
                                     f"rebuild with: {rebuild}")
        elif manifest.get(field) != want:
            raise EngineMismatch(f"engine {name} was built for {field}={manifest.get(field)!r}, this run needs "
                                 f"{want!r}; rebuild with: {rebuild}")


def verify_hash(path: Path, expected: str | None, what: str, rebuild: str, onnx: bool = False) -> None:
    if not expected:
        raise EngineMismatch(f"{path}: the manifest records no hash of the {what}; rebuild with: {rebuild}")
    got = onnx_sha256(path) if onnx else sha256_file(path)
    if got != expected:
        raise EngineMismatch(f"{path}: the {what} changed since it was built (sha256 {got[:12]}…, manifest "
                             f"{expected[:12]}…); rebuild with: {rebuild}")


def select_engine(root: str | Path, component: str, request: dict, rebuild: str) -> tuple[Path, dict]:
    """The folder under ``root/component`` whose manifest matches ``request``, and that manifest; otherwise
    EngineMismatch with the reason the first candidate was refused (or that none exists) and the rebuild command.
    The chosen plan is hashed and compared with the manifest."""
    base = Path(root) / component
    candidates = sorted(p for p in base.glob("*/manifest.json")) if base.is_dir() else []
    if not candidates:
        raise EngineMismatch(f"no {component} engine under {base}; build one with: {rebuild}")
    first_error = None
    for path in candidates:
        try:
            manifest = read_manifest(path, root, rebuild)
            verify(manifest, request, rebuild)
            plan = path.parent / "engine.plan"
            if not plan.is_file():
                raise EngineMismatch(f"{path.parent}: manifest without engine.plan; rebuild with: {rebuild}")
            confined(plan, root)
            verify_hash(plan, manifest.get("plan_sha256"), "engine plan", rebuild)
        except EngineMismatch as err:
            first_error = first_error or err
            continue
        return path.parent, manifest
    raise first_error


def check_onnx(onnx_path: str | Path, root: str | Path, request: dict, rebuild: str) -> dict:
    """The manifest of an exported ONNX graph, checked: inside ``root``, key, request fields, graph hash."""
    onnx_path = Path(onnx_path)
    manifest = read_manifest(onnx_manifest_path(onnx_path), root, rebuild)
    verify(manifest, request, rebuild)
    for f in onnx_files(onnx_path):
        confined(f, root)
    verify_hash(onnx_path, manifest.get("onnx_sha256"), "ONNX graph", rebuild, onnx=True)
    return manifest


def io_mismatch(expected: dict, actual: dict) -> str | None:
    """First difference between two ``{"inputs"/"outputs": [{name, dtype, shape}]}`` descriptions, or None.

    Dynamic dimensions compare as -1 whatever their symbolic name."""
    def norm(entries):
        return [(e["name"], e["dtype"], [d if isinstance(d, int) and d >= 0 else -1 for d in e["shape"]]) for e in entries]

    for side in ("inputs", "outputs"):
        want, have = norm(expected.get(side, [])), norm(actual.get(side, []))
        if [w[0] for w in want] != [h[0] for h in have]:
            return f"{side} {[h[0] for h in have]} != {[w[0] for w in want]}"
        for w, h in zip(want, have):
            if w != h:
                return f"{side[:-1]} {w[0]}: {h[1]} {h[2]} != {w[1]} {w[2]}"
    return None
