"""Flow-matching solvers: UniPC (bh2, the S2V default), DPM-Solver++ (``dpm++``) and flow-Euler (``euler``).

``euler`` is the few-step distill schedule of LightX2V's step-distilled LoRAs: the shifted sigma grid of the
1000 training timesteps, σ(t) = shift·(t/1000) / (1 + (shift − 1)·t/1000), sampled at the timesteps of
``denoising_steps`` (default: ``steps`` evenly spaced from 1000, e.g. 1000, 750, 500, 250 for 4 steps), the DiT
evaluated at timestep 1000·σ (not truncated to an integer), and x ← x + (σ_next − σ)·v with σ after the last
step 0.

Both reproduce the official Wan2.2 schedulers (``FlowUniPCMultistepScheduler`` and
``FlowDPMSolverMultistepScheduler`` with the settings ``WanS2V.generate`` uses), but are written so a
denoising loop can run without host synchronisation and inside a CUDA graph:

* Every scalar that depends only on the sigma schedule is computed once, on the host, in float64, at
  construction. Each step is a fixed linear combination of at most five tensors, so the whole schedule
  is a ``[steps, 9]`` coefficient table (see ``COLUMNS``).
* ``step`` is pure tensor arithmetic on preallocated state (last corrected sample, two x0-predictions);
  no ``.item()``, no branching on tensor values, one code path for every step (steps that do not use a
  term have a zero coefficient).
* ``step`` advances a Python counter. ``step_at(idx, ...)`` takes the step index as a device tensor
  instead, so one captured graph can be replayed for every step.

Why not diffusers' ``UniPCMultistepScheduler``: it looks the step up by timestep value, branches on the
order in Python and builds small tensors (``torch.tensor(rks)``, ``linalg.solve``) every step, which
syncs and cannot be graph-captured; and it is not the flow-matching variant whose trajectory the golden
data pins down. We own the solver instead (diffusers is not a dependency).

Dtypes: the latent may be float32, bfloat16 or float16 (official: bf16); the arithmetic runs in
float32 (float64 for float64 latents). x0-predictions are kept in the compute dtype, the corrected sample
is rounded to the latent dtype before the predictor and the result is returned in the latent dtype, as
the official code does, which also rounds the corrector's solved rho to the latent dtype (reproduced: the
coefficient table is built per latent dtype). Known deviations from the official bf16 path (all below bf16
resolution): the official multiplies the bf16 sample by the sigma ratio in bf16 and forms the 0-dim
coefficient products in float32; here they are float64-exact coefficients applied in float32. In float32
the trajectory matches the official to ~3e-7 relative L2 (golden ``unipc``).

CUDA graphs: call ``prepare(static_sample)`` (allocates state and table) before capture, capture
``step_at(static_idx, static_v, static_sample)``, then per generation ``reset()`` and per step fill
``static_idx`` and replay. Checked on an H200: replayed graphs give bit-identical results to eager ``step``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from runtime.config import SOLVERS
from runtime.errors import ConfigError

# Column layout of the coefficient table. Step i computes
#   m      = sample - SIGMA * v                                  (x0-prediction, from the uncorrected sample)
#   x      = C_SAMPLE*sample + C_PREV*x_prev + C_M0*m + C_M1*m1 + C_M2*m2   (UniC corrector; x = sample if none)
#   x_next = P_X*x + P_M0*m + P_M1*m1                            (UniP / DPM-Solver++ predictor)
# where x_prev is the corrected sample of step i-1 and m1, m2 are the x0-predictions of steps i-1, i-2.
COLUMNS = ("sigma", "c_sample", "c_prev", "c_m0", "c_m1", "c_m2", "p_x", "p_m0", "p_m1")
SIGMA, C_SAMPLE, C_PREV, C_M0, C_M1, C_M2, P_X, P_M0, P_M1 = range(len(COLUMNS))



def default_denoising_steps(steps: int, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """``steps`` timesteps evenly spaced from ``num_train_timesteps`` down (4 → 1000, 750, 500, 250)."""
    return tuple(num_train_timesteps - i * num_train_timesteps // steps for i in range(steps))


def parse_denoising_steps(text: str) -> tuple[int, ...]:
    """``"1000,750,500,250"`` → a tuple of ints (checked by ``SolverConfig``)."""
    try:
        return tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise ConfigError(f"--denoising_steps {text!r}: give comma-separated integer timesteps, e.g. 1000,750,500,250") from None


@dataclass(frozen=True)
class SolverConfig:
    """What defines a schedule; ``num_train_timesteps`` is 1000 for every Wan model. ``denoising_steps``: the
    euler solver's timesteps (strictly decreasing, in [1, num_train_timesteps]; one per step)."""

    name: str
    steps: int
    shift: float
    num_train_timesteps: int = 1000
    denoising_steps: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in SOLVERS:
            raise ConfigError(f"unknown sample solver {self.name!r}; choose one of: {', '.join(SOLVERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"sampling steps must be a positive integer, got {self.steps!r}; pass e.g. --sample_steps 40")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"sample shift must be a positive finite number, got {self.shift!r}; pass e.g. --sample_shift 3")
        ds = self.denoising_steps
        if ds is None:
            return
        if self.name != "euler":
            raise ConfigError(f"denoising_steps set a timestep list for --sample_solver euler; the {self.name} solver "
                              "takes --sample_steps only")
        ds = tuple(ds)
        if not ds or not all(isinstance(t, int) and not isinstance(t, bool) for t in ds):
            raise ConfigError(f"denoising_steps {ds!r}: give integer timesteps, e.g. 1000,750,500,250")
        if any(not 1 <= t <= self.num_train_timesteps for t in ds) or any(a <= b for a, b in zip(ds, ds[1:])):
            raise ConfigError(f"denoising_steps {','.join(map(str, ds))}: must be strictly decreasing timesteps in "
                              f"[1, {self.num_train_timesteps}], e.g. 1000,750,500,250")
        if len(ds) != self.steps:
            raise ConfigError(f"denoising_steps lists {len(ds)} timesteps but sample_steps is {self.steps}; give one "
                              "timestep per step (or omit --sample_steps)")
        object.__setattr__(self, "denoising_steps", ds)

    @property
    def euler_timesteps(self) -> tuple[int, ...]:
        return self.denoising_steps or default_denoising_steps(self.steps, self.num_train_timesteps)


def _lam(sigma: float) -> float:
    """Half log-SNR of flow matching, log(alpha/sigma) with alpha = 1 - sigma; +-inf at the ends."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


def _shift(sigma: float, shift: float) -> float:
    return shift * sigma / (1 + (shift - 1) * sigma)


def _fp32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _round_to(x: float, dtype: torch.dtype) -> float:
    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


def _linspace(start: float, stop: float, num: int) -> list[float]:
    # numpy's own linspace, so the float64 grid matches the official bit for bit.
    return [float(x) for x in np.linspace(start, stop, num)]


def unipc_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[list[int], list[float]]:
    """Official ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift)``.

    Returns (timesteps, sigmas): ``steps`` int timesteps (truncated, not rounded) and ``steps + 1`` sigmas
    as float32 values (last one 0).
    """
    # Training sigmas are built in float32 and sigma_max read back from them (0.999 -> 0.9990000128746033).
    sigma_max = _fp32(1.0 - 1.0 / num_train_timesteps)
    sigma_min = 0.0
    sig = [_shift(s, shift) for s in _linspace(sigma_max, sigma_min, steps + 1)[:-1]]
    return _finish_schedule(sig, num_train_timesteps)


def dpmpp_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[list[int], list[float]]:
    """Official ``get_sampling_sigmas`` + ``retrieve_timesteps(FlowDPMSolverMultistepScheduler(shift=1), sigmas=..)``.

    Unlike UniPC this schedule starts at sigma = 1 exactly (timestep 1000).
    """
    sig = [_shift(s, shift) for s in _linspace(1.0, 0.0, steps + 1)[:steps]]
    # set_timesteps(sigmas=...) shifts again with the constructor's shift=1, which is the identity.
    return _finish_schedule([_shift(s, 1.0) for s in sig], num_train_timesteps)


def euler_schedule(config: "SolverConfig") -> tuple[list[float], list[float]]:
    """(timesteps, sigmas) of the flow-Euler distill schedule: ``steps`` float timesteps 1000·σ and
    ``steps + 1`` float32 sigmas (last one 0), σ computed in float64 and rounded once."""
    n = config.num_train_timesteps
    sig = [_fp32(_shift(t / n, config.shift)) for t in config.euler_timesteps]
    return [_fp32(s * n) for s in sig], sig + [0.0]


def euler_coefficients(sigmas: list[float]) -> list[list[float]]:
    """x_next = x + (σ_next − σ)·v written in the table's terms: with m = x − σ·v, x_next = (σ_next/σ)·x + (1 − σ_next/σ)·m."""
    rows = []
    for i in range(len(sigmas) - 1):
        row = [0.0] * len(COLUMNS)
        ratio = sigmas[i + 1] / sigmas[i]
        row[SIGMA], row[C_SAMPLE], row[P_X], row[P_M0] = sigmas[i], 1.0, ratio, 1.0 - ratio
        rows.append(row)
    return rows


def _finish_schedule(sig: list[float], num_train_timesteps: int) -> tuple[list[int], list[float]]:
    timesteps = [int(s * num_train_timesteps) for s in sig]  # int64 cast of float64: truncation
    sigmas = [_fp32(s) for s in sig] + [0.0]
    return timesteps, sigmas


def unipc_coefficients(sigmas: list[float], rho_dtype: torch.dtype = torch.float32) -> list[list[float]]:
    """Coefficient rows (``COLUMNS``) of UniPC-2, bh2, x0-prediction, lower_order_final, final sigma 0.

    ``rho_dtype``: the official casts the corrector's solved rho to the latent dtype; pass it to match.
    """
    n = len(sigmas) - 1
    lam = [_lam(s) for s in sigmas]
    alpha = [1.0 - s for s in sigmas]
    rows = []
    prev_order = 0
    for i in range(n):
        row = [0.0] * len(COLUMNS)
        row[SIGMA] = sigmas[i]
        # --- corrector (UniC), order = the predictor order used at step i-1 ---
        if i == 0:
            row[C_SAMPLE] = 1.0
        else:
            h = lam[i] - lam[i - 1]
            phi = math.expm1(-h)  # bh2: B(h) = phi_1 = e^{-h} - 1
            a = alpha[i]
            row[C_PREV] = sigmas[i] / sigmas[i - 1]
            row[C_M1] = -a * phi
            if prev_order == 1:
                rho = 0.5  # official simplification for order 1 (not the solved value)
                row[C_M0] += -a * phi * rho
                row[C_M1] += a * phi * rho
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                hh = -h
                g1 = phi / hh - 1.0
                g2 = g1 / hh - 0.5
                b0, b1 = g1 / phi, 2.0 * g2 / phi
                # R = [[1, 1], [r1, 1]]; R @ (rho0, rho1) = (b0, b1)
                rho0 = (b0 - b1) / (1.0 - r1)
                rho1 = b0 - rho0
                rho0, rho1 = _round_to(rho0, rho_dtype), _round_to(rho1, rho_dtype)
                # x -= a*phi*(rho0*(m2 - m1)/r1 + rho1*(m0 - m1))
                row[C_M2] += -a * phi * rho0 / r1
                row[C_M1] += a * phi * rho0 / r1 + a * phi * rho1
                row[C_M0] += -a * phi * rho1
        # --- predictor (UniP) ---
        order = min(2, n - i, prev_order + 1)  # warm-up and lower_order_final
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)  # -1 at the final sigma 0 (h = inf)
        a = alpha[i + 1]
        row[P_X] = sigmas[i + 1] / sigmas[i]
        row[P_M0] = -a * phi
        if order == 2:
            r1 = (lam[i - 1] - lam[i]) / h
            # x_next -= a*phi*0.5*(m1 - m0)/r1
            row[P_M0] += a * phi * 0.5 / r1
            row[P_M1] = -a * phi * 0.5 / r1
        prev_order = order
        rows.append(row)
    return rows


def dpmpp_coefficients(sigmas: list[float]) -> list[list[float]]:
    """Coefficient rows of multistep DPM-Solver++(2M), midpoint, final sigma 0 (first order at both ends)."""
    n = len(sigmas) - 1
    lam = [_lam(s) for s in sigmas]
    rows = []
    for i in range(n):
        row = [0.0] * len(COLUMNS)
        row[SIGMA] = sigmas[i]
        row[C_SAMPLE] = 1.0
        h = lam[i + 1] - lam[i]
        a = 1.0 - sigmas[i + 1]
        e = math.exp(-h) - 1.0
        # sigma_s = 1 at the start of this schedule: sigma ratio sigma_t / 1 is finite.
        row[P_X] = sigmas[i + 1] / sigmas[i]
        row[P_M0] = -a * e
        if 0 < i < n - 1:
            # D1 = (m0 - m1)/r0 with r0 = h0/h; r0 = inf (so D1 = 0) right after sigma = 1.
            inv_r0 = h / (lam[i] - lam[i - 1])
            row[P_M0] += -0.5 * a * e * inv_r0
            row[P_M1] = 0.5 * a * e * inv_r0
        rows.append(row)
    return rows


class FlowSolver:
    """A multistep flow-matching solver driven by a precomputed coefficient table.

    Usage::

        s = make_scheduler("unipc", 40, 3.0, device)
        for i in range(s.num_steps):
            v = model(latent, s.timesteps[i])
            latent = s.step(v, latent)

    Attributes: ``timesteps`` (int64, what the DiT sees), ``sigmas`` (float32, ``steps + 1``), both on
    ``device``; ``step_index`` (the Python counter).
    """

    def __init__(self, config: SolverConfig, device: torch.device | str | None = None) -> None:
        self.config = config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if config.name == "euler":
            ts, sig = euler_schedule(config)
            t_dtype = torch.float32  # 1000·σ as is (937.5): the distill schedule does not truncate
        else:
            schedule = unipc_schedule if config.name == "unipc" else dpmpp_schedule
            ts, sig = schedule(config.steps, config.shift, config.num_train_timesteps)
            t_dtype = torch.int64
        self._sigmas_host = sig
        self.timesteps = torch.tensor(ts, dtype=t_dtype, device=self.device)
        self.sigmas = torch.tensor(sig, dtype=torch.float32, device=self.device)
        self._tables: dict[tuple[torch.dtype, torch.dtype], torch.Tensor] = {}
        self._state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return self.config.steps

    # -- coefficients -------------------------------------------------------------------------
    def coefficient_rows(self, latent_dtype: torch.dtype = torch.float32) -> list[list[float]]:
        """Float64 host coefficients, one row per step, columns ``COLUMNS``."""
        if self.config.name == "unipc":
            return unipc_coefficients(self._sigmas_host, rho_dtype=latent_dtype)
        if self.config.name == "euler":
            return euler_coefficients(self._sigmas_host)
        return dpmpp_coefficients(self._sigmas_host)

    def coefficients(self, latent_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[steps, len(COLUMNS)]`` table on ``device`` in the compute dtype of ``latent_dtype``."""
        key = (latent_dtype, _compute_dtype(latent_dtype))
        table = self._tables.get(key)
        if table is None:
            table = torch.tensor(self.coefficient_rows(latent_dtype), dtype=torch.float64).to(self.device, key[1])
            self._tables[key] = table
        return table

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start the schedule again (a new clip); keeps the buffers and tables."""
        self.step_index = 0
        if self._state is not None:
            for buf in self._state:
                buf.zero_()  # zero, not empty: unused terms are multiplied by 0 and NaN*0 is NaN

    def prepare(self, sample: torch.Tensor) -> None:
        """Allocate state and the coefficient table for latents like ``sample``.

        Called by the first ``step``; call it explicitly before capturing a CUDA graph.
        """
        cdt = _compute_dtype(sample.dtype)
        state = self._state
        if state is None or state[0].shape != sample.shape or state[0].dtype != cdt or state[0].device != sample.device:
            self._state = tuple(torch.zeros(sample.shape, dtype=cdt, device=sample.device) for _ in range(3))
        self.coefficients(sample.dtype)

    # -- stepping -----------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance one step: ``model_output`` is the velocity v at ``timesteps[step_index]``."""
        if self.step_index >= self.num_steps:
            raise ConfigError(f"solver already took all {self.num_steps} steps; call reset() before reusing it")
        self.prepare(sample)
        row = self.coefficients(sample.dtype)[self.step_index]
        self.step_index += 1
        return self._update(row, model_output, sample)

    def step_at(self, index: torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Like ``step`` with the step index given as an integer tensor on ``device`` (graph capture).

        Does not touch ``step_index``; the caller must go through the steps in order from 0, after
        ``prepare`` (before capture) and ``reset`` (per generation).
        """
        table = self.coefficients(sample.dtype)
        row = table.index_select(0, index.reshape(1).to(torch.long)).reshape(-1)
        return self._update(row, model_output, sample)

    def _update(self, row: torch.Tensor, v: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        if self._state is None:
            self.prepare(sample)
        x_prev, m1, m2 = self._state
        cdt = m1.dtype
        s = sample.to(cdt)
        m = s - row[SIGMA] * v.to(cdt)
        x = s * row[C_SAMPLE]
        x = x.addcmul_(x_prev, row[C_PREV]).addcmul_(m, row[C_M0]).addcmul_(m1, row[C_M1]).addcmul_(m2, row[C_M2])
        if sample.dtype != cdt:
            # the official stores the corrected sample in the latent dtype and predicts from that
            x = x.to(sample.dtype).to(cdt)
        x_next = x * row[P_X]
        x_next = x_next.addcmul_(m, row[P_M0]).addcmul_(m1, row[P_M1])
        m2.copy_(m1)
        m1.copy_(m)
        x_prev.copy_(x)
        return x_next.to(self._out_dtype(sample.dtype, v.dtype))

    def _out_dtype(self, sample_dtype: torch.dtype, v_dtype: torch.dtype) -> torch.dtype:
        return sample_dtype


class FlowUniPC(FlowSolver):
    """UniPC-2 (bh2, x0-prediction, flow prediction, lower_order_final, final sigma 0), official S2V default."""

    def __init__(self, steps: int, shift: float, device: torch.device | str | None = None, num_train_timesteps: int = 1000):
        super().__init__(SolverConfig("unipc", steps, shift, num_train_timesteps), device)


class FlowDPMSolverPP(FlowSolver):
    """Multistep DPM-Solver++(2M), midpoint, final sigma 0: the official ``--sample_solver dpm++``.

    Result dtype follows the official: the sample promoted with the model output dtype (a bf16 latent with
    a float32 velocity becomes float32 after the first step).
    """

    def __init__(self, steps: int, shift: float, device: torch.device | str | None = None, num_train_timesteps: int = 1000):
        super().__init__(SolverConfig("dpm++", steps, shift, num_train_timesteps), device)

    def _out_dtype(self, sample_dtype: torch.dtype, v_dtype: torch.dtype) -> torch.dtype:
        return torch.promote_types(sample_dtype, v_dtype)


def _compute_dtype(latent_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if latent_dtype == torch.float64 else torch.float32


class FlowEuler(FlowSolver):
    """Flow-Euler on the shifted sigma grid at ``denoising_steps`` (LightX2V's distill schedule)."""

    def __init__(self, steps: int, shift: float, device: torch.device | str | None = None,
                 denoising_steps: tuple[int, ...] | None = None, num_train_timesteps: int = 1000):
        super().__init__(SolverConfig("euler", steps, shift, num_train_timesteps, denoising_steps), device)


def make_scheduler(name: str, steps: int, shift: float, device: torch.device | str | None = None,
                   denoising_steps: tuple[int, ...] | None = None) -> FlowSolver:
    """``unipc`` (official default), ``dpm++`` or ``euler``; anything else raises ``ConfigError`` naming the choices."""
    config = SolverConfig(name, steps, shift, denoising_steps=denoising_steps)
    if config.name == "euler":
        return FlowEuler(steps, shift, device, config.denoising_steps)
    return FlowUniPC(steps, shift, device) if config.name == "unipc" else FlowDPMSolverPP(steps, shift, device)
