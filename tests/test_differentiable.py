"""The differentiable plan (differentiable.py) is a second implementation of the coefficients: its
derivatives pass `torch.autograd.gradcheck` (finite differences in float64) for every coefficient
function, every order, both prediction types, every scaling and UniC; its numbers equal the host plan's
(plan.py, NumPy) to float64 rounding; and sampling with it gives `solve`'s samples, with gradients that
reach the times through the network's time input as well as the coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from solversearch import DiscreteVP, LinearVP, RectifiedFlow, SolverSchedule, Step, presets, solve
from solversearch import differentiable as dp
from solversearch.grids import logsnr_uniform
from solversearch.models import GaussianMixtureDenoiser
from solversearch.plan import compile_plan
from solversearch.sampler import execute

from .test_exact_steps import PROBE  # every order, both forms, every scaling, both factors, UniC, a step to t = 0

S = Step
SCALINGS = [S(scaling="none"), S(scaling="bh1"), S(scaling="bh2"), S(scaling="linear", linear_coefficient=0.7)]
OPEN_END = SolverSchedule(  # ends at t > 0: the last λ is finite and learnable too
    timesteps=(0.9, 0.6, 0.35, 0.15, 0.04, 0.002),
    steps=(
        S("noise", 1, (), "bh1", corrector="unic"),
        S("data", 2, ((1,),), "bh2", corrector="unic"),
        S("data", 3, ((1, 2), (1, 2))),
        S("noise", 2, ((2,),), "linear", -0.4),
        S("data", 2, ((1,),), "bh1"),
    ),
    first_step="analytic",
)
NOISES = [DiscreteVP.from_diffusers_config({}), LinearVP()]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_phi_has_exact_gradients_on_both_sides_of_its_series_switch(k):
    z = f64([-3.0, -0.999, -0.3, -1e-4, 1e-4, 0.3, 0.999, 1.001, 2.5])
    assert torch.autograd.gradcheck(lambda z: dp.phi(k, z), (z,))
    # and its values are the host's (plan.phi, an independent implementation)
    from solversearch.plan import phi

    np.testing.assert_allclose(dp.phi(k, z).detach().numpy(), [phi(k, float(v)) for v in z.detach()], rtol=1e-13)


@pytest.mark.parametrize("q, n", [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3)])
def test_derivative_weights_have_exact_gradients(q, n):
    r = f64([-1.0, -2.3, -3.1][:q])
    assert torch.autograd.gradcheck(lambda r: dp.derivative_weights(r, n), (r,))


@pytest.mark.parametrize("step", SCALINGS, ids=lambda s: s.scaling)
def test_every_scaling_has_exact_gradients(step):
    hh = f64([-2.0, -0.4, 0.3, 1.7])
    assert torch.autograd.gradcheck(lambda hh: dp.first_derivative_scale(step, hh), (hh,))


@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_an_update_of_every_order_has_exact_gradients_in_its_log_snr_values(order, prediction):
    lambdas = f64([-2.5, -1.6, -0.9, -0.1, 0.8])
    s = order - 1  # enough history behind point s for its order
    points = [list(range(s - order + 1, s))] * (order - 1)

    def coefficients(lambdas):
        scales = [dp.first_derivative_scale(S(scaling="bh2"), lambdas[s + 1] - lambdas[s])] + [
            lambdas.new_tensor(0.5)
        ] * (order - 2)
        x_coef, weights = dp.exponential_update(prediction, s, lambdas, lambdas[s + 1], points, scales[: order - 1])
        return torch.stack([x_coef, *weights.values()])

    assert torch.autograd.gradcheck(coefficients, (lambdas,))


def _flat(plan) -> torch.Tensor:
    numbers = []
    for step in plan.steps:
        numbers += [step.alpha, step.sigma, step.predict.x_coef, *(w for _, w in step.predict.weights)]
        if step.correct_previous is not None:
            numbers += [step.correct_previous.x_coef, *(w for _, w in step.correct_previous.weights)]
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in numbers])


@pytest.mark.parametrize("schedule", [PROBE, OPEN_END], ids=["to_zero", "open_end"])
def test_the_whole_plan_including_unic_has_exact_gradients_in_its_lambdas_and_factors(schedule):
    noise = LinearVP()
    finite = schedule.n_steps + 1 - schedule.ends_at_zero
    lambdas = f64(noise.lambda_(np.array(schedule.timesteps[:finite])))
    factors = f64([s.first_derivative_factor for s in schedule.steps])
    times = torch.tensor(schedule.timesteps, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda lam, fac: _flat(dp.plan_from_lambdas(schedule, lam, times, fac)), (lambdas, factors)
    )


def _host_numbers(plan) -> list[float]:
    return _flat(plan).tolist()


SCHEDULES = {
    "probe": PROBE,
    "open_end": OPEN_END,
    "dpmpp_3m": presets.dpmpp_3m(list(logsnr_uniform(LinearVP(), 6, 1.0, 1e-3))),
    "unipc_3_bh1": presets.unipc([1.0, 0.7, 0.45, 0.25, 0.1, 0.0], p=3, variant="bh1"),
}


@pytest.mark.parametrize("noise", NOISES, ids=repr)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_differentiable_plan_equals_the_host_plan_to_float64_rounding(name, noise):
    schedule = SCHEDULES[name]
    host, torch_plan = compile_plan(schedule, noise), dp.differentiable_plan(schedule, noise)
    assert [s.release for s in host.steps] == [s.release for s in torch_plan.steps]
    assert [[p for p, _ in s.predict.weights] for s in host.steps] == [
        [p for p, _ in s.predict.weights] for s in torch_plan.steps
    ]
    np.testing.assert_allclose(_host_numbers(torch_plan), _host_numbers(host), rtol=1e-12, atol=1e-12)
    assert [float(s.t) for s in torch_plan.steps] == [s.t for s in host.steps]


def _mixture(noise):
    rng = np.random.default_rng(3)
    covariances = np.stack([0.05 * np.eye(4) + 0.1 * a @ a.T for a in rng.normal(size=(3, 4, 4))])
    return GaussianMixtureDenoiser(np.array([0.5, 0.3, 0.2]), rng.normal(size=(3, 4)), covariances, noise)


@pytest.mark.parametrize("noise", NOISES, ids=repr)
def test_sampling_with_the_differentiable_plan_gives_solves_samples(noise):
    model = _mixture(noise)
    x_T = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for schedule in (PROBE, OPEN_END):
        expected = solve(model, schedule, x_T, noise).sample
        got = execute(dp.differentiable_plan(schedule, noise), model, x_T).sample
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_the_sample_is_differentiable_in_the_times_through_the_coefficients_and_the_network():
    """gradcheck of a whole solve (exact mixture ε, float64) as a function of the interior times; with the
    network's time input held fixed the gradient differs, so both paths carry it."""
    noise = LinearVP()
    model = _mixture(noise)
    x_T = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    schedule = OPEN_END

    def sample(interior, freeze_network_time=False):
        times = torch.cat(
            [interior.new_tensor([schedule.timesteps[0]]), interior, interior.new_tensor([schedule.timesteps[-1]])]
        )
        plan = dp.differentiable_plan(schedule, noise, times)
        if freeze_network_time:
            plan = type(plan)(tuple(_with_fixed_time(s) for s in plan.steps), plan.t_final, plan.nfe)
        return execute(plan, model, x_T).sample

    interior = f64(schedule.timesteps[1:-1])
    assert torch.autograd.gradcheck(sample, (interior,))
    full = torch.autograd.grad(sample(interior).sum(), interior)[0]
    coefficients_only = torch.autograd.grad(sample(interior, True).sum(), interior)[0]
    assert not torch.allclose(full, coefficients_only, rtol=1e-3)


def _with_fixed_time(step):
    from dataclasses import replace

    return replace(step, t=float(step.t))


FLOW = RectifiedFlow(shift=3.0)
FLOW_SCHEDULES = {  # from σ = 1 (λ = −∞: the first step is the data limit, the model asked for x̂₀) and from t_start
    "euler/shifted": presets.build("ddim", FLOW, 5, "shifted"),
    "unipc_1_bh1_noise/shifted": presets.build("unipc_1_bh1_noise", FLOW, 5, "shifted"),
    "dpmpp_2m/shifted": presets.build("dpmpp_2m", FLOW, 6, "shifted"),
    "dpmpp_3m/flow_sigmas": presets.build("dpmpp_3m", FLOW, 6, "flow_sigmas"),
}


@pytest.mark.parametrize("name", list(FLOW_SCHEDULES))
def test_on_a_flow_path_the_differentiable_plan_equals_the_host_plan_from_pure_noise_too(name):
    schedule = FLOW_SCHEDULES[name]
    host, torch_plan = compile_plan(schedule, FLOW), dp.differentiable_plan(schedule, FLOW)
    assert [s.target for s in torch_plan.steps] == [s.target for s in host.steps]
    assert [[p for p, _ in s.predict.weights] for s in host.steps] == [
        [p for p, _ in s.predict.weights] for s in torch_plan.steps
    ]
    np.testing.assert_allclose(_host_numbers(torch_plan), _host_numbers(host), rtol=1e-12, atol=1e-12)
    model = _mixture(FLOW)
    x_T = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        execute(torch_plan, model, x_T).sample, solve(model, schedule, x_T, FLOW).sample, rtol=1e-12, atol=1e-12
    )


def test_a_flow_schedule_from_pure_noise_is_differentiable_in_its_later_log_snr_values():
    schedule = FLOW_SCHEDULES["dpmpp_2m/shifted"]
    times = torch.tensor(schedule.timesteps, dtype=torch.float64)
    finite = f64(FLOW.lambda_(np.array(schedule.timesteps[1:-1])))  # λ_0 = −∞ stays; σ = 0 has none

    def numbers(later):
        lambdas = torch.cat([later.new_tensor([-np.inf]), later])
        return _flat(dp.plan_from_lambdas(schedule, lambdas, times, None, FLOW))

    assert torch.autograd.gradcheck(numbers, (finite,))
