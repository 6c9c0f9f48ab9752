"""Named models (``--model NAME[=SPEC]``) and the worker devices (``--gpus``): which worker runs which variant.

A SPEC is comma-separated ``key:value`` items: ``lora:PATH[:STRENGTH]`` (repeatable), ``steps:N``, ``guide:G``,
``shift:S`` (the recipe a job of the model gets when it does not set those fields), ``precision:bf16|fp16|fp8``,
``attention:X``, ``cache:SPEC`` (the step cache of every job of the model) and ``gpus:I,J`` (the workers that
serve it, by their place among the workers: 0 is the first; with ``--gpus_per_worker 1`` that is the place in
``--gpus``, with N the worker of entries N·I .. N·I+N-1). An item without ``:`` continues the value before it,
so ``gpus:0,1`` and ``cache:steps:10,12`` read as one item each. What a SPEC leaves out comes from the shared
options (``--lora``, ``--precision``, ``--attention``). Models without ``gpus:`` share the workers no model
named, split evenly in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from runtime import checks
from runtime.config import RUN
from runtime.errors import InputError, S2VError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
KEYS = ("lora", "steps", "guide", "shift", "precision", "attention", "cache", "gpus")
PRECISIONS = ("bf16", "fp16", "fp8")


@dataclass(frozen=True)
class Device:
    """A worker's devices: ``--gpus_per_worker`` consecutive ``--gpus`` entries, one per rank of its process group
    (one entry, one process, by default)."""

    index: int                      # the worker's place among the workers: its name is w<index>
    gpus: tuple[str | None, ...]    # per rank: the CUDA device index, or None for cpu

    @property
    def name(self) -> str:
        return f"w{self.index}"

    @property
    def ranks(self) -> int:
        return len(self.gpus)

    @property
    def on_cpu(self) -> bool:
        return self.gpus[0] is None

    @property
    def labels(self) -> list[str]:
        return ["cpu" if g is None else f"cuda:{g}" for g in self.gpus]

    @property
    def label(self) -> str:
        return ",".join(self.labels)

    @property
    def visible(self) -> str | None:
        """``CUDA_VISIBLE_DEVICES`` for each of its processes (rank r then uses ``cuda:r``); None on the CPU."""
        return None if self.on_cpu else ",".join(self.gpus)


@dataclass
class ModelSpec:
    name: str
    loras: list = field(default_factory=list)          # runtime.lora.LoraSpec
    sample_steps: int = RUN.sample_steps
    guide_scale: float = RUN.guide_scale
    sample_shift: float = RUN.sample_shift
    precision: str | None = None
    attention: str = "auto"
    cache: str | None = None
    workers: list[int] | None = None                  # gpus:, by place in --gpus; None: a share of the rest

    def recipe(self) -> dict:
        """The job fields a job of this model gets when it does not set them."""
        return {"sample_steps": self.sample_steps, "guide_scale": self.guide_scale, "sample_shift": self.sample_shift}

    def public(self) -> dict:
        """What ``GET /v1/models`` says of it (LoRA file names, never their folders)."""
        return {"recipe": self.recipe(), "precision": self.precision, "attention": self.attention,
                "cache": self.cache, "loras": [{"name": Path(s.path).name, "strength": s.strength} for s in self.loras]}


def parse_gpus(text: str | None, workers: int | None, cuda_count: int, default: list[str],
               per_worker: int = 1) -> list[Device]:
    """``--gpus 0,1`` / ``cpu,cpu``, else ``--workers N`` workers on the ``default`` entries in turn (the device
    ``--device`` names, else every visible CUDA GPU, else cpu), else one worker per ``default`` entry; consecutive
    entries grouped ``per_worker`` to a worker (``--gpus_per_worker``; a CPU default gives each worker that many
    CPU ranks)."""
    if text is not None and workers is not None:
        raise InputError("--gpus and --workers both say which workers to start; pass one of them")
    if per_worker < 1:
        raise InputError(f"--gpus_per_worker {per_worker} must be 1 or more")
    if text is not None:
        entries = [e.strip() for e in text.split(",")]
    elif workers is not None:
        if workers < 1:
            raise InputError(f"--workers {workers} must be 1 or more")
        entries = [default[i % len(default)] for i in range(workers * per_worker)]
    else:
        entries = default * per_worker if default == ["cpu"] else default
    gpus: list[str | None] = []
    for e in entries:
        if e == "cpu":
            gpus.append(None)
        elif e.isascii() and e.isdigit():
            if int(e) >= cuda_count:
                seen = f"GPUs 0..{cuda_count - 1} are" if cuda_count else "no CUDA GPU is"
                raise InputError(f"--gpus {text}: GPU {e} is not visible here ({seen}); pass visible GPUs or cpu")
            gpus.append(str(int(e)))
        else:
            raise InputError(f"--gpus {text}: {e!r} is not a GPU index or cpu; pass e.g. 0,1 or cpu,cpu")
    if len(gpus) % per_worker:
        what = f"--gpus {text}" if text is not None else f"the default devices ({','.join(entries)})"
        raise InputError(f"{what}: {len(gpus)} entries do not make workers of --gpus_per_worker {per_worker}; "
                         f"pass a multiple of {per_worker} entries")
    out = []
    for i in range(len(gpus) // per_worker):
        group = tuple(gpus[i * per_worker:(i + 1) * per_worker])
        said = ",".join(entries[i * per_worker:(i + 1) * per_worker])
        if len({g is None for g in group}) > 1:
            raise InputError(f"--gpus {text}: worker {i} would mix cpu and GPUs ({said}); group cpu entries with cpu "
                             "entries only")
        if group[0] is not None and len(set(group)) < len(group):
            raise InputError(f"--gpus {text}: worker {i} would run two ranks on one GPU ({said}); give each rank its "
                             "own GPU")
        out.append(Device(i, group))
    return out


def parse_model(text: str, base: ModelSpec, max_steps: int) -> ModelSpec:
    """One ``--model NAME[=SPEC]`` over the shared options in ``base``; one-line InputError for any bad item."""
    from runtime.lora import LoraSpec, read_header

    name, _, spec = text.partition("=")
    name = name.strip()
    flag = f"--model {text}"
    if not _NAME.match(name):
        raise InputError(f"{flag}: the name {name!r} must be letters, digits, '.', '_' or '-' (up to 64)")
    out = ModelSpec(name, loras=[], sample_steps=base.sample_steps, guide_scale=base.guide_scale,
                    sample_shift=base.sample_shift, precision=base.precision, attention=base.attention,
                    cache=base.cache)
    items: list[str] = []
    for part in spec.split(",") if spec.strip() else []:
        if ":" in part or not items:
            items.append(part.strip())
        else:
            items[-1] += "," + part.strip()
    for item in items:
        key, _, value = item.partition(":")
        if key not in KEYS or not value:
            raise InputError(f"{flag}: {item!r} is not KEY:VALUE with KEY one of {', '.join(KEYS)}")
        try:
            if key == "lora":
                lora = LoraSpec.parse(value)
                read_header(lora.path)
                out.loras.append(lora)
            elif key == "steps":
                out.sample_steps = checks.check_sample_steps(_number(int, value, key), hi=max_steps)
            elif key == "guide":
                out.guide_scale = checks.check_guide_scale(_number(float, value, key), lo=0.0, hi=100.0)
            elif key == "shift":
                out.sample_shift = checks.check_sample_shift(_number(float, value, key), lo=0.01, hi=100.0)
            elif key == "precision":
                if value not in PRECISIONS:
                    raise InputError(f"precision {value!r}: use one of {', '.join(PRECISIONS)}")
                out.precision = value
            elif key == "attention":
                from runtime.models.attention import CHOICES

                if value not in CHOICES:
                    raise InputError(f"attention {value!r}: use one of {', '.join(CHOICES)}")
                out.attention = value
            elif key == "cache":
                from runtime.cache import CacheSpec

                out.cache = value if CacheSpec.parse(value).enabled else None
            elif key == "gpus":
                out.workers = [_number(int, v, "gpus") for v in value.split(",")]
        except S2VError as exc:  # a bad value, an unreadable LoRA, a cache spec: one line naming the flag
            raise InputError(f"{flag}: {exc}") from None
    if not any(i.startswith("lora:") for i in items):
        out.loras = list(base.loras)
    return out


def _number(kind, value: str, key: str):
    try:
        return kind(value)
    except ValueError:
        raise InputError(f"{key}:{value} is not {'a whole number' if kind is int else 'a number'}") from None


def assign(models: list[ModelSpec], devices: list[Device]) -> dict[str, list[Device]]:
    """Each model's workers: those its ``gpus:`` names, the rest split evenly in order among the others. A worker
    serves one model; every worker serves one."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InputError(f"--model {dup} is given twice; give each model one --model")
    taken: dict[int, str] = {}
    out: dict[str, list[Device]] = {}
    for m in models:
        if m.workers is None:
            continue
        for i in m.workers:
            if not 0 <= i < len(devices):
                raise InputError(f"--model {m.name}: gpus:{i} is not a worker; there are {len(devices)} "
                                 f"(0..{len(devices) - 1})")
            if i in taken:
                raise InputError(f"--model {m.name}: worker {i} already serves --model {taken[i]}; a worker holds "
                                 "one model")
            taken[i] = m.name
        out[m.name] = [devices[i] for i in sorted(set(m.workers))]
    rest = [d for d in devices if d.index not in taken]
    shared = [m for m in models if m.workers is None]
    if shared and len(rest) < len(shared):
        raise InputError(f"{len(shared)} models without gpus: share {len(rest)} workers; add --gpus entries or "
                         "give models gpus:")
    if not shared and rest:
        raise InputError(f"worker {rest[0].index} ({rest[0].label}) serves no --model; drop its --gpus entries or "
                         "name it in a model's gpus:")
    start = 0
    for k, m in enumerate(shared):
        n = len(rest) // len(shared) + (k < len(rest) % len(shared))
        out[m.name] = rest[start:start + n]
        start += n
    return out
