"""The official checkpoint layout and strict, memory-mapped loading.

``Wan2.2-S2V-14B/`` holds the DiT as ``config.json`` + ``diffusion_pytorch_model.safetensors.index.json``
+ shards (or a single ``diffusion_pytorch_model.safetensors``). Loading builds the model on the meta
device and assigns tensors read one at a time from the memory-mapped files, converted straight to
the target dtype and device: no randomly initialised copy and no float32 round trip of the 33 GB.
Every checkpoint key must be consumed and every parameter filled; errors name the file and keys.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn

from runtime.errors import CheckpointError

DIT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIT_SINGLE = "diffusion_pytorch_model.safetensors"
DIT_CONFIG = "config.json"
VAE_FILE = "Wan2.1_VAE.pth"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"

_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "BOOL"}


def _first(items, n: int = 5) -> str:
    items = sorted(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def read_safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; a truncated or corrupt file raises CheckpointError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: file is truncated ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} bytes); re-download the file")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors file ({err}); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file")
    header.pop("__metadata__", None)
    data_end = 0
    for key, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES or len(info.get("data_offsets", ())) != 2:
            raise CheckpointError(f"{path}: corrupt entry for {key!r} in the safetensors header; re-download the file")
        data_end = max(data_end, int(info["data_offsets"][1]))
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, header needs {8 + n + data_end}); re-download it")
    return header


def dit_weight_files(folder: Path) -> dict[str, Path]:
    """Map every DiT tensor name to the file that holds it (index json + shards, or a single file)."""
    index = folder / DIT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: invalid index ({err}); re-download it") from None
        files = {name: folder / shard for name, shard in weight_map.items()}
        missing = sorted({p.name for p in files.values() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {_first(missing)} listed in {DIT_INDEX} are missing; download them")
        return files
    single = folder / DIT_SINGLE
    if single.is_file():
        return {name: single for name in read_safetensors_header(single)}
    raise CheckpointError(f"{folder}: neither {DIT_INDEX} nor {DIT_SINGLE} found; point --ckpt_dir at the Wan2.2-S2V-14B folder")


def single_file_map(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    return {name: path for name in read_safetensors_header(path)}


def iter_tensors(files: dict[str, Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from memory-mapped safetensors files, one tensor at a time."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        header = read_safetensors_header(path)
        absent = [n for n in names if n not in header]
        if absent:
            raise CheckpointError(f"{path}: does not contain {_first(absent)} although the index says so; re-download it")
        with ExitStack() as stack:
            try:
                fh = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as err:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{path}: cannot open ({err}); re-download it") from None
            for name in names:
                try:
                    yield name, fh.get_tensor(name)
                except CheckpointError:
                    raise
                except Exception as err:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({err}); re-download it") from None


def assign_strict(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], source: str,
                  dtype_for: Callable[[str], torch.dtype | None], device: torch.device | str) -> nn.Module:
    """Fill a meta-device ``model`` from ``tensors``; every key consumed, every parameter filled, shapes checked.

    ``dtype_for(name)`` gives the target dtype of a parameter (None keeps the checkpoint's dtype).
    """
    expected = dict(model.state_dict(keep_vars=True))
    seen: set[str] = set()
    unexpected: list[str] = []
    new_state: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        if name not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(f"{source}: {name} has shape {list(tensor.shape)}, the model expects {list(want)}; "
                                  "the checkpoint does not match its config.json")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {name} has dtype {tensor.dtype}, expected a floating-point tensor; the file is not a model checkpoint")
        target = dtype_for(name) or tensor.dtype
        new_state[name] = tensor.to(device=device, dtype=target)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {_first(unexpected)}; the checkpoint is not the S2V model described by its config.json")
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {_first(missing)}; the checkpoint is incomplete (re-download it)")
    model.load_state_dict(new_state, strict=True, assign=True)
    return model
