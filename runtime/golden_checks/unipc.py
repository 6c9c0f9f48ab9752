"""UniPC parity: schedule and a whole solver trajectory against the official scheduler.

Cases are discovered from the key names ``s{steps}_shift{shift}_{timesteps,sigmas,init,traj}`` in
``unipc.safetensors``; the driving velocity is the manifest's ``v = sin(1.7*latent + i) + 0.1*latent``.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from runtime.golden import Case, compare, failed
from runtime.scheduler import FlowUniPC

COMPONENT = "unipc"
_KEY = re.compile(r"^s(\d+)_shift(\d+(?:\.\d+)?)_(timesteps|sigmas|init|traj)$")
TOL_SIGMAS = 1e-6
TOL_TRAJ = 1e-5


def velocity(latent: torch.Tensor, i: int) -> torch.Tensor:
    return torch.sin(latent * 1.7 + i) + 0.1 * latent


def run_trajectory(steps: int, shift: float, init: torch.Tensor) -> torch.Tensor:
    solver = FlowUniPC(steps, shift)
    latent = init.clone()
    out = []
    for i in range(steps):
        latent = solver.step(velocity(latent, i), latent)
        out.append(latent)
    return torch.stack(out)


def check(golden_dir: Path, manifest: dict) -> list[Case]:
    path = Path(golden_dir) / "unipc.safetensors"
    if not path.is_file():
        return [failed(COMPONENT, "-", f"{path} not found")]
    data = load_file(str(path))
    cases: dict[str, tuple[int, float]] = {}
    for key in data:
        match = _KEY.match(key)
        if match:
            cases[f"s{match[1]}_shift{match[2]}"] = (int(match[1]), float(match[2]))
    if not cases:
        return [failed(COMPONENT, "-", "no s{N}_shift{S}_* keys in unipc.safetensors")]

    rows: list[Case] = []
    for name, (steps, shift) in sorted(cases.items(), key=lambda kv: kv[1]):
        need = [f"{name}_{k}" for k in ("timesteps", "sigmas", "init", "traj")]
        missing = [k for k in need if k not in data]
        if missing:
            rows.append(failed(COMPONENT, name, f"missing {', '.join(missing)}"))
            continue
        ref_t, ref_s, init, ref_traj = (data[k] for k in need)
        solver = FlowUniPC(steps, shift)
        rows.append(compare(COMPONENT, f"{name}/timesteps", solver.timesteps, ref_t, 0.0, "exact"))
        rows.append(compare(COMPONENT, f"{name}/sigmas", solver.sigmas, ref_s, TOL_SIGMAS))
        traj = run_trajectory(steps, shift, init.to(torch.float32))
        rows.append(compare(COMPONENT, f"{name}/traj", traj, ref_traj, TOL_TRAJ, f"{steps} steps, fp32"))
    return rows
