"""Flow-matching solvers: golden parity, float64 reference equations, no host syncs, exactness on a linear flow."""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from runtime.errors import ConfigError
from runtime.scheduler import FlowDPMSolverPP, FlowUniPC, dpmpp_schedule, make_scheduler, unipc_schedule
from tests.conftest import golden_dir


# Spec §6.1: what the official feeds the DiT for 40 steps.
SHIFT3_40 = [999, 991, 982, 973, 963, 954, 944, 933, 922, 911, 899, 887, 874, 861, 847, 832, 817, 801, 785, 767,
             749, 730, 710, 688, 666, 642, 617, 590, 562, 531, 499, 465, 428, 388, 345, 299, 249, 195, 136, 71]
SHIFT5_40 = [999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892, 882, 870, 859, 846,
             833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591, 555, 514, 468, 416, 356, 288, 208, 113]


def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
    return torch.sin(x * 1.7 + i) + 0.1 * x


def run(solver, x: torch.Tensor, v_fn=velocity) -> list[torch.Tensor]:
    out = []
    for i in range(solver.num_steps):
        x = solver.step(v_fn(x, i), x)
        out.append(x)
    return out


# ---------------------------------------------------------------------------------------------
# Straightforward float64 references, written from the spec's equations (lists, branches, solve).
def _lam(s: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - s) - torch.log(s)


def ref_unipc(sigmas: list[float], x: torch.Tensor, v_fn) -> list[torch.Tensor]:
    sig = torch.tensor(sigmas, dtype=torch.float64)
    n = len(sigmas) - 1
    ms: list[torch.Tensor] = []
    last = None
    prev_order = 0
    out = []
    for i in range(n):
        m = x - sig[i] * v_fn(x, i)  # from the uncorrected sample
        if i > 0:  # UniC
            h = _lam(sig[i]) - _lam(sig[i - 1])
            hh = -h
            phi = torch.expm1(hh)
            B = torch.expm1(hh)
            a = 1 - sig[i]
            base = sig[i] / sig[i - 1] * last - a * phi * ms[-1]
            if prev_order == 1:
                x = base - a * B * 0.5 * (m - ms[-1])
            else:
                r1 = (_lam(sig[i - 2]) - _lam(sig[i - 1])) / h
                D1 = (ms[-2] - ms[-1]) / r1
                g1 = phi / hh - 1
                g2 = g1 / hh - 0.5
                R = torch.tensor([[1.0, 1.0], [float(r1), 1.0]], dtype=torch.float64)
                b = torch.tensor([float(g1 / B), float(2 * g2 / B)], dtype=torch.float64)
                rho = torch.linalg.solve(R, b)
                x = base - a * B * (rho[0] * D1 + rho[1] * (m - ms[-1]))
        ms.append(m)
        order = min(2, n - i, i + 1)  # spec: min(2, N - i, steps taken so far + 1)
        last = x
        h = _lam(sig[i + 1]) - _lam(sig[i])
        phi = torch.expm1(-h)
        a = 1 - sig[i + 1]
        x = sig[i + 1] / sig[i] * x - a * phi * m
        if order == 2:
            r1 = (_lam(sig[i - 1]) - _lam(sig[i])) / h
            x = x - a * phi * 0.5 * (ms[-2] - m) / r1
        prev_order = order
        out.append(x)
    return out


def ref_dpmpp(sigmas: list[float], x: torch.Tensor, v_fn) -> list[torch.Tensor]:
    sig = torch.tensor(sigmas, dtype=torch.float64)
    n = len(sigmas) - 1
    ms: list[torch.Tensor] = []
    out = []
    for i in range(n):
        ms.append(x - sig[i] * v_fn(x, i))
        a_t = 1 - sig[i + 1]
        h = _lam(sig[i + 1]) - _lam(sig[i])
        if i == 0 or i == n - 1:
            x = sig[i + 1] / sig[i] * x - a_t * (torch.exp(-h) - 1) * ms[-1]
        else:
            r0 = (_lam(sig[i]) - _lam(sig[i - 1])) / h
            D0, D1 = ms[-1], (1.0 / r0) * (ms[-1] - ms[-2])
            x = sig[i + 1] / sig[i] * x - a_t * (torch.exp(-h) - 1) * D0 - 0.5 * a_t * (torch.exp(-h) - 1) * D1
        out.append(x)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------
def test_golden_unipc():
    from runtime.golden_checks.unipc import check

    rows = check(golden_dir(), {})
    assert len(rows) >= 3 * 3
    bad = [r for r in rows if not r.passed]
    assert not bad, bad


def test_spec_timesteps_and_sigmas():
    assert unipc_schedule(40, 3.0)[0] == SHIFT3_40
    assert unipc_schedule(40, 5.0)[0] == SHIFT5_40
    s = FlowUniPC(40, 3.0)
    assert s.timesteps.dtype == torch.int64 and s.sigmas.dtype == torch.float32
    assert s.sigmas.shape == (41,) and float(s.sigmas[-1]) == 0.0
    assert float(s.sigmas[0]) == pytest.approx(0.99967, abs=1e-5)
    assert float(FlowUniPC(8, 1.0).sigmas[0]) == 0.9990000128746033  # fp32 0.999 from the training table
    assert [round(float(x), 5) for x in s.sigmas[-4:]] == [0.19548, 0.13624, 0.07136, 0.0]


def test_dpmpp_schedule():
    ts, sig = dpmpp_schedule(10, 5.0)
    assert ts[0] == 1000 and sig[0] == 1.0 and sig[-1] == 0.0 and len(sig) == 11
    assert all(a > b for a, b in zip(sig, sig[1:]))
    # shift 1: numpy linspace(1, 0, 11)[:10] * 1000 truncated to int64; 0.4 comes out as 399.99999999999994
    assert dpmpp_schedule(10, 1.0)[0] == [1000, 900, 800, 700, 600, 500, 399, 299, 199, 99]


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (3, 5.0), (5, 1.0), (7, 12.5), (13, 2.2), (40, 3.0)])
def test_unipc_matches_float64_reference(steps, shift):
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    solver = FlowUniPC(steps, shift)
    ours = run(solver, x.clone())
    ref = ref_unipc(solver.sigmas.tolist(), x.clone(), velocity)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.dtype == torch.float64
        assert rel(a, b) < 1e-12, (i, rel(a, b))


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 3.0), (3, 5.0), (8, 1.0), (20, 7.0), (40, 3.0)])
def test_dpmpp_matches_float64_reference(steps, shift):
    g = torch.Generator().manual_seed(100 + steps)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    solver = FlowDPMSolverPP(steps, shift)
    ours = run(solver, x.clone())
    ref = ref_dpmpp(solver.sigmas.tolist(), x.clone(), velocity)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert rel(a, b) < 1e-12, (i, rel(a, b))


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_linear_flow_is_solved_exactly(name, dtype, tol):
    # x_t = (1 - s) x0 + s eps has the constant velocity eps - x0; every step of both solvers is exact
    # on it (x0-prediction constant, difference terms zero), so the final sample must be x0.
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(1, 16, 2, 4, 4, generator=g, dtype=dtype)
    eps = torch.randn(1, 16, 2, 4, 4, generator=g, dtype=dtype)
    solver = make_scheduler(name, 9, 4.0)
    s0 = float(solver.sigmas[0])
    x = (1 - s0) * x0 + s0 * eps
    for i in range(solver.num_steps):
        s = float(solver.sigmas[i + 1])
        x = solver.step(eps - x0, x)
        assert rel(x, (1 - s) * x0 + s * eps) < tol, i
    assert rel(x, x0) < tol


def test_step_has_no_host_sync():
    # Any .item()/bool()/float()/tolist() on a tensor inside step would raise here.
    solver = FlowUniPC(6, 3.0)
    x = torch.randn(1, 4, 2, 3, 3)
    solver.prepare(x)
    boom = mock.Mock(side_effect=AssertionError("host sync in step"))
    with mock.patch.object(torch.Tensor, "item", boom), mock.patch.object(torch.Tensor, "__bool__", boom), \
            mock.patch.object(torch.Tensor, "__float__", boom), mock.patch.object(torch.Tensor, "tolist", boom):
        out = run(solver, x.clone())
    assert boom.call_count == 0
    assert rel(out[-1], run(FlowUniPC(6, 3.0), x.clone())[-1]) == 0.0


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_step_at_compiles_to_one_graph_and_matches_step(name):
    # fullgraph=True fails on any graph break (.item(), data-dependent branch); one compiled function
    # with the index as a tensor serves every step, as a replayed CUDA graph would.
    torch._dynamo.reset()
    x = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    steps = 7
    solver = make_scheduler(name, steps, 3.0)
    solver.prepare(x)
    compiled = torch.compile(solver.step_at, fullgraph=True, backend="eager", dynamic=False)
    idx = torch.zeros((), dtype=torch.long)
    y = x.clone()
    got = []
    for i in range(steps):
        idx.fill_(i)
        y = compiled(idx, velocity(y, i), y)
        got.append(y)
    want = run(make_scheduler(name, steps, 3.0), x.clone())
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_reset_and_exhaustion():
    solver = FlowUniPC(4, 3.0)
    x = torch.randn(2, 5)
    first = run(solver, x.clone())
    with pytest.raises(ConfigError, match="reset"):
        solver.step(x, x)
    solver.reset()
    second = run(solver, x.clone())
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_bf16_latent():
    x = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = run(FlowUniPC(10, 3.0), x.clone())[-1]
    xb = x.to(torch.bfloat16)
    solver = FlowUniPC(10, 3.0)
    for i in range(10):
        v = velocity(xb.float(), i)  # the DiT returns float32 velocity
        xb = solver.step(v, xb)
        assert xb.dtype == torch.bfloat16
    assert rel(xb, ref) < 2e-2
    # official dpm++ promotes a bf16 latent with a float32 velocity to float32
    d = FlowDPMSolverPP(4, 3.0)
    assert d.step(torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32


def test_make_scheduler_errors():
    assert isinstance(make_scheduler("unipc", 4, 3.0), FlowUniPC)
    assert isinstance(make_scheduler("dpm++", 4, 3.0), FlowDPMSolverPP)
    with pytest.raises(ConfigError, match=r"unipc, dpm\+\+, euler"):
        make_scheduler("heun", 4, 3.0)
    for steps in (0, -1, 2.5, True):
        with pytest.raises(ConfigError):
            make_scheduler("unipc", steps, 3.0)
    for shift in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ConfigError):
            make_scheduler("unipc", 4, shift)


def test_coefficient_table_shape_and_finiteness():
    for name in ("unipc", "dpm++", "euler"):
        for steps in (1, 2, 40):
            t = make_scheduler(name, steps, 5.0).coefficients()
            assert t.shape == (steps, 9) and t.dtype == torch.float32
            assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------------------------ flow-Euler
def test_euler_distill_schedule_timesteps_and_sigmas():
    # LightX2V's 4-step list at shift 5: timesteps 1000·σ of the shifted grid at 1000, 750, 500, 250
    s = make_scheduler("euler", 4, 5.0, denoising_steps=(1000, 750, 500, 250))
    assert s.timesteps.dtype == torch.float32
    assert s.timesteps.tolist() == pytest.approx([1000.0, 937.5, 2500 / 3, 625.0], rel=1e-7)
    assert s.sigmas.tolist() == pytest.approx([1.0, 0.9375, 5 / 6, 0.625, 0.0], rel=1e-7)
    default = make_scheduler("euler", 4, 5.0)  # evenly spaced from 1000 by default
    assert torch.equal(default.timesteps, s.timesteps)
    assert make_scheduler("euler", 3, 1.0).timesteps.tolist() == pytest.approx([1000.0, 667.0, 334.0])


@pytest.mark.parametrize("steps,shift", [((1000, 750, 500, 250), 5.0), ((1000, 900, 613, 270, 33), 8.0), ((999,), 3.0)])
def test_euler_matches_float64_recomputation(steps, shift):
    """x ← x + (σ_next − σ)·v, σ(t) = shift·t/1000 / (1 + (shift−1)·t/1000), σ after the last step 0."""
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(11))
    solver = make_scheduler("euler", len(steps), shift, denoising_steps=steps)
    sig = [shift * (t / 1000) / (1 + (shift - 1) * t / 1000) for t in steps] + [0.0]
    ours, ref = x.clone(), x.double()
    for i in range(len(steps)):
        v = velocity(ours, i)
        ours = solver.step(v, ours)
        ref = ref + (sig[i + 1] - sig[i]) * velocity(ref, i).double()
        assert rel(ours, ref) < 2e-6, i


def test_euler_refusals():
    for bad in ((1000, 1000, 500), (500, 750), (1001, 500), (1000, 0), ()):
        with pytest.raises(ConfigError, match="denoising_steps"):
            make_scheduler("euler", max(len(bad), 1), 5.0, denoising_steps=bad)
    with pytest.raises(ConfigError, match="one timestep per step"):
        make_scheduler("euler", 3, 5.0, denoising_steps=(1000, 500))
    with pytest.raises(ConfigError, match="sample_solver euler"):
        make_scheduler("unipc", 2, 5.0, denoising_steps=(1000, 500))
