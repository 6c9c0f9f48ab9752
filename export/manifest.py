"""Writing manifests (the reading side, keys and checks are ``runtime.manifest``, shared with the backends).

An ONNX graph ``<stem>.onnx`` gets ``<stem>.manifest.json`` beside it; an engine folder ``<component>/<key>/``
gets ``manifest.json``. Both are written atomically with their ``key``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from export.files import write_text
from runtime.manifest import (checkpoint_identity, engine_key, onnx_manifest_path, onnx_sha256,  # noqa: F401
                              sha256_file)

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool", 11: "float64"}


def write_manifest(path: str | Path, fields: dict) -> Path:
    """Write ``fields`` plus their ``key`` to ``path`` (a ``.json`` file, or a folder: ``folder/manifest.json``)."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "manifest.json"
    data = {**fields, "key": engine_key(fields), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    return path


def onnx_io(graph) -> dict:
    """Names, element types and shapes (-1 for a dynamic dimension) of an ONNX graph's inputs and outputs."""
    def entry(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]}
    inits = {i.name for i in graph.graph.initializer}
    return {"inputs": [entry(v) for v in graph.graph.input if v.name not in inits],
            "outputs": [entry(v) for v in graph.graph.output]}


def write_onnx_manifest(onnx_path: str | Path, component: str, precision: str, checkpoint: str, **extra) -> Path:
    """Manifest of an exported graph: what it was exported from, its hash (graph + external data) and I/O."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    fields = {"kind": "onnx", "component": component, "precision": precision, "checkpoint": checkpoint_identity(checkpoint),
              "onnx_sha256": onnx_sha256(onnx_path), "opset": max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
              "io": onnx_io(graph), **extra}
    return write_manifest(onnx_manifest_path(onnx_path), fields)
