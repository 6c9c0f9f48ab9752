"""LoRA files merged into the DiT weights once, at load.

A LoRA (or a file of full weight deltas) changes a model's weights; merged once into them, the denoising step,
compiled blocks and CUDA graphs are the same as without it and cost nothing extra. For each patched weight W::

    W ← round_to_dtype(W_fp32 + Σ_files strength · scale · up @ down  (+ Σ strength · diff))

with every delta formed in float32 on the weight's device and the sum rounded once to the weight's dtype. The
merge runs before FP8 quantisation (``WanS2VDiT.set_precision`` refuses a merge after it) and may run before or
after the QKV fusion: a delta of ``self_attn.q/k/v`` is added to its rows of the fused weight, which rounds the
same elements the same way.

Key families (``../shared/specs/lora_formats.md``): any of the prefixes ``diffusion_model.``, ``transformer.``,
``base_model.model.``, ``pipe.dit.``, ``model.``; pairs ``lora_down``/``lora_up`` and ``lora_A``/``lora_B`` (with
or without ``.weight``, with or without ``.default``); kohya / musubi / VideoX-Fun ``lora_unet_`` and
``lora_unet__`` paths with ``_`` for ``.`` (resolved against the model's own module names); diffusers module names
(``attn1.to_q`` …); per-module ``.alpha`` (scale alpha / rank; else 1, or PEFT's ``lora_alpha / r`` from an
``adapter_config.json`` beside the file); full deltas ``.diff`` (weight), ``.diff_b`` (bias), ``.diff_m`` and
``.modulation.diff`` (a block's or the head's modulation); ``lora_B.bias`` (a bias delta).

Only safetensors files are read (never unpickled). Everything that can be checked from the header (key names and
shapes against the model's parameters) is checked before the model's weights load (:func:`plan`); the tensors are
read and checked for non-finite values when merged (:func:`merge`).
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from runtime.checkpoint import read_safetensors_header
from runtime.manifest import sha256_file
from runtime.errors import ConfigError

log = logging.getLogger(__name__)

PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "pipe.dit.", "model.")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")

# (suffix, role) tried longest first: the role says which half of the pair, or which kind of full delta.
_PAIR_SUFFIXES = [(f".{name}{default}{weight}", role)
                  for name, role in (("lora_down", "down"), ("lora_up", "up"), ("lora_A", "down"), ("lora_B", "up"))
                  for default in (".default", "") for weight in (".weight", "")]
_SUFFIXES = sorted(_PAIR_SUFFIXES + [(".lora_B.bias", "up_bias"), (".lora_B.default.bias", "up_bias"),
                                     (".alpha", "alpha"), (".modulation.diff", "diff_m"), (".diff_m", "diff_m"),
                                     (".diff_b", "diff_b"), (".diff", "diff")],
                   key=lambda s: -len(s[0]))

# diffusers' Wan transformer names → the official ones (applied to files that use diffusers names).
_DIFFUSERS = [(r"\.attn1\.", ".self_attn."), (r"\.attn2\.", ".cross_attn."), (r"\.to_q$", ".q"), (r"\.to_k$", ".k"),
              (r"\.to_v$", ".v"), (r"\.to_out\.0$", ".o"), (r"\.ffn\.net\.0\.proj$", ".ffn.0"), (r"\.ffn\.net\.2$", ".ffn.2"),
              (r"\.norm2$", ".norm3"),
              (r"^condition_embedder\.time_embedder\.linear_1$", "time_embedding.0"),
              (r"^condition_embedder\.time_embedder\.linear_2$", "time_embedding.2"),
              (r"^condition_embedder\.time_proj$", "time_projection.1"),
              (r"^condition_embedder\.text_embedder\.linear_1$", "text_embedding.0"),
              (r"^condition_embedder\.text_embedder\.linear_2$", "text_embedding.2"),
              (r"^proj_out$", "head.head")]
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", "condition_embedder.", "proj_out.", ".to_q.", ".ffn.net.")


class LoraError(ConfigError):
    """A LoRA file cannot be merged into this model (named file, key, and the fix)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file and its strength (``--lora PATH[:STRENGTH]``)."""

    path: Path
    strength: float = 1.0

    def __post_init__(self):
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise LoraError(f"LoRA {self.path}: strength {s!r} is not a finite number; pass PATH:1.0 (or PATH alone for 1.0)")
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "strength", float(s))

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``PATH`` or ``PATH:STRENGTH``; a path that itself contains ``:`` works when the part after the last
        ``:`` is not a number (``C:/x.safetensors``) or when a strength follows it."""
        path, sep, tail = str(text).rpartition(":")
        if sep and path:
            try:
                strength = float(tail)
            except ValueError:
                return cls(Path(text))
            if not math.isfinite(strength):
                raise LoraError(f"--lora {text}: strength {tail!r} is not a finite number; pass PATH:1.0")
            return cls(Path(path), strength)
        return cls(Path(text))


def as_specs(loras: Iterable | None) -> list[LoraSpec]:
    """``[(path, strength)]``, ``[path]``, ``["PATH:S"]`` or ``LoraSpec`` items → specs (library arguments)."""
    out = []
    for item in loras or ():
        if isinstance(item, LoraSpec):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(LoraSpec(Path(item[0]), item[1]))
        elif isinstance(item, (str, Path)):
            out.append(LoraSpec.parse(str(item)) if isinstance(item, str) else LoraSpec(item))
        else:
            raise LoraError(f"loras entry {item!r}: pass (path, strength) pairs or paths")
    return out


# --------------------------------------------------------------------------------------------- planning
@dataclass
class Patch:
    """What one file does to one parameter of the model (checkpoint names: ``blocks.0.self_attn.q.weight``)."""

    param: str
    kind: str                      # "lora" (up @ down), "lora_bias" (lora_B.bias), "diff" (a full delta)
    keys: tuple[str, ...]          # the file's keys that make it: (down, up), (bias,) or (diff,)
    rank: int = 0
    alpha_key: str | None = None   # the module's .alpha (scale alpha / rank), if the file has one


@dataclass
class Plan:
    """The result of matching one file's keys to the model, before any tensor is read."""

    spec: LoraSpec
    patches: list[Patch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # keys of modules this model does not have
    peft_scale: float | None = None                     # lora_alpha / r from adapter_config.json

    @property
    def modules(self) -> int:
        return sum(p.kind == "lora" for p in self.patches)

    @property
    def deltas(self) -> int:
        return sum(p.kind == "diff" for p in self.patches)

    def summary(self) -> str:
        names = sorted({(_split_suffix(k) or (k, ""))[0] for k in self.skipped})  # one name per skipped module
        first = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        skipped = f"; skipped {len(self.skipped)} key(s) of modules this model lacks: {first}" if self.skipped else ""
        return (f"LoRA {self.spec.path.name} (strength {self.spec.strength:g}): {self.modules} module(s) patched, "
                f"{self.deltas} full delta(s) applied{skipped}")


def _strip_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _split_suffix(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def _diffusers_name(module: str) -> str:
    for pat, rep in _DIFFUSERS:
        module = re.sub(pat, rep, module)
    return module


def _model_names(model_shapes: Mapping[str, Sequence[int]]) -> tuple[set[str], dict[str, str]]:
    """Module names (parameters minus ``.weight``/``.bias``, plus parameter names themselves) and the
    underscore form of each, for ``lora_unet_`` keys."""
    modules = {n.rsplit(".", 1)[0] for n in model_shapes if n.endswith((".weight", ".bias"))}
    names = modules | set(model_shapes)
    under: dict[str, str] = {}
    for n in names:
        under.setdefault(n.replace(".", "_"), n)
    return modules, under


def plan(spec: LoraSpec, model_shapes: Mapping[str, Sequence[int]]) -> Plan:
    """Match the keys of ``spec``'s file to the model's parameters (``name -> shape``, checkpoint names) from
    its header alone; raise LoraError for anything that would not merge."""
    path = spec.path
    header = read_header(path)
    modules, under = _model_names(model_shapes)
    diffusers = any(any(m in k for m in _DIFFUSERS_MARKERS) for k in header)
    groups: dict[str, dict[str, str]] = {}    # module -> role -> key
    result = Plan(spec, peft_scale=_peft_scale(path))
    for key in sorted(header):
        name = _strip_prefix(key)
        split = _split_suffix(name)
        if split is None:
            result.skipped.append(key)
            continue
        module, role = split
        if module.startswith("lora_unet_"):
            module = under.get(module[len("lora_unet_"):].lstrip("_"), module)
        elif diffusers:
            module = _diffusers_name(module)
        if role == "diff_m":
            module = f"{module}.modulation" if module else "modulation"
        roles = groups.setdefault(module, {})
        if role in roles:
            raise LoraError(f"{path}: keys {roles[role]!r} and {key!r} both give the {role} of {module}; the file mixes "
                            "two copies of one LoRA: export it again")
        roles[role] = key
    for module, roles in groups.items():
        result.patches.extend(_patches(path, module, roles, header, model_shapes, modules, result.skipped))
    if not result.patches:
        raise LoraError(f"{path}: none of its {len(header)} keys matches a module of this model (first: "
                        f"{', '.join(sorted(header)[:3])}); it is not a LoRA for the Wan2.2-S2V DiT")
    result.skipped.sort()
    return result


def _patches(path: Path, module: str, roles: dict[str, str], header: dict, shapes: Mapping[str, Sequence[int]],
             modules: set[str], skipped: list[str]) -> list[Patch]:
    out: list[Patch] = []
    pair = {r: roles[r] for r in ("down", "up") if r in roles}
    if pair:
        if len(pair) == 1:
            (role, key), = pair.items()
            raise LoraError(f"{path}: {key} has no matching lora_{'up' if role == 'down' else 'down'} key; the file is "
                            "incomplete: export it again")
        if module not in modules or f"{module}.weight" not in shapes:
            skipped.extend(roles.values())
            return out
        down_s, up_s = list(header[pair["down"]]["shape"]), list(header[pair["up"]]["shape"])
        w = list(shapes[f"{module}.weight"])
        rank = down_s[0] if down_s else 0
        ok = (len(down_s) >= 2 and len(up_s) >= 2 and up_s[1] == rank and up_s[0] == w[0]
              and math.prod(down_s[1:]) == math.prod(w[1:]) and all(d == 1 for d in up_s[2:]))
        if not ok:
            raise LoraError(f"{path}: {pair['down']} {down_s} and {pair['up']} {up_s} do not make a delta of "
                            f"{module}.weight {w}; this LoRA is for another model")
        alpha = roles.get("alpha")
        out.append(Patch(f"{module}.weight", "lora", (pair["down"], pair["up"]), rank, alpha))
        if "up_bias" in roles:
            out.append(_full(path, f"{module}.bias", roles["up_bias"], header, shapes, "lora_bias", rank, alpha))
    elif "alpha" in roles and len(roles) == 1:
        skipped.append(roles["alpha"])  # an alpha without its pair changes nothing
    for role, suffix in (("diff", "weight"), ("diff_b", "bias")):
        if role in roles:
            target = f"{module}.{suffix}"
            if target not in shapes:
                skipped.append(roles[role])
            else:
                out.append(_full(path, target, roles[role], header, shapes))
    if "diff_m" in roles:
        if module not in shapes:
            skipped.append(roles["diff_m"])
        else:
            out.append(_full(path, module, roles["diff_m"], header, shapes))
    return out


def _full(path: Path, target: str, key: str, header: dict, shapes, kind: str = "diff", rank: int = 0,
          alpha: str | None = None) -> Patch:
    got, want = list(header[key]["shape"]), list(shapes[target])
    if math.prod(got) != math.prod(want) or [d for d in got if d != 1] != [d for d in want if d != 1]:
        raise LoraError(f"{path}: {key} has shape {got}, {target} is {want}; this LoRA is for another model")
    return Patch(target, kind, (key,), rank, alpha)


def read_header(path: Path) -> dict:
    """The safetensors header of a LoRA file (refusing pickles, missing and damaged files in one line)."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(f"{path}: a pickle file ({path.suffix}); LoRAs are read from .safetensors only (pickles could "
                        "run code): convert it with safetensors.torch.save_file(torch.load(f, weights_only=True), out)")
    if not path.is_file():
        raise LoraError(f"{path}: LoRA file not found; pass --lora PATH[:STRENGTH] with an existing .safetensors file")
    try:
        header = read_safetensors_header(path)
    except ConfigError:
        raise
    except Exception as err:  # CheckpointError is an S2VError too, but name the LoRA
        raise LoraError(f"{path}: not a LoRA safetensors file ({err})") from None
    if not header:
        raise LoraError(f"{path}: the file holds no tensors; it is not a LoRA")
    return header


def _peft_scale(path: Path) -> float | None:
    """``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) from a PEFT ``adapter_config.json`` beside the file."""
    cfg_path = path.with_name("adapter_config.json")
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
        r, alpha = cfg["r"], cfg.get("lora_alpha", cfg["r"])
        if not (isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0 and math.isfinite(alpha)):
            raise ValueError("r / lora_alpha")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise LoraError(f"{cfg_path}: unreadable PEFT adapter config ({type(err).__name__}); fix or remove it") from None
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise LoraError(f"{cfg_path}: per-module rank_pattern/alpha_pattern are not supported; merge them into the file "
                        "as per-module .alpha keys")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else float(r))


def checkpoint_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes under their checkpoint names (q/k/v even in a fused model)."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def check(specs: Sequence[LoraSpec], model_shapes: Mapping[str, Sequence[int]]) -> list[Plan]:
    """Plan every file (header only): the checks that can run before the model's weights load."""
    return [plan(s, model_shapes) for s in specs]


# --------------------------------------------------------------------------------------------- merging
def _target(model: nn.Module, param: str) -> tuple[torch.Tensor, slice | None]:
    """The tensor that holds ``param`` (checkpoint name) in ``model``, and the rows of it (fused q/k/v)."""
    parent, _, leaf = param.rpartition(".")
    owner_name, _, proj = parent.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if proj in ("q", "k", "v") and getattr(owner, "qkv", None) is not None:
        fused = getattr(owner.qkv, leaf)
        d = fused.shape[0] // 3
        i = "qkv".index(proj)
        return fused, slice(i * d, (i + 1) * d)
    return model.get_parameter(param), None


def _tensor(fh, key: str, path: Path, device) -> torch.Tensor:
    t = fh.get_tensor(key)
    if not (t.is_floating_point() or key.endswith(".alpha")):
        raise LoraError(f"{path}: {key} has dtype {t.dtype}; a LoRA holds floating-point tensors")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise LoraError(f"{path}: {key} holds NaN/Inf values; the file is damaged: download or export it again")
    return t


def _delta(fh, p: Patch, plan_: Plan, shape: Sequence[int], device) -> torch.Tensor:
    path, strength = plan_.spec.path, plan_.spec.strength
    if p.kind == "diff":
        return _tensor(fh, p.keys[0], path, device).reshape(shape) * strength
    if p.alpha_key is not None:
        alpha = _tensor(fh, p.alpha_key, path, device).reshape(-1)
        if alpha.numel() != 1:
            raise LoraError(f"{path}: {p.alpha_key} holds {alpha.numel()} values; an alpha is one number")
        scale = float(alpha[0]) / p.rank
    else:
        scale = plan_.peft_scale if plan_.peft_scale is not None else 1.0
    if p.kind == "lora_bias":
        return _tensor(fh, p.keys[0], path, device).reshape(shape) * (strength * scale)
    down = _tensor(fh, p.keys[0], path, device)
    up = _tensor(fh, p.keys[1], path, device)
    return (up.reshape(up.shape[0], p.rank) @ down.reshape(p.rank, -1)).reshape(shape) * (strength * scale)


def merge(model: nn.Module, specs: Sequence[LoraSpec], round_dtype: torch.dtype | None = None,
          device: torch.device | str | None = None) -> list[Plan]:
    """Merge ``specs`` into ``model``'s weights in place (one rounding per weight); returns the plans (logged).

    ``round_dtype``: parameters held in float32 although the model computes in bf16/fp16 (its fp32 islands) are
    rounded through this dtype after the merge, as if the merged weights had been stored in the checkpoint's
    dtype (None: no extra rounding). ``device``: where a weight held on the host is merged (each one moved there and
    back): a model streamed from host memory merged on its GPU gets the bits of a merge on the GPU-resident model
    (the delta's matmul runs on the same kernels); None: where the weight is."""
    from safetensors import safe_open

    if not specs:
        return []
    if getattr(model, "precision", None) == "fp8":
        raise LoraError("LoRAs are merged into the bf16 weights before FP8 quantisation; load the model again and "
                        "pass the LoRAs at load (loras=... / --lora)")
    plans = check(specs, checkpoint_shapes(model))
    by_param: dict[str, list[tuple[int, Patch]]] = {}
    for i, pl in enumerate(plans):
        for p in pl.patches:
            by_param.setdefault(p.param, []).append((i, p))
    with ExitStack() as stack:
        files = []
        for pl in plans:
            try:
                files.append(stack.enter_context(safe_open(str(pl.spec.path), framework="pt", device="cpu")))
            except Exception as err:
                raise LoraError(f"{pl.spec.path}: cannot open ({type(err).__name__}); the file is damaged") from None
        # One weight at a time: the float32 deltas of a 14B model would not fit beside it.
        for param, patches in by_param.items():
            tensor, rows = _target(model, param)
            view = tensor.data if rows is None else tensor.data[rows]
            work = tensor.device if device is None or tensor.device.type != "cpu" else torch.device(device)
            merged = view.to(work, torch.float32, copy=True)
            for i, p in patches:
                d = _delta(files[i], p, plans[i], view.shape, work)
                if not bool(torch.isfinite(d).all()):
                    raise LoraError(f"{plans[i].spec.path}: the delta of {param} overflows float32 (strength "
                                    f"{plans[i].spec.strength:g}); the file is damaged or the strength too large")
                merged += d
            if round_dtype is not None and view.dtype == torch.float32 and round_dtype != torch.float32:
                merged = merged.to(round_dtype)
            merged = merged.to(view.dtype)
            if not bool(torch.isfinite(merged).all()):
                raise LoraError(f"{param} overflows {view.dtype} after merging {', '.join(str(plans[i].spec.path) for i, _ in patches)}; "
                                "lower the strength")
            view.copy_(merged)
    for pl in plans:
        log.info("%s", pl.summary())
    return plans


def flags(specs: Sequence[LoraSpec]) -> str:
    """The ``--lora`` flags that name ``specs`` (for the rebuild commands in messages)."""
    return "".join(f" --lora {s.path}:{s.strength:g}" for s in specs)


def identity(specs: Sequence[LoraSpec]) -> list[dict]:
    """What engines record of a merge: each file's sha256 and strength, in order (``[]`` without LoRAs)."""
    return [{"sha256": sha256_file(s.path), "strength": s.strength} for s in specs]
