"""The sampling plan as a differentiable function of the schedule's times (and step factors).

`plan.compile_plan` computes every step's coefficients once, in float64 on the host, for the fast
sampler loop. This module computes the same coefficients in torch float64 from log-SNR values that may
require grad, so that d(sample)/d(times) flows through the coefficients as well as through the network's
time input: the plan `refine.py` optimises. It is a second, independent implementation of the formulas
in `reference/solvers.md` §2 (torch instead of NumPy, `torch.linalg.solve` for the derivative weights):
the tests hold the two to float64 rounding, and `torch.autograd.gradcheck` checks its derivatives.

A differentiable plan is an ordinary `SamplingPlan` whose numbers are 0-d float64 tensors; `sampler.execute`
runs it unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .errors import ScheduleError
from .noise import NoiseSchedule
from .plan import MIN_LAMBDA_GAP, LinearUpdate, PlannedStep, SamplingPlan, check_start_at_pure_noise, last_use
from .schedule import SolverSchedule, Step

Tensor = torch.Tensor
SERIES_TERMS = 30  # Σ_j z^j/(j+k)! for |z| < 1: far below float64 rounding


def phi(k: int, z: Tensor) -> Tensor:
    """φ_k(z) = ∫₀¹ e^{(1−u)z} u^{k−1}/(k−1)! du, elementwise, with gradients everywhere (a series for
    |z| < 1, where the recursion φ_{m+1} = (φ_m − 1/m!)/z cancels)."""
    small = z.abs() < 1.0
    series_z = torch.where(small, z, torch.zeros_like(z))
    series, term = torch.zeros_like(z), torch.full_like(z, 1.0 / math.factorial(k))
    for j in range(SERIES_TERMS):
        series = series + term
        term = term * series_z / (j + k + 1)
    large_z = torch.where(small, torch.ones_like(z), z)  # the safe branch: no 0/0 in the unused values
    value = torch.expm1(large_z) / large_z
    for m in range(1, k):
        value = (value - 1.0 / math.factorial(m)) / large_z
    return torch.where(small, series, value)


def derivative_weights(r: Tensor, n: int) -> Tensor:
    """Weights ã with Σ_b ã_b r_b^m/m! = δ_{mn}, m = 1..len(r) (as `plan.derivative_weights`)."""
    q = r.shape[0]
    powers = torch.arange(1, q + 1, dtype=r.dtype, device=r.device)[:, None]
    factorials = torch.tensor([math.factorial(m) for m in range(1, q + 1)], dtype=r.dtype, device=r.device)[:, None]
    matrix = r[None, :] ** powers / factorials
    rhs = torch.zeros(q, dtype=r.dtype, device=r.device)
    rhs[n - 1] = 1.0
    return torch.linalg.solve(matrix, rhs)


def first_derivative_scale(step: Step, hh: Tensor) -> Tensor:
    """The scaling of the first-derivative term; hh = h (noise form) or −h (data form)."""
    if step.scaling == "bh1":
        return 1.0 / (2.0 * phi(2, hh))
    if step.scaling == "bh2":
        return phi(1, hh) / (2.0 * phi(2, hh))
    if step.scaling == "linear":
        return 1.0 + step.linear_coefficient * hh
    return torch.ones_like(hh)


AlphaSigma = Callable[[Tensor], tuple[Tensor, Tensor]]


def vp_alpha_sigma_of_lambda(lam: Tensor) -> tuple[Tensor, Tensor]:
    """VP: α = √sigmoid(2λ), σ = √sigmoid(−2λ) (what `VariancePreserving.torch_alpha_sigma_of_lambda` gives)."""
    return torch.exp(-0.5 * torch.nn.functional.softplus(-2.0 * lam)), torch.exp(
        -0.5 * torch.nn.functional.softplus(2.0 * lam)
    )


def exponential_update(
    prediction: str,
    s: int,
    lambdas: Tensor,
    lam_t: Tensor | None,
    points_per_derivative: Sequence[Sequence[int]],
    derivative_scales: Sequence[Tensor],
    alpha_sigma: AlphaSigma = vp_alpha_sigma_of_lambda,
) -> tuple[Tensor, dict[int, Tensor]]:
    """Coefficients of one order-k update from point s to log-SNR `lam_t` (None: to σ = 0), as
    `plan.exponential_update`: the coefficient of x_s and the weights of F at each point. `alpha_sigma`
    gives the path's α and σ at a λ (σ = 0 means α = 1 on every path)."""
    alpha_s, sigma_s = alpha_sigma(lambdas[s])
    data = prediction == "data"
    if lam_t is None:
        if points_per_derivative:
            raise ScheduleError("a step to σ = 0 must have order 1")
        if data:
            return torch.zeros_like(alpha_s), {s: torch.ones_like(alpha_s)}
        return 1.0 / alpha_s, {s: -sigma_s / alpha_s}
    alpha_t, sigma_t = alpha_sigma(lam_t)
    h = lam_t - lambdas[s]
    if data:
        x_coef, base, sign, hh = sigma_t / sigma_s, alpha_t * -torch.expm1(-h), alpha_t, -h
    else:
        x_coef, base, sign, hh = alpha_t / alpha_s, -sigma_t * torch.expm1(h), -sigma_t, h
    weights = {s: base}
    for n, (points, scale) in enumerate(zip(points_per_derivative, derivative_scales), start=1):
        coef = sign * h * phi(n + 1, hh) * scale
        r = (lambdas[list(points)] - lambdas[s]) / h
        for point, a in zip(points, derivative_weights(r, n)):
            weights[point] = weights.get(point, 0.0) + coef * a
            weights[s] = weights[s] - coef * a
    return x_coef, weights


def plan_from_lambdas(
    schedule: SolverSchedule,
    lambdas: Tensor,
    times: Tensor,
    first_derivative_factors: Tensor | None = None,
    noise: NoiseSchedule | None = None,
) -> SamplingPlan:
    """The plan of `schedule`'s decisions at log-SNR values `lambdas` (one per time; a schedule ending at
    t = 0 gives one fewer: σ = 0 has no finite λ) and network times `times` (one per time), with
    `first_derivative_factors` (one per step) replacing the steps' own when given. Every number in it
    is a float64 tensor, differentiable in all three inputs. `noise` is the path (default: VP)."""
    n_steps = schedule.n_steps
    finite = n_steps + 1 - schedule.ends_at_zero
    if lambdas.shape != (finite,) or times.shape != (n_steps + 1,):
        raise ScheduleError(
            f"need {finite} log-SNR values and {n_steps + 1} times for {n_steps} steps, "
            f"got {tuple(lambdas.shape)} and {tuple(times.shape)}"
        )
    gaps = lambdas[1:] - lambdas[:-1]
    if bool((gaps.detach() <= MIN_LAMBDA_GAP).any()):
        raise ScheduleError("log-SNR values must increase by more than MIN_LAMBDA_GAP from step to step")
    alpha_sigma = vp_alpha_sigma_of_lambda if noise is None else noise.torch_alpha_sigma_of_lambda
    alphas, sigmas = alpha_sigma(lambdas)
    if schedule.ends_at_zero:
        alphas = torch.cat([alphas, alphas.new_ones(1)])
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    starts_at_pure_noise = bool(alphas[0].detach() == 0.0)  # a flow path at σ = 1, as in `plan.compile_plan`
    if starts_at_pure_noise:
        check_start_at_pure_noise(schedule)
    predicts: list[LinearUpdate] = []
    corrections: list[LinearUpdate | None] = []
    for i, step in enumerate(schedule.steps):
        if i == 0 and starts_at_pure_noise:
            step = Step(prediction="data", order=1)  # the limit of either form from α = 0 (see plan.py)
        uses = "x0" if step.prediction == "data" else "eps"
        lam_t = lambdas[i + 1] if i + 1 < finite else None
        points = [[i - b for b in p] for p in step.derivative_points]
        scales: list[Tensor] = []
        if points:
            hh = (lam_t - lambdas[i]) * (-1.0 if step.prediction == "data" else 1.0)
            factor = step.first_derivative_factor if first_derivative_factors is None else first_derivative_factors[i]
            scales = [first_derivative_scale(step, hh) * factor] + [hh.new_tensor(1.0)] * (len(points) - 1)
            if len(points) >= 2:
                scales[1] = hh.new_tensor(step.second_derivative_factor)
        x_coef, weights = exponential_update(step.prediction, i, lambdas, lam_t, points, scales, alpha_sigma)
        predicts.append(LinearUpdate(x_coef, uses, tuple(sorted(weights.items()))))
        corrections.append(_unic(step, i, lambdas, alpha_sigma) if step.corrector == "unic" else None)
    released = last_use(predicts, corrections)
    steps = tuple(
        PlannedStep(
            t=times[i],
            alpha=alphas[i],
            sigma=sigmas[i],
            evaluate=not (i == 0 and schedule.first_step == "analytic"),
            prior_std=noise.prior_std(float(times[0].detach())) if noise is not None and i == 0 else 1.0,
            correct_previous=corrections[i - 1] if i > 0 else None,
            predict=predicts[i],
            release=tuple(p for p, last in released.items() if last == i),
            skip=step.skip,
            target="x0" if i == 0 and starts_at_pure_noise else "eps",
        )
        for i, step in enumerate(schedule.steps)
    )
    return SamplingPlan(steps=steps, t_final=float(times[-1].detach()), nfe=schedule.nfe)


def differentiable_plan(
    schedule: SolverSchedule,
    noise: NoiseSchedule,
    times: Tensor | None = None,
    first_derivative_factors: Tensor | None = None,
) -> SamplingPlan:
    """The plan at `times` (default: the schedule's own), differentiable in the times through the noise
    schedule's torch log α(t)."""
    if times is None:
        times = torch.tensor(schedule.timesteps, dtype=torch.float64)
    lambdas = noise.torch_lambda(times[: schedule.n_steps + 1 - schedule.ends_at_zero])
    return plan_from_lambdas(schedule, lambdas, times, first_derivative_factors, noise)


def _unic(step: Step, i: int, lambdas: Tensor, alpha_sigma: AlphaSigma) -> LinearUpdate:
    """UniC of step i, as `plan.unic_correction`: order k + 1 through the predictor's points and the new point;
    the scaling only when that is an order-2 update."""
    order = step.order + 1
    fit = sorted({i - b for b in step.history_used} | {i + 1})
    hh = (lambdas[i + 1] - lambdas[i]) * (-1.0 if step.prediction == "data" else 1.0)
    scales = [hh.new_tensor(1.0)] * (order - 1)
    if order == 2:
        scales[0] = first_derivative_scale(step, hh)
    x_coef, weights = exponential_update(
        step.prediction, i, lambdas, lambdas[i + 1], [fit] * (order - 1), scales, alpha_sigma
    )
    return LinearUpdate(x_coef, "x0" if step.prediction == "data" else "eps", tuple(sorted(weights.items())))
