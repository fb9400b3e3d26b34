"""The unified sampler: exact on a point mass for any schedule, NFE accounting, devices and dtypes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from solversearch import DiscreteVP, KarrasVE, LinearVP, RectifiedFlow, SolverSchedule, Step, presets, solve
from solversearch.grids import GRIDS, grid_applies
from solversearch.models import alpha_sigma
from solversearch.plan import compile_plan, phi

from .strategies import schedules

MU = torch.tensor([0.3, -0.7, 1.2, 0.05], dtype=torch.float64)


class PointMass(torch.nn.Module):
    """Data = a single point μ: ε*(x, t) = (x − α μ)/σ exactly."""

    def __init__(self, noise):
        super().__init__()
        self.noise_schedule = noise
        self.path_alpha_sigma = noise.torch_alpha_sigma()
        self.calls = 0

    def forward(self, x, t, target="eps"):
        self.calls += 1
        if target == "x0":  # asked only where α = 0 (a flow grid at σ = 1)
            return MU.expand_as(x)
        alpha, sigma = alpha_sigma(self.path_alpha_sigma, t, x.ndim)
        return (x - alpha * MU) / sigma


def exact_point_mass(noise, x_T, t_start, t_end):
    """x_t = α_t μ + (σ_t/σ_s)(x_s − α_s μ)."""
    a_s, s_s, a_t, s_t = (
        float(v) for v in (noise.alpha(t_start), noise.sigma(t_start), noise.alpha(t_end), noise.sigma(t_end))
    )
    return a_t * MU + (s_t / s_s) * (x_T - a_s * MU)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


X_T = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "noise", [DiscreteVP.from_diffusers_config({}), LinearVP(), RectifiedFlow(shift=3.0), KarrasVE()], ids=repr
)
@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_every_preset_on_every_grid_is_exact_on_a_point_mass(noise, preset):
    """Every path, every grid that exists on it (FlowMatchEuler's from σ = 1 included)."""
    for grid in [g for g in GRIDS if grid_applies(g, noise)]:
        for nfe in (3, 7, 12):
            schedule = presets.build(preset, noise, nfe, grid)
            out = solve(PointMass(noise), schedule, X_T).sample
            exact = exact_point_mass(noise, X_T, schedule.timesteps[0], schedule.timesteps[-1])
            assert relative_error(out, exact) <= 1e-8, (grid, nfe)


@settings(max_examples=300, deadline=None)
@given(schedules(with_skip=False).map(lambda s: dataclasses.replace(s, first_step="model")))
def test_any_valid_schedule_is_exact_on_a_point_mass(schedule):
    """Orders 1–4, both predictions, all scalings, correctors, arbitrary active points: a point mass has
    a constant x̂₀ (and a constant ε along the exact path), so every exponential-integrator update is exact."""
    noise = DiscreteVP.from_diffusers_config({})
    out = solve(PointMass(noise), schedule, X_T).sample
    exact = exact_point_mass(noise, X_T, schedule.timesteps[0], schedule.timesteps[-1])
    assert relative_error(out, exact) <= 1e-8


@settings(max_examples=100, deadline=None)
@given(schedules())
def test_the_model_is_called_exactly_nfe_times(schedule):
    class Counting(PointMass):
        def forward(self, x, t, skip=()):
            return super().forward(x, t)

    model = Counting(DiscreteVP.from_diffusers_config({}))
    solve(model, schedule, X_T)
    assert model.calls == schedule.nfe


def test_skip_sets_reach_the_model_at_their_step(ddpm_noise):
    seen = []

    def denoiser(x, t, skip=frozenset()):
        seen.append((round(float(t[0]), 6), tuple(skip)))
        return torch.zeros_like(x)

    steps = (Step(skip=("mid.attn",)), Step(), Step(skip=("up.1", "down.0")))
    schedule = SolverSchedule(timesteps=(1.0, 0.6, 0.3, 0.05), steps=steps)
    solve(denoiser, schedule, X_T, ddpm_noise)
    assert seen == [(1.0, ("mid.attn",)), (0.6, ()), (0.3, ("up.1", "down.0"))]


def test_analytic_first_step_uses_eps_equal_to_x_T(ddpm_noise):
    """One noise-form step with ε̂ = x_T: x_t = (α_t/α_s) x_T − σ_t (e^h − 1) x_T, no model call."""
    schedule = SolverSchedule(timesteps=(1.0, 0.4), steps=(Step(prediction="noise"),), first_step="analytic")
    model = PointMass(ddpm_noise)
    out = solve(model, schedule, X_T).sample
    a_s, a_t = ddpm_noise.alpha(1.0), ddpm_noise.alpha(0.4)
    h = ddpm_noise.lambda_(0.4) - ddpm_noise.lambda_(1.0)
    expected = (a_t / a_s) * X_T - ddpm_noise.sigma(0.4) * np.expm1(h) * X_T
    assert model.calls == 0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_trajectory_holds_every_time_and_ends_at_the_sample(ddpm_noise):
    schedule = presets.build("unipc_2_bh2", ddpm_noise, 6, "logsnr")
    solution = solve(PointMass(ddpm_noise), schedule, X_T, return_trajectory=True)
    assert len(solution.trajectory) == len(schedule.timesteps)
    assert solution.trajectory[0] is X_T and solution.trajectory[-1] is solution.sample
    for t, x in zip(schedule.timesteps, solution.trajectory):
        assert relative_error(x, exact_point_mass(ddpm_noise, X_T, 1.0, t)) <= 1e-8


def test_the_step_loop_never_synchronises_with_the_device(ddpm_noise):
    """On the meta device there is no data: any .item(), bool(tensor) or host copy inside the loop raises."""

    def denoiser(x, t):
        return x * 0.5 + t[:, None]

    for name in presets.PRESETS:
        schedule = presets.build(name, ddpm_noise, 8, "trailing")
        x_T = torch.empty(3, 4, device="meta")
        assert solve(denoiser, schedule, x_T, ddpm_noise).sample.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes_stay_in_their_dtype(ddpm_noise, dtype):
    schedule = presets.build("dpmpp_2m", ddpm_noise, 10, "logsnr")

    def denoiser(x, t):
        assert x.dtype == dtype and t.dtype == torch.float32
        return PointMass(ddpm_noise)(x.double(), t.double()).to(dtype)

    out = solve(denoiser, schedule, X_T.to(dtype), ddpm_noise).sample
    assert out.dtype == dtype
    exact = exact_point_mass(ddpm_noise, X_T, 1.0, schedule.timesteps[-1])
    assert relative_error(out.double(), exact) < (1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_phi_functions_match_their_integral_definition(k):
    """φ_k(z) = ∫₀¹ e^{(1−u)z} u^{k−1}/(k−1)! du, including tiny and large |z|."""
    from math import factorial

    from scipy.integrate import quad

    for z in (-30.0, -4.0, -1.0, -0.999, -1e-3, -1e-9, 0.0, 1e-9, 1e-3, 0.5, 1.0, 6.0):
        expected, _ = quad(
            lambda u, z=z: np.exp((1 - u) * z) * u ** (k - 1) / factorial(k - 1), 0, 1, epsabs=0, epsrel=1e-13
        )
        assert phi(k, z) == pytest.approx(expected, rel=1e-12)


def test_compiled_plan_releases_points_nobody_reads_again(ddpm_noise):
    plan = compile_plan(presets.build("unipc_3_bh2", ddpm_noise, 10, "logsnr"), ddpm_noise)
    held, peak = set(), 0
    for i, step in enumerate(plan.steps):
        held.add(i)
        peak = max(peak, len(held))
        held -= set(step.release)
    assert peak <= 4


@pytest.mark.parametrize("path", ["vp", "edm", "flow"])
def test_the_analytic_first_step_agrees_with_evaluating_the_model_on_every_path(path, ddpm_noise):
    """At the first time x_T ≈ σ_T ε, so ε̂ = x_T/σ_T (x_T itself on VP and flow, where x_T ~ N(0, I)):
    skipping that one evaluation must land where evaluating the exact mixture lands, to a small fraction
    of the sample (an EDM x_T has standard deviation σ_max = 80, so taking ε̂ = x_T there is far off)."""
    from dataclasses import replace

    from solversearch import KarrasVE, RectifiedFlow, presets
    from solversearch.models import GaussianMixtureDenoiser

    noise = {"vp": ddpm_noise, "edm": KarrasVE(), "flow": RectifiedFlow(shift=3.0)}[path]
    model = GaussianMixtureDenoiser.fit_digits(noise)
    schedule = presets.build("dpmpp_2m", noise, 20, "logsnr")
    x_T = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_T = x_T * noise.prior_std(schedule.timesteps[0])
    evaluated = solve(model, schedule, x_T).sample
    analytic = solve(model, replace(schedule, first_step="analytic"), x_T).sample
    assert relative_error(analytic, evaluated) < 0.01
