"""Compile a SolverSchedule on a noise schedule into per-step linear update coefficients.

Every exponential-integrator update (any order, prediction type, derivative points, scaling, UniC
corrector) is linear in the current x and the stored model values, so it is computed here once, in
float64 on the host, and the sampler's loop only combines tensors with these numbers: no host–device
synchronisation inside the loop. The math is in `reference/solvers.md` §2:

    noise form  x_t = (α_t/α_s) x_s − σ_t Σ_{n<k} h^{n+1} φ_{n+1}(h)  ε^{(n)}(λ_s)
    data form   x_t = (σ_t/σ_s) x_s + α_t Σ_{n<k} h^{n+1} φ_{n+1}(−h) x̂₀^{(n)}(λ_s)

with derivatives estimated from earlier points by solving Σ_b a_b Δλ_b^m/m! = δ_{mn}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ScheduleError
from .noise import NoiseSchedule
from .schedule import SolverSchedule, Step

MIN_LAMBDA_GAP = 1e-6


@dataclass(frozen=True)
class LinearUpdate:
    """x_new = x_coef · x + Σ weight · F[point], F = ε ("eps") or x̂₀ ("x0") at the stored points."""

    x_coef: float
    uses: str
    weights: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class PlannedStep:
    t: float
    alpha: float
    sigma: float
    evaluate: bool  # False only for the analytic first step (ε̂ = x_T/prior_std)
    correct_previous: LinearUpdate | None  # the UniC correction of the previous step, run after evaluating here
    predict: LinearUpdate
    release: tuple[int, ...]  # stored points no later update needs
    skip: tuple[str, ...]
    # What the model must return here: "eps", or "x0" where α = 0 (a flow path at σ = 1), since there
    # x̂₀ = (x − σ ε)/α is 0/0 while ε = x/σ follows from x̂₀.
    target: str = "eps"
    # The standard deviation x_T is drawn with (the path's prior_std at the first time): the analytic
    # first step takes ε̂(x_T, T) = x_T / prior_std, which is x_T on VP and flow paths.
    prior_std: float = 1.0


@dataclass(frozen=True)
class SamplingPlan:
    steps: tuple[PlannedStep, ...]
    t_final: float
    nfe: int


def phi(k: int, z: float) -> float:
    """φ_k(z) = ∫₀¹ e^{(1−u)z} u^{k−1}/(k−1)! du, accurate for small |z| too."""
    if abs(z) < 1.0:
        # Series Σ_j z^j/(j+k)!; 30 terms are far below double rounding for |z| < 1.
        total, term = 0.0, 1.0 / math.factorial(k)
        for j in range(30):
            total += term
            term *= z / (j + k + 1)
        return total
    value = math.expm1(z) / z
    for m in range(1, k):
        value = (value - 1.0 / math.factorial(m)) / z
    return value


def derivative_weights(r: np.ndarray, n: int) -> np.ndarray:
    """Weights ã with Σ_b ã_b r_b^m/m! = δ_{mn} (m = 1..len(r)); F^{(n)} h^n ≈ Σ_b ã_b (F_b − F_s).

    r are the offsets Δλ_b / h of the points used; scaling by h keeps the system well conditioned.
    """
    q = len(r)
    m = np.arange(1, q + 1)[:, None]
    matrix = r[None, :] ** m / np.array([math.factorial(int(i)) for i in m.ravel()])[:, None]
    rhs = np.zeros(q)
    rhs[n - 1] = 1.0
    return np.linalg.solve(matrix, rhs)


def first_derivative_scale(step: Step, hh: float) -> float:
    """The scaling of the first-derivative term; hh = h (noise form) or −h (data form)."""
    if step.scaling == "bh1":
        return 1.0 / (2.0 * phi(2, hh))
    if step.scaling == "bh2":
        return phi(1, hh) / (2.0 * phi(2, hh))
    if step.scaling == "linear":
        return 1.0 + step.linear_coefficient * hh
    return 1.0


def exponential_update(
    prediction: str,
    s: int,
    lambdas: np.ndarray,
    alphas: np.ndarray,
    sigmas: np.ndarray,
    lam_t: float,
    alpha_t: float,
    sigma_t: float,
    points_per_derivative: list[list[int]],
    derivative_scales: list[float],
) -> tuple[float, dict[int, float]]:
    """Coefficients of one order-k update from point s to time t.

    `points_per_derivative[n-1]` lists the stored points (absolute indices, s excluded) the n-th
    derivative is fitted through; `lambdas` are indexed by point (the new point of a corrector may be
    among them). Returns the coefficient of x_s and the weights of F at each point.
    """
    h = lam_t - lambdas[s]
    data = prediction == "data"
    if sigma_t == 0.0:
        # Step to clean data: both forms reduce to x = α_t x̂₀(s) = (α_t/α_s)(x_s − σ_s ε_s).
        if points_per_derivative:
            raise ScheduleError("a step to σ = 0 must have order 1")
        if data:
            return 0.0, {s: alpha_t}
        return alpha_t / alphas[s], {s: -alpha_t * sigmas[s] / alphas[s]}
    if data:
        x_coef, base = sigma_t / sigmas[s], alpha_t * -math.expm1(-h)
        sign, hh = alpha_t, -h
    else:
        x_coef, base = alpha_t / alphas[s], -sigma_t * math.expm1(h)
        sign, hh = -sigma_t, h
    weights = {s: base}
    for n, (points, scale) in enumerate(zip(points_per_derivative, derivative_scales), start=1):
        # Term of derivative n: sign · h^{n+1} φ_{n+1}(hh) F^{(n)} = sign · h φ_{n+1}(hh) · Σ ã_b ΔF_b.
        coef = sign * h * phi(n + 1, hh) * scale
        r = (lambdas[points] - lambdas[s]) / h
        for point, a in zip(points, derivative_weights(r, n)):
            weights[point] = weights.get(point, 0.0) + coef * a
            weights[s] -= coef * a
    return x_coef, weights


def compile_plan(schedule: SolverSchedule, noise: NoiseSchedule) -> SamplingPlan:
    """Turn a schedule into the sampler's coefficient plan (host-side, float64)."""
    times = np.asarray(schedule.timesteps, dtype=np.float64)
    if times[0] > noise.t_max:
        raise ScheduleError(f"timesteps[0]: {times[0]} is beyond the noise schedule's t_max {noise.t_max}")
    alphas, sigmas, lambdas = noise.alpha(times), noise.sigma(times), noise.lambda_(times)
    gaps = np.diff(lambdas)
    if not np.all(gaps > MIN_LAMBDA_GAP):
        i = int(np.argmin(gaps))
        raise ScheduleError(
            f"timesteps[{i + 1}]: too close to timesteps[{i}] (log-SNR gap {gaps[i]:.2g}, need > {MIN_LAMBDA_GAP:g}); "
            "derivative estimates through nearly equal points are meaningless"
        )
    starts_at_pure_noise = alphas[0] == 0.0
    if starts_at_pure_noise:
        check_start_at_pure_noise(schedule)
    predict_updates: list[LinearUpdate] = []
    corrections: list[LinearUpdate | None] = []
    for i, step in enumerate(schedule.steps):
        if i == 0 and starts_at_pure_noise:
            # From α = 0 the noise form's α_t/α_s is infinite; its limit is the data form's first-order
            # step x_t = σ_t x_s + α_t x̂₀ (DDIM, the flow Euler step), the same update in either form.
            step = Step(prediction="data", order=1)
        uses = "x0" if step.prediction == "data" else "eps"
        hh = (lambdas[i + 1] - lambdas[i]) * (-1.0 if step.prediction == "data" else 1.0)
        points = [[i - b for b in p] for p in step.derivative_points]
        scales = [1.0] * len(points)
        if scales:
            scales[0] = first_derivative_scale(step, hh) * step.first_derivative_factor
        if len(scales) >= 2:
            scales[1] = step.second_derivative_factor
        x_coef, weights = exponential_update(
            step.prediction, i, lambdas, alphas, sigmas, lambdas[i + 1], alphas[i + 1], sigmas[i + 1], points, scales
        )
        predict_updates.append(LinearUpdate(x_coef, uses, tuple(sorted(weights.items()))))
        corrections.append(unic_correction(step, i, lambdas, alphas, sigmas) if step.corrector == "unic" else None)

    planned = []
    last = last_use(predict_updates, corrections)
    for i, step in enumerate(schedule.steps):
        correction = corrections[i - 1] if i > 0 else None
        released = tuple(p for p, final in last.items() if final == i)
        planned.append(
            PlannedStep(
                t=float(times[i]),
                alpha=float(alphas[i]),
                sigma=float(sigmas[i]),
                evaluate=not (i == 0 and schedule.first_step == "analytic"),
                correct_previous=correction,
                predict=predict_updates[i],
                release=released,
                skip=step.skip,
                target="x0" if i == 0 and starts_at_pure_noise else "eps",
                prior_std=noise.prior_std(float(times[0])) if i == 0 else 1.0,
            )
        )
    return SamplingPlan(steps=tuple(planned), t_final=float(times[-1]), nfe=schedule.nfe)


def check_start_at_pure_noise(schedule: SolverSchedule) -> None:
    """At α = 0 (λ = −∞) a point is infinitely far from every other in λ: no derivative can be fitted
    through it, and nothing but the model's x̂₀ there is known."""
    first = schedule.steps[0]
    if schedule.first_step == "analytic":
        raise ScheduleError(
            "first_step: an analytic first step cannot start at α = 0 (σ = 1 on a flow path); use 'model'"
        )
    if first.order != 1 or first.corrector != "none":
        raise ScheduleError(
            "steps[0]: a step from α = 0 (σ = 1 on a flow path) must be first order without corrector; "
            "start below σ = 1 (e.g. the flow path's t_start) for a multistep solver"
        )
    for i, step in enumerate(schedule.steps[1:], start=1):
        fitted = {i - b for p in step.derivative_points for b in p} | (
            {i - b for b in step.history_used} if step.corrector == "unic" else set()
        )
        if 0 in fitted:
            raise ScheduleError(
                f"steps[{i}]: fits a derivative through the point at α = 0 (λ = −∞, σ = 1 on a flow path); "
                "start below σ = 1 or lower this step's order"
            )


def unic_correction(step: Step, i: int, lambdas: np.ndarray, alphas: np.ndarray, sigmas: np.ndarray) -> LinearUpdate:
    """UniC: the order-(k+1) update from point i whose derivatives are fitted through the predictor's
    points plus the new point i+1. UniPC applies B(h) only through ρ = ½ in the order-2 update; in
    higher orders the full moment system makes B(h) cancel, so the scaling applies only at order 2."""
    order = step.order + 1
    fit = sorted({i - b for b in step.history_used} | {i + 1})
    hh = (lambdas[i + 1] - lambdas[i]) * (-1.0 if step.prediction == "data" else 1.0)
    scales = [1.0] * (order - 1)
    if order == 2:
        scales[0] = first_derivative_scale(step, hh)
    x_coef, weights = exponential_update(
        step.prediction,
        i,
        lambdas,
        alphas,
        sigmas,
        lambdas[i + 1],
        alphas[i + 1],
        sigmas[i + 1],
        [fit] * (order - 1),
        scales,
    )
    return LinearUpdate(x_coef, "x0" if step.prediction == "data" else "eps", tuple(sorted(weights.items())))


def last_use(predicts: list[LinearUpdate], corrections: list[LinearUpdate | None]) -> dict[int, int]:
    """For each stored point, the index of the last step whose updates read it."""
    last: dict[int, int] = {}
    for i, update in enumerate(predicts):
        for p, _ in update.weights:
            last[p] = max(last.get(p, i), i)
    for i, update in enumerate(corrections):
        if update is not None:  # the correction of step i runs during step i + 1
            for p, _ in update.weights:
                last[p] = max(last.get(p, i + 1), i + 1)
    return last
