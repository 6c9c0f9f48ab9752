"""The official checkpoint layout and strict, memory-mapped loading.

``Wan2.2-S2V-14B/`` holds the DiT as ``config.json`` + ``diffusion_pytorch_model.safetensors.index.json``
+ shards (or a single ``diffusion_pytorch_model.safetensors``). Loading builds the model on the meta
device and assigns tensors read one at a time from the memory-mapped files, converted straight to
the target dtype and device: no randomly initialised copy and no float32 round trip of the 33 GB.
Every checkpoint key must be consumed and every parameter filled; errors name the file and keys.

Every file a loader reads is confined to the checkpoint folder (:func:`inside`): index entries with
``..`` or absolute paths, and links that lead out of the folder, are refused. ``.pth`` files are read
with ``weights_only=True``, so loading a checkpoint never runs code from it. Error messages never quote
a file's bytes (a foreign file may be a secret).
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
import torch.nn as nn

from runtime.errors import CheckpointError
from runtime.quoting import shown

log = logging.getLogger(__name__)

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
            # The length field is not quoted in the message: for a foreign file it is 8 bytes of its contents.
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: not a safetensors file (its header length field exceeds the file); "
                                      "re-download the file")
            header = json.loads(fh.read(n))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({err.strerror or type(err).__name__}); "
                              "check the file and its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not valid JSON); re-download it") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; re-download the file")
    header.pop("__metadata__", None)
    data_end = 0
    for key, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or not isinstance(info.get("shape"), list)
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])):
            raise CheckpointError(f"{path}: corrupt entry for {key!r} in the safetensors header; re-download the file")
        data_end = max(data_end, offsets[1])
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, header needs {8 + n + data_end}); re-download it")
    return header


def _hf_cache_blob(root: Path, real: Path) -> bool:
    """A Hugging Face cache snapshot (``<repo>/snapshots/<rev>/``) links its files to ``<repo>/blobs/``."""
    return root.parent.name == "snapshots" and real.parent == root.parent.parent / "blobs"


def inside(folder: Path, name: str, source: str) -> Path:
    """``folder / name``, refused unless it stays inside ``folder``.

    ``name`` must be relative without ``..`` (as written in an index or by this project), and its real
    path, links followed, must lie in the folder (or in the blobs of the Hugging Face cache repo the
    folder is a snapshot of). ``source`` names the file that referred to ``name``, for the message.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source}: invalid file entry {name!r}; re-download the checkpoint")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
        raise CheckpointError(f"{source}: file entry {name!r} points outside the checkpoint folder; only files "
                              "inside the folder are loaded (re-download the index)")
    path = folder / rel
    try:
        root, real = folder.resolve(strict=True), path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a link loop on older Pythons
        raise CheckpointError(f"{path}: cannot resolve ({type(err).__name__}); check the checkpoint folder") from None
    if real != root and root not in real.parents and not _hf_cache_blob(root, real):
        raise CheckpointError(f"{path}: links to {real}, outside the checkpoint folder; copy the file into the folder")
    return path


def dit_weight_files(folder: Path) -> dict[str, Path]:
    """Map every DiT tensor name to the file that holds it (index json + shards, or a single file)."""
    index = folder / DIT_INDEX
    if index.is_file():
        inside(folder, DIT_INDEX, str(folder))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise CheckpointError(f"{index}: invalid index ({type(err).__name__}); re-download it") from None
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: invalid index (a weight_map entry is not a file name); re-download it")
        shards = {shard: inside(folder, shard, str(index)) for shard in sorted(set(weight_map.values()))}
        missing = sorted({name for name, p in shards.items() if not p.is_file()})
        if missing:
            raise CheckpointError(f"{folder}: shard(s) {_first(missing)} listed in {DIT_INDEX} are missing; download them")
        return {name: shards[shard] for name, shard in weight_map.items()}
    single = folder / DIT_SINGLE
    if single.is_file():
        inside(folder, DIT_SINGLE, str(folder))
        return {name: single for name in read_safetensors_header(single)}
    raise CheckpointError(f"{folder}: neither {DIT_INDEX} nor {DIT_SINGLE} found; pass the Wan2.2-S2V-14B folder (CLI: --ckpt_dir)")


def single_file_map(path: Path) -> dict[str, Path]:
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    return {name: path for name in read_safetensors_header(path)}


def check_folder(folder: Path) -> None:
    """Every file the pipeline reads from the official folder stays inside it (see :func:`inside`).

    Covers config.json, the VAE and T5 files, everything under the tokenizer and wav2vec2 folders
    (transformers reads those) and the DiT index with its shards; cheap (no weights are read), so it runs
    before any model is loaded.
    """
    for rel in (DIT_CONFIG, VAE_FILE, T5_FILE, T5_TOKENIZER, WAV2VEC_DIR):
        inside(folder, rel, str(folder))
    dit_weight_files(folder)
    for sub in (T5_TOKENIZER, WAV2VEC_DIR):
        base = folder / sub
        for dirpath, dirnames, filenames in os.walk(base):  # does not descend into linked folders...
            for name in dirnames + filenames:  # ...but checks where every link leads
                rel = Path(dirpath, name).relative_to(folder).as_posix()
                inside(folder, rel, str(base))


def load_torch_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A ``.pth`` state dict of tensors: ``weights_only`` (never runs code from the file), memory-mapped
    when the format allows; legacy (non-zip, ``_use_new_zipfile_serialization=False``) files and
    filesystems that cannot map fall back to a plain read. ``what`` names the file in messages."""
    try:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except (RuntimeError, OSError, ValueError) as err:  # a legacy file, or no mmap on this filesystem
            log.info("%s: cannot memory-map (%s), reading it into memory instead", shown(path), type(err).__name__)
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # torch's weights_only refusal of a pickled class or function
            raise CheckpointError(f"{path}: the {what} holds objects other than tensors, which are never unpickled "
                                  "(they could run code); use the official file") from None
        raise CheckpointError(f"{path}: not a readable {what} (PyTorch checkpoint expected); the file is "
                              "truncated or corrupt, re-download it") from None
    except Exception:  # the reader's message may quote file bytes: name the type of problem only
        raise CheckpointError(f"{path}: not a readable {what} (PyTorch checkpoint expected); the file is "
                              "truncated or corrupt, re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: the {what} is not a plain state dict of tensors; use the official file")
    return sd


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
        if not bool(torch.isfinite(new_state[name]).all()):  # a NaN weight would change the video silently
            raise CheckpointError(f"{source}: {name} holds NaN/Inf values; the checkpoint is damaged (re-download it)")
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key(s) {_first(unexpected)}; the checkpoint is not the S2V model described by its config.json")
    if missing:
        raise CheckpointError(f"{source}: missing key(s) {_first(missing)}; the checkpoint is incomplete (re-download it)")
    model.load_state_dict(new_state, strict=True, assign=True)
    return model
