"""Manifests of exported artefacts (ONNX graphs and TensorRT engines): identity, integrity, selection.

``export.build`` writes them (``export/manifest.py``); the backends read and check them here, so the runtime never
imports ``export/``. The engines themselves are run by ``runtime/backends/trt_backend.py``.

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
import os
import stat
from pathlib import Path

from runtime.config import TINY_SEED
from runtime.errors import BackendUnavailable, EngineMismatch
from runtime.quoting import shown

IDENTITY_FIELDS = ("kind", "component", "precision", "onnx_sha256", "checkpoint", "runtime", "runtime_version", "gpu",
                   "compute_capabilities", "profiles", "flags", "io", "opset")


# ------------------------------------------------------------------------------------------ hashing
def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def external_data_locations(path: str | Path) -> list[str]:
    """The external-data files the ONNX graph at ``path`` references (its tensors' ``location`` entries), sorted.

    Only these are part of the graph: other ``<name>.*`` files beside it (a backup, a stray link) are not read by a
    parser, so they are neither hashed nor opened. A location must be a plain relative path (no ``..``, not
    absolute), as the exporters write it."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError:
        raise BackendUnavailable("checking an ONNX graph needs the onnx package; pip install onnx") from None
    path = Path(path)
    regular_file(path, "ONNX graph")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # DecodeError and friends: not a graph
        raise EngineMismatch(f"{shown(path)}: not a readable ONNX graph ({type(err).__name__}); re-export it with: "
                             "python -m export.build") from None
    found: set[str] = set()

    def tensors(graph):
        yield from graph.initializer
        yield from (s.values for s in graph.sparse_initializer)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from tensors(g)

    for t in tensors(model.graph):
        if uses_external_data(t):
            loc = ExternalDataInfo(t).location
            if not loc or Path(loc).is_absolute() or ".." in Path(loc).parts:
                raise EngineMismatch(f"{shown(path)}: external data location {loc!r} is not a file beside the graph; refused; "
                                     "re-export with: python -m export.build")
            found.add(loc)
    return sorted(found)


def onnx_files(path: str | Path) -> list[Path]:
    """The graph file and the external-data files it references (sorted by location)."""
    path = Path(path)
    return [path, *(path.parent / loc for loc in external_data_locations(path))]


def onnx_sha256(path: str | Path) -> str:
    """Hash of the graph file and its external-data files, i.e. of everything a parser reads."""
    files = onnx_files(path)
    h = hashlib.sha256(sha256_file(files[0]).encode())
    for extra in files[1:]:
        regular_file(extra, "external data of the ONNX graph")
        h.update(str(extra.relative_to(files[0].parent)).encode() + sha256_file(extra).encode())
    return h.hexdigest()


def regular_file(path: Path, what: str) -> None:
    """Refuse, before opening it, anything but a regular file (a FIFO would block the reader forever)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise EngineMismatch(f"{shown(path)}: the {what} is missing; rebuild with: python -m export.build") from None
    if not stat.S_ISREG(mode):
        raise EngineMismatch(f"{shown(path)}: the {what} is not a regular file (a FIFO, device or folder); refused; "
                             "rebuild with: python -m export.build")


def checkpoint_identity(ckpt: str | Path) -> str:
    """Cheap identity of a checkpoint: hash of config.json, the index and every weight file's name and size.

    (Hashing 33 GB of shards at every load would cost a minute; name+size+index catches a different or
    partially downloaded checkpoint, which is the failure that matters.)"""
    if str(ckpt) == "tiny":
        return f"tiny-builtin-{TINY_SEED}"
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
        raise EngineMismatch(f"{shown(path)}: leads out of the engines folder {shown(root)} (symlink to {shown(real)}); refused; "
                             "copy the file into the engines folder instead")
    return real


def read_manifest(path: str | Path, root: str | Path, rebuild: str = "python -m export.build") -> dict:
    """The manifest at ``path`` (inside ``root``), with its key checked against its contents."""
    path = Path(path)
    if not path.is_file():
        raise EngineMismatch(f"{shown(path)}: no manifest; rebuild with: {rebuild}")
    confined(path, root)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineMismatch(f"{shown(path)}: unreadable manifest ({err}); rebuild with: {rebuild}") from None
    except RecursionError:
        raise EngineMismatch(f"{shown(path)}: unreadable manifest (nested too deeply); rebuild with: {rebuild}") from None
    if not isinstance(data, dict) or not data.get("key"):
        raise EngineMismatch(f"{shown(path)}: manifest has no key; rebuild with: {rebuild}")
    key = engine_key(data)
    if data["key"] != key:
        raise EngineMismatch(f"{shown(path)}: manifest key {data['key']} does not match its contents ({key}); "
                             f"the manifest was edited; rebuild with: {rebuild}")
    need = ("io",) + (("profiles",) if data.get("kind") == "engine" else ())
    missing = [f for f in need if not isinstance(data.get(f), (dict, list)) or not data.get(f)]
    if missing:
        raise EngineMismatch(f"{shown(path)}: manifest without {', '.join(missing)}; rebuild with: {rebuild}")
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
        raise EngineMismatch(f"{shown(path)}: the manifest records no hash of the {what}; rebuild with: {rebuild}")
    if not onnx:
        regular_file(path, what)
    got = onnx_sha256(path) if onnx else sha256_file(path)
    if got != expected:
        raise EngineMismatch(f"{shown(path)}: the {what} changed since it was built (sha256 {got[:12]}…, manifest "
                             f"{expected[:12]}…); rebuild with: {rebuild}")


def select_engine(root: str | Path, component: str, request: dict, rebuild: str) -> tuple[Path, dict]:
    """The folder under ``root/component`` whose manifest matches ``request``, and that manifest; otherwise
    EngineMismatch with the reason the first candidate was refused (or that none exists) and the rebuild command.
    The chosen plan is hashed and compared with the manifest."""
    base = Path(root) / component
    candidates = sorted(p for p in base.glob("*/manifest.json")) if base.is_dir() else []
    if not candidates:
        raise EngineMismatch(f"no {component} engine under {shown(base)}; build one with: {rebuild}")
    first_error = None
    for path in candidates:
        try:
            manifest = read_manifest(path, root, rebuild)
            verify(manifest, request, rebuild)
            plan = path.parent / "engine.plan"
            if not plan.is_file():
                raise EngineMismatch(f"{shown(path.parent)}: manifest without engine.plan; rebuild with: {rebuild}")
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
    confined(onnx_path, root)  # before the graph is read for its external-data references
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
