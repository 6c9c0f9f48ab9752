"""Step caches: skip the DiT's block stack on denoising steps where its residual barely moves (opt-in, lossy).

On a skipped step no transformer block runs: the velocity is ``head(h + r)``, with h this step's block input
(patch and time embeddings as usual) and r = ``blocks(h') − h'`` kept from the last computed step, one per CFG
branch. The solver, the embeddings and the head run as on any step. Every clip starts with an empty cache.

Methods (``--cache``, library ``cache=``):

- ``off`` (default): every step computed: the exact path.
- ``magcache[:THRESH[:K[:RETAIN]]]`` (MagCache): after the first RETAIN fraction of the steps, multiply the
  calibrated residual magnitude ratios γ_t, add |1 − Πγ| to an error, and skip while the error stays below THRESH
  and at most K steps in a row; a computed step resets both. γ comes from a calibration of the user's own
  checkpoint and recipe (``python -m runtime.calibrate``), so the whole schedule is known before sampling starts
  and no step waits on the GPU. With CFG a step is skipped only when both branches would skip it.
- ``easy[:THRESH[:RETAIN]]`` (EasyCache-style, no calibration): from the last two computed steps, the
  transformation rate k = mean|Δv| / mean|Δx| of the cond branch; each later step adds k·mean|x_t − x_{t−1}| /
  mean|v_{t−1}| to an error and is skipped while it stays below THRESH; the first RETAIN fraction and the last
  step are always computed. One scalar per step is read back from the GPU (a host sync).
- ``steps:N,M,...``: skip exactly these denoising steps (1-based, as the progress shows them): for measurements
  and hand-made schedules.

Threshold 0 (or a schedule that skips nothing) never asks the backend for a residual: the exact path, bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime import lora
from runtime.checkpoint import dit_weight_files
from runtime.manifest import checkpoint_identity
from runtime.errors import ConfigError, InputError
from runtime.media.atomic import write_file

log = logging.getLogger(__name__)

METHODS = ("off", "magcache", "easy", "steps")
DEFAULTS = {"magcache": (0.12, 2, 0.2), "easy": (0.05, 0.2)}
CALIBRATION_NAME = "s2v_cache_calibration.json"  # beside the checkpoint's config.json unless --out says otherwise
CALIBRATION_FORMAT = "wan-s2v-step-cache-calibration"
CALIBRATION_VERSION = 1
BRANCHES = ("cond", "uncond")
CACHE_HELP = ("skip DiT block stacks on steps where they barely change (lossy, opt-in): off (default, exact), "
              "magcache[:THRESH[:K[:RETAIN]]] (needs python -m runtime.calibrate once per checkpoint and recipe; "
              "defaults 0.12:2:0.2), easy[:THRESH[:RETAIN]] (no calibration; defaults 0.05:0.2), or steps:N,M,... "
              "(skip these 1-based steps); check the cost with python -m runtime.quality --test_cache")


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` value."""

    method: str = "off"
    thresh: float = 0.0
    k: int = 0
    retain: float = 0.0
    skip: tuple[int, ...] = ()  # method "steps": 0-based step indices

    @classmethod
    def parse(cls, text: "str | CacheSpec | None") -> "CacheSpec":
        if text is None or isinstance(text, CacheSpec):
            return text or cls()
        text = str(text).strip()
        name, _, rest = text.partition(":")
        parts = [p for p in rest.split(":")] if rest else []

        def bad(why: str) -> ConfigError:
            return ConfigError(f"cache {text!r}: {why} (choose off, magcache[:THRESH[:K[:RETAIN]]], "
                               "easy[:THRESH[:RETAIN]] or steps:N,M,...)")

        if name == "off" and not parts:
            return cls()
        if name == "steps":
            try:
                steps = sorted({int(v) for v in rest.split(",") if v.strip()})
            except ValueError:
                raise bad("steps:N,M,... takes comma-separated 1-based step numbers") from None
            if not steps or steps[0] < 2:
                raise bad("steps:N,M,... takes step numbers from 2 (step 1 has no residual to reuse)")
            return cls("steps", skip=tuple(s - 1 for s in steps))
        if name not in DEFAULTS:
            raise bad(f"unknown method {name!r}")
        defaults = DEFAULTS[name]
        if len(parts) > len(defaults):
            raise bad(f"{name} takes at most {len(defaults)} values")
        values = list(defaults)
        for i, p in enumerate(parts):
            try:
                values[i] = type(defaults[i])(p)
            except ValueError:
                raise bad(f"{p!r} is not a {'whole number' if isinstance(defaults[i], int) else 'number'}") from None
        thresh, *more = values
        if not (math.isfinite(thresh) and thresh >= 0):
            raise bad("THRESH must be a finite number ≥ 0 (0 skips nothing)")
        retain = more[-1]
        if not (math.isfinite(retain) and 0 <= retain <= 1):
            raise bad("RETAIN is the fraction of first steps always computed, in [0, 1]")
        k = more[0] if name == "magcache" else 0
        if name == "magcache" and k < 1:
            raise bad("K (most consecutive skips) must be ≥ 1")
        return cls(name, thresh, k, retain)

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def __str__(self) -> str:
        if self.method == "off":
            return "off"
        if self.method == "steps":
            return "steps:" + ",".join(str(s + 1) for s in self.skip)
        if self.method == "magcache":
            return f"magcache:{self.thresh:g}:{self.k}:{self.retain:g}"
        return f"easy:{self.thresh:g}:{self.retain:g}"


# --------------------------------------------------------------------------------------------- schedules
def retained_steps(steps: int, retain: float) -> int:
    """Leading steps always computed: the RETAIN fraction, and at least the first (no residual exists before it)."""
    return max(1, int(steps * retain))


def magcache_schedule(ratios: list[list[float]], thresh: float, k: int, retain: float) -> list[bool]:
    """Skip flags per step from calibrated magnitude ratios (one list per CFG branch, one ratio per step).

    Each branch accumulates its own ratio product and error; a step is skipped only when every branch stays
    under ``thresh`` (the worse branch decides) and fewer than ``k`` steps in a row were skipped; a computed
    step resets every branch."""
    steps = len(ratios[0])
    skip = [False] * steps
    if thresh <= 0:
        return skip
    n = len(ratios)
    prod, err, run = [1.0] * n, [0.0] * n, 0
    for i in range(retained_steps(steps, retain), steps):
        run += 1
        for b in range(n):
            prod[b] *= ratios[b][i]
            err[b] += abs(1 - prod[b])
        if max(err) < thresh and run <= k:
            skip[i] = True
        else:
            prod, err, run = [1.0] * n, [0.0] * n, 0
    return skip


class ClipPlan:
    """One clip's cache state: which steps to skip, the residuals kept (one per call slot), what was done."""

    def __init__(self, steps: int):
        self.steps = steps
        self.residuals: dict[int, object] = {}
        self.skipped: list[int] = []

    def skip(self, i: int, x: torch.Tensor) -> bool:
        return False

    def keep_residual(self, i: int) -> bool:
        """Whether computed step ``i`` must hand back its residual (a later step may reuse it)."""
        return False

    def store(self, slot: int, residual) -> None:
        self.residuals[slot] = residual

    def observe(self, i: int, x: torch.Tensor, v: torch.Tensor, skipped: bool) -> None:
        """After step ``i``: its input latents and (cond) velocity."""

    def finish(self) -> None:
        self.residuals.clear()

    @property
    def computed(self) -> int:
        return self.steps - len(self.skipped)


class SchedulePlan(ClipPlan):
    """A skip schedule known before sampling (magcache, steps): no host sync."""

    def __init__(self, skip: list[bool]):
        super().__init__(len(skip))
        self.flags = [bool(s) for s in skip]

    def skip(self, i: int, x: torch.Tensor) -> bool:
        if self.flags[i]:
            self.skipped.append(i)
        return self.flags[i]

    def keep_residual(self, i: int) -> bool:
        return i + 1 < self.steps and self.flags[i + 1]


class EasyPlan(ClipPlan):
    """EasyCache-style decisions from the latents and velocities of this clip (one host sync per step)."""

    def __init__(self, steps: int, thresh: float, retain: float):
        super().__init__(steps)
        self.thresh, self.first = thresh, retained_steps(steps, retain)
        self.err: torch.Tensor | float = 0.0
        self.rate: torch.Tensor | None = None  # k of the last two computed steps (on the device)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # the previous step's (x, v)
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []    # the last two computed steps' (x, v)

    def _may_skip(self, i: int) -> bool:
        return self.thresh > 0 and self.first <= i < self.steps - 1

    def skip(self, i: int, x: torch.Tensor) -> bool:
        if not self._may_skip(i) or self.rate is None or self.prev is None or not self.residuals:
            return False
        px, pv = self.prev
        err = self.err + self.rate * (x.float() - px).abs().mean() / pv.abs().mean().clamp_min(1e-12)
        if float(err) < self.thresh:  # the one host sync of this method
            self.err = err
            self.skipped.append(i)
            return True
        self.err = 0.0
        return False

    def keep_residual(self, i: int) -> bool:
        return self._may_skip(i + 1)

    def observe(self, i: int, x: torch.Tensor, v: torch.Tensor, skipped: bool) -> None:
        if self.thresh <= 0:
            return
        x, v = x.float().clone(), v.float().clone()
        self.prev = (x, v)
        if not skipped:
            self.pairs = (self.pairs + [(x, v)])[-2:]
            if len(self.pairs) == 2:
                (x0, v0), (x1, v1) = self.pairs
                self.rate = (v1 - v0).abs().mean() / (x1 - x0).abs().mean().clamp_min(1e-12)


class RecordPlan(ClipPlan):
    """Calibration: every step computed, with its residual; per step and branch the magnitude ratio
    mean‖r_t‖/‖r_{t−1}‖ (per token), its std, the mean norm and the cosine distance to the previous residual."""

    def __init__(self, steps: int):
        super().__init__(steps)
        self.prev: dict[int, torch.Tensor] = {}
        self.stats: dict[int, list[torch.Tensor]] = {}

    def keep_residual(self, i: int) -> bool:
        return True

    def store(self, slot: int, residual: torch.Tensor) -> None:
        for b in range(residual.shape[0]):
            branch = slot + b  # batch-2 CFG: entries 0, 1; two calls: slots 0, 1
            r = residual[b].float()
            norm = r.norm(dim=-1)
            prev = self.prev.get(branch)
            if prev is None:
                row = torch.stack([torch.ones_like(norm[0]), torch.zeros_like(norm[0]), norm.mean(),
                                   torch.zeros_like(norm[0])])
            else:
                ratio = norm / prev.norm(dim=-1).clamp_min(1e-12)
                cos = torch.nn.functional.cosine_similarity(r, prev, dim=-1)
                row = torch.stack([ratio.mean(), ratio.std(), norm.mean(), 1 - cos.mean()])
            self.stats.setdefault(branch, []).append(row)  # stays on the device: one read-back per clip
            self.prev[branch] = r

    def result(self) -> dict:
        out = {}
        for branch, rows in sorted(self.stats.items()):
            table = torch.stack(rows).cpu().tolist()
            out[BRANCHES[branch]] = {name: [r[j] for r in table] for j, name in
                                     enumerate(("mag_ratio", "mag_std", "norm", "cos_dist"))}
        return out


# --------------------------------------------------------------------------------------------- calibration file
def recipe_of(opts, size: tuple[int, int]) -> dict:
    """What a calibration depends on besides the weights: the schedule, CFG and the latent shape."""
    return {"sample_steps": opts.sample_steps, "sample_shift": float(opts.sample_shift), "sample_solver": opts.solver,
            "guide_scale": float(opts.guide_scale), "denoising_steps": list(opts.denoising_steps or []),
            "infer_frames": opts.infer_frames, "size": [int(size[0]), int(size[1])]}


def model_identity(name: str, loras=()) -> dict:
    """What a calibration is tied to: the checkpoint (``engines.checkpoint_identity``, plus sampled bytes of every
    DiT shard, which tell a fine-tune of the same layout apart) and the merged LoRAs (sha256 and strength).
    ``name``: a checkpoint folder, or the name of a built-in/benchmark model (tiny, random-14b)."""
    folder = Path(name) if name and name not in ("tiny", "random-14b") and Path(name).is_dir() else None
    if folder is None:  # the built-in or benchmark models are named by their seed
        ident = {"checkpoint": checkpoint_identity(name) if name in ("tiny", "random-14b") else (name or "unnamed")}
    else:
        ident = {"checkpoint": checkpoint_identity(folder), "weights": weights_fingerprint(dit_weight_files(folder).values())}
    ident["loras"] = lora.identity(lora.as_specs(loras))
    return ident


def calibrate_command(ckpt: str, opts, size: tuple[int, int], loras=()) -> str:
    """The ``runtime.calibrate`` command that makes the calibration this run needs."""
    where = "" if Path(ckpt).is_dir() else " --out FILE"  # the built-in tiny model has no folder to write beside
    cmd = (f"python -m runtime.calibrate --ckpt_dir {ckpt}{where} --image IMAGE --audio AUDIO --size {size[0]}*{size[1]} "
           f"--sample_steps {opts.sample_steps} --sample_shift {opts.sample_shift:g} --sample_guide_scale "
           f"{opts.guide_scale:g} --sample_solver {opts.solver} --infer_frames {opts.infer_frames}")
    if opts.denoising_steps:
        cmd += " --denoising_steps " + ",".join(str(t) for t in opts.denoising_steps)
    return cmd + "".join(f" --lora {x.path}:{x.strength:g}" for x in loras)


def weights_fingerprint(files) -> str:
    """sha256 over each weight file's name, size and 8 × 64 KiB read at evenly spaced offsets: tells apart two
    checkpoints of the same layout (a fine-tune) without reading tens of GB."""
    h = hashlib.sha256()
    for path in sorted({Path(p) for p in files}):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for j in range(8):
                fh.seek(size * j // 8)
                h.update(fh.read(1 << 16))
    return h.hexdigest()


@dataclass
class Calibration:
    model: dict
    recipe: dict
    clips: list[dict]  # per clip: {"cond": {"mag_ratio": [...], ...}, "uncond": {...}}
    made: dict = field(default_factory=dict)
    path: Path | None = None  # where it was read from

    def to_json(self) -> str:
        return json.dumps({"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "model": self.model,
                           "recipe": self.recipe, "made": self.made, "clips": self.clips}, indent=1)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        return write_file(path, self.to_json().encode(), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"cache calibration {path} not found; make one with python -m runtime.calibrate "
                              "(or pass --cache_calibration FILE)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ConfigError(f"cache calibration {path} is not readable JSON ({type(exc).__name__}); make it again "
                              "with python -m runtime.calibrate") from None
        if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
            raise ConfigError(f"{path} is not a step-cache calibration (made by python -m runtime.calibrate)")
        if raw.get("version") != CALIBRATION_VERSION:
            raise ConfigError(f"{path}: calibration format version {raw.get('version')!r}, this version reads "
                              f"{CALIBRATION_VERSION}; make it again with python -m runtime.calibrate")
        cal = cls(raw.get("model"), raw.get("recipe"), raw.get("clips"), raw.get("made") or {}, path)
        cal._check_shape(path)
        return cal

    def _check_shape(self, path) -> None:
        steps = (self.recipe or {}).get("sample_steps") if isinstance(self.recipe, dict) else None
        ok = isinstance(self.model, dict) and isinstance(steps, int) and isinstance(self.clips, list) and self.clips
        for clip in self.clips if ok else ():
            ok = ok and isinstance(clip, dict) and "cond" in clip and all(
                isinstance(clip[b], dict) and isinstance(clip[b].get("mag_ratio"), list)
                and len(clip[b]["mag_ratio"]) == steps
                and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in clip[b]["mag_ratio"])
                for b in clip if b in BRANCHES)
        if not ok:
            raise ConfigError(f"{path}: the calibration's fields are damaged; make it again with python -m runtime.calibrate")

    def check(self, model: dict, recipe: dict, path, command: str) -> None:
        """Refuse a calibration of another model (checkpoint, LoRAs) or recipe, naming the first difference."""
        for what, mine, theirs in (("model", model, self.model), ("recipe", recipe, self.recipe)):
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise ConfigError(f"cache calibration {path} was made for {key}={_short(theirs.get(key))}, this run "
                                      f"has {key}={_short(mine.get(key))}; make one for this {what} with: {command}")

    def schedule(self, clip: int, spec: CacheSpec) -> list[bool]:
        """Skip flags for clip ``clip`` (clips past the calibrated ones use the last calibrated clip)."""
        entry = self.clips[min(clip, len(self.clips) - 1)]
        ratios = [entry[b]["mag_ratio"] for b in BRANCHES if b in entry]
        return magcache_schedule(ratios, spec.thresh, spec.k, spec.retain)


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 40 else s[:16] + "…"


class StepCache:
    """What the sampler asks once per clip for that clip's plan (None: no cache)."""

    def __init__(self, spec: CacheSpec, calibration: Calibration | None = None):
        if spec.method == "magcache" and calibration is None:
            raise ConfigError("cache magcache needs a calibration of this checkpoint; make one with python -m "
                              "runtime.calibrate (or use --cache easy, which needs none)")
        self.spec, self.calibration = spec, calibration
        self.log: list[dict] = []

    def for_clip(self, clip: int, steps: int) -> ClipPlan | None:
        s = self.spec
        if s.method == "off":
            return None
        if s.method == "steps":
            if s.skip and s.skip[-1] >= steps:
                raise InputError(f"cache {s}: step {s.skip[-1] + 1} is past the last of {steps} steps")
            return SchedulePlan([i in s.skip for i in range(steps)])
        if s.method == "magcache":
            return SchedulePlan(self.calibration.schedule(clip, s))
        return EasyPlan(steps, s.thresh, s.retain)

    def done(self, clip: int, clips: int, plan: ClipPlan) -> None:
        self.log.append({"clip": clip, "computed": plan.computed, "skipped": [i + 1 for i in plan.skipped]})
        log.info("clip %d/%d: cache %s computed %d of %d steps%s", clip + 1, clips, self.spec, plan.computed,
                 plan.steps, f" (skipped {', '.join(str(i + 1) for i in plan.skipped)})" if plan.skipped else "")


class Recorder(StepCache):
    """Calibration run: every step computed and measured."""

    def __init__(self):
        super().__init__(CacheSpec())
        self.clips: list[dict] = []

    def for_clip(self, clip: int, steps: int) -> ClipPlan:
        return RecordPlan(steps)

    def done(self, clip: int, clips: int, plan: ClipPlan) -> None:
        self.clips.append(plan.result())
