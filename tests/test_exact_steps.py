"""Every coefficient of the unified sampler, checked where the derivatives of ε̂ and x̂₀ are not zero.

On a point mass every derivative of ε̂ / x̂₀ in λ vanishes, so the point-mass tests cannot see the
φ-weights of the derivative terms, the derivative-point weights, the bh1/bh2/linear scalings, the
second-derivative factor or the UniC corrector. Here the data is ONE Gaussian with a non-trivial
covariance (float64), where all of those terms matter, and the truth does not come from
`solversearch.plan`:

1. `reference_solve` is a second implementation of the USF unified step, written from
   reference/solvers.md §2: derivatives from the small Vandermonde-type system solved here with numpy,
   the Taylor polynomial integrated against e^{∓λ} with scipy's `quad` (no φ-function code at all),
   the scaling applied to the first-derivative term, UniC as a re-done step. Random valid schedules
   (tests/strategies.py) must agree with `solversearch.solve` to 1e-9 at every trajectory point.
2. The local error of one step from exact history, against the closed-form ODE solution of the
   Gaussian (solvers.md §5), shrinks like h^{k+1} (h^{k+2} with UniC): no reference code involved.
3. Mutants, patched into `solversearch.plan` with monkeypatch, show that both checks fail when one
   coefficient is wrong while the point-mass check still passes.

Conventions the reference follows (source in parentheses):

- Step i goes from t_i to t_{i+1}; its Taylor expansion is around its start point s = i and
  h = λ_{i+1} − λ_i (solvers.md §2; schedule.py module docstring).
- The model is evaluated once at the start of every step, at the sampler's current x; ε̂ and
  x̂₀ = (x − σ ε̂)/α are both kept for that point (§1, §2 "NFE accounting"). After a UniC step the
  evaluation happens at the *predicted* x̃ and x̂₀ is converted at x̃ too; the corrected x only replaces
  the state the next step starts from (§2 "Corrector": the evaluation at (x̃_t, t) is reused; sampler.py
  "at the uncorrected x, as UniPC does").
- `derivative_points[n−1]` of step i lists back-indices b, meaning the points i − b; derivative n is
  fitted through exactly those p points with Σ_b a_b Δλ_b^m/m! = δ_{mn}, m = 1..p (§2 "Derivative
  estimation"; schedule.Step docstring).
- The scaling multiplies the first-derivative term; bh1 = (hh²/2)/(e^{hh} − 1 − hh),
  bh2 = (hh/2)(e^{hh} − 1)/(e^{hh} − 1 − hh), linear = 1 + c·hh, hh = h (noise) or −h (data)
  (§2 "Derivative scaling").
- `first_derivative_factor` multiplies the first-derivative term of the predictor once more, after the
  scaling (schedule.Step docstring; the learned step scale of refine.py).
- `second_derivative_factor` multiplies the second-derivative term of the predictor. It is not in
  solvers.md §2; it exists for the published DPM-Solver++(3M) coefficient (§3; schedule.Step docstring).
- UniC after step i (only when a step i + 1 follows): redo step i from the x it started at with order
  k + 1, every one of its k derivatives fitted through the same points, the union of the predictor's
  points and the new point i + 1 (§2 "Corrector"; plan.unic_correction). Deliberate deviation from a literal
  reading of §2, documented in schedule.Step and plan.unic_correction: as in UniPC (ρ = ½ only at order 2,
  §3), the corrector applies the scaling only when it is an order-2 update (k = 1), and it never
  applies `second_derivative_factor` (plan.unic_correction; stated only in the code).
- A step to t = 0 (σ = 0) is first order and is the h → ∞ limit of its form: data form
  x = α_t x̂₀_s (the integral σ_t ∫ e^{λ} dλ → α_t), noise form x = (α_t/α_s) x_s − α_t e^{−λ_s} ε̂_s
  (schedule validation; plan.exponential_update). The two differ after a UniC step, since x̂₀_s was
  converted at the uncorrected x̃_s.
- The analytic first step replaces the first model call with ε̂(x_T, t_0) = x_T and converts x̂₀ from
  it as in §1 (§2 "NFE accounting"; sampler.execute; test_sampler's analytic-first-step test).
  solvers.md adds "i.e. x̂₀ = 0 at the start", which holds only as α_T → 0: the sampler, and this
  reference, use x̂₀ = (1 − σ_T) x_T / α_T.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from scipy.integrate import quad

from solversearch import LinearVP, SolverSchedule, Step, plan, solve
from solversearch.models import GaussianMixtureDenoiser

from .strategies import schedules

NOISE = LinearVP()
DIM = 3
_RNG = np.random.default_rng(7)
_FACTOR = _RNG.normal(size=(DIM, DIM))
COV = 0.5 * _FACTOR @ _FACTOR.T + 0.05 * np.eye(DIM)  # well away from a point mass in every direction
MEAN = _RNG.normal(size=DIM)
GAUSSIAN = GaussianMixtureDenoiser(np.array([1.0]), MEAN[None], COV[None], NOISE)
POINT_MASS = GaussianMixtureDenoiser(np.array([1.0]), MEAN[None], np.zeros((1, DIM, DIM)), NOISE)
X_T = torch.randn(4, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """The tensors here hold a dozen numbers; on a loaded 2-core machine torch's intra-op thread pool
    makes each tiny op wait milliseconds for a busy core (a 4-element softmax took 12 ms), so use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gaussian_flow(x_s: np.ndarray, t_s: float, t: float, cov: np.ndarray = COV) -> np.ndarray:
    """Exact probability-flow ODE solution for data N(μ, Σ), Σ = U diag(d) Uᵀ (solvers.md §5):
    x_t = α_t μ + U diag(√((α_t² d + σ_t²)/(α_s² d + σ_s²))) Uᵀ (x_s − α_s μ); Σ = 0 is a point mass."""
    d, u = np.linalg.eigh(cov)
    d = np.clip(d, 0.0, None)
    a_s, s_s, a_t, s_t = NOISE.alpha(t_s), NOISE.sigma(t_s), NOISE.alpha(t), NOISE.sigma(t)
    factor = np.sqrt((a_t**2 * d + s_t**2) / (a_s**2 * d + s_s**2))
    return a_t * MEAN + ((x_s - a_s * MEAN) @ u) * factor @ u.T


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- 1. an independent implementation of the unified step (solvers.md §2) ------------------------


def taylor_moment(n: int, h: float, sign: float) -> float:
    """∫₀^h e^{sign·u} u^n/n! du by adaptive quadrature; h = ∞ allowed for sign = −1."""
    value, _ = quad(lambda u: math.exp(sign * u) * u**n / math.factorial(n), 0.0, h, epsabs=0.0, epsrel=1e-13)
    return value


def fit_derivative(n: int, lam_s: float, f_s: np.ndarray, lams: list[float], fs: list[np.ndarray]) -> np.ndarray:
    """F^{(n)}(λ_s) ≈ Σ_i a_i (F_i − F_s) with Σ_i a_i Δλ_i^m/m! = δ_{mn}, m = 1..p (p = len(lams))."""
    offsets = np.array(lams) - lam_s
    p = len(offsets)
    system = np.array([[dl**m / math.factorial(m) for dl in offsets] for m in range(1, p + 1)])
    a = np.linalg.solve(system, np.eye(p)[n - 1])
    return sum(a_i * (f_i - f_s) for a_i, f_i in zip(a, fs))


def fit_condition(offsets: list[float]) -> float:
    """Condition number of the derivative system in the scale-free offsets Δλ_i / max|Δλ|."""
    r = np.array(offsets) / np.max(np.abs(offsets))
    system = np.array([[x**m / math.factorial(m) for x in r] for m in range(1, len(r) + 1)])
    return float(np.linalg.cond(system))


def first_derivative_scale(step: Step, hh: float) -> float:
    """§2 "Derivative scaling", written from the formulas (hh = h in the noise form, −h in the data form)."""
    if step.scaling == "bh1":
        return (hh**2 / 2) / (math.expm1(hh) - hh)
    if step.scaling == "bh2":
        return (hh / 2) * math.expm1(hh) / (math.expm1(hh) - hh)
    if step.scaling == "linear":
        return 1.0 + step.linear_coefficient * hh
    return 1.0


@dataclasses.dataclass
class Grid:
    t: list[float]
    lam: list[float]
    alpha: list[float]
    sigma: list[float]

    @classmethod
    def of(cls, times) -> Grid:
        times = [float(t) for t in times]
        return cls(times, *([float(v) for v in f(np.array(times))] for f in (NOISE.lambda_, NOISE.alpha, NOISE.sigma)))


def reference_step(
    prediction: str, grid: Grid, s: int, x_s: np.ndarray, f: dict[int, np.ndarray], points, factors
) -> np.ndarray:
    """One order-(len(points) + 1) step from point s to point s + 1 of `grid` (solvers.md §2):

    noise: x_t = (α_t/α_s) x_s − α_t ∫_{λ_s}^{λ_t} e^{−λ} P(λ) dλ
    data:  x_t = (σ_t/σ_s) x_s + σ_t ∫_{λ_s}^{λ_t} e^{λ} P(λ) dλ
    with P(λ) = Σ_n factors[n] F^{(n)}(λ_s) (λ − λ_s)^n/n! (factors[0] = 1) and the derivatives fitted
    through `points[n − 1]`. With u = λ − λ_s: α_t e^{−λ_s} = α_t σ_s/α_s and σ_t e^{λ_s} = σ_t α_s/σ_s.
    """
    t = s + 1
    lam_s, a_s, s_s, a_t, s_t = grid.lam[s], grid.alpha[s], grid.sigma[s], grid.alpha[t], grid.sigma[t]
    if s_t == 0.0:  # h = ∞: only order 1 is valid (schedule validation)
        assert not points
        if prediction == "noise":
            return (a_t / a_s) * x_s - a_t * (s_s / a_s) * taylor_moment(0, math.inf, -1.0) * f[s]
        return a_t * f[s]  # σ_t (e^{λ_t} − e^{λ_s}) → α_t as σ_t → 0, and (σ_t/σ_s) x_s → 0
    h = grid.lam[t] - lam_s
    sign = -1.0 if prediction == "noise" else 1.0
    integral = taylor_moment(0, h, sign) * f[s]
    for n, (used, factor) in enumerate(zip(points, factors[1:]), start=1):
        derivative = fit_derivative(n, lam_s, f[s], [grid.lam[j] for j in used], [f[j] for j in used])
        integral = integral + factor * taylor_moment(n, h, sign) * derivative
    if prediction == "noise":
        return (a_t / a_s) * (x_s - s_s * integral)
    return (s_t / s_s) * (x_s + a_s * integral)


def _hh(step: Step, grid: Grid, i: int) -> float:
    return (grid.lam[i + 1] - grid.lam[i]) * (-1.0 if step.prediction == "data" else 1.0)


def predictor_factors(step: Step, grid: Grid, i: int) -> list[float]:
    factors = [1.0] * step.order
    if step.order >= 2:
        factors[1] = first_derivative_scale(step, _hh(step, grid, i)) * step.first_derivative_factor
    if step.order >= 3:
        factors[2] = step.second_derivative_factor
    return factors


def corrector_points_and_factors(step: Step, grid: Grid, i: int) -> tuple[list[list[int]], list[float]]:
    """UniC of step i: order k + 1, every derivative through the predictor's points plus i + 1; the
    scaling only at order 2, no second-derivative factor (see the module docstring)."""
    order = step.order + 1
    used = sorted({i - b for b in step.history_used} | {i + 1})
    factors = [1.0] * order
    if order == 2:
        factors[1] = first_derivative_scale(step, _hh(step, grid, i))
    return [used] * (order - 1), factors


def reference_solve(model, schedule: SolverSchedule, x_T: torch.Tensor) -> list[np.ndarray]:
    """The states at every time of the schedule, as `solve(..., return_trajectory=True)` returns them."""
    grid = Grid.of(schedule.timesteps)
    eps: dict[int, np.ndarray] = {}
    x0: dict[int, np.ndarray] = {}
    x = x_T.numpy().copy()
    x_start = x
    trajectory = [x]
    for i, step in enumerate(schedule.steps):
        if i == 0 and schedule.first_step == "analytic":
            eps[i] = x.copy()
        else:
            t = torch.full((x.shape[0],), grid.t[i], dtype=torch.float64)
            eps[i] = model(torch.from_numpy(x), t).numpy()
        x0[i] = (x - grid.sigma[i] * eps[i]) / grid.alpha[i]
        if i > 0 and schedule.steps[i - 1].corrector == "unic":
            previous = schedule.steps[i - 1]
            points, factors = corrector_points_and_factors(previous, grid, i - 1)
            f = x0 if previous.prediction == "data" else eps
            x = reference_step(previous.prediction, grid, i - 1, x_start, f, points, factors)
        if i > 0:
            trajectory.append(x)
        x_start = x
        points = [[i - b for b in used] for used in step.derivative_points]
        f = x0 if step.prediction == "data" else eps
        x = reference_step(step.prediction, grid, i, x, f, points, predictor_factors(step, grid, i))
    trajectory.append(x)
    return trajectory


def worst_fit_condition(schedule: SolverSchedule) -> float:
    """The largest condition number among the derivative fits of the schedule (predictors and UniC)."""
    lam = Grid.of(schedule.timesteps).lam
    fits = []
    for i, step in enumerate(schedule.steps):
        fits += [[lam[i - b] - lam[i] for b in used] for used in step.derivative_points]
        if step.corrector == "unic":
            fits.append([lam[j] - lam[i] for j in sorted({i - b for b in step.history_used} | {i + 1})])
    return max((fit_condition(f) for f in fits), default=1.0)


def assert_matches_reference(schedule: SolverSchedule, model=GAUSSIAN, rtol: float = 1e-9) -> None:
    ours = [x.numpy() for x in solve(model, schedule, X_T, NOISE, return_trajectory=True).trajectory]
    reference = reference_solve(model, schedule, X_T)
    assert len(ours) == len(reference) == len(schedule.timesteps)
    errors = [relative_error(a, b) for a, b in zip(ours, reference)]
    assert max(errors) <= rtol, f"relative error per time {errors}"


S = Step
# One schedule that exercises every coefficient the point mass cannot see: order-2/3/4 predictors in both
# forms, every scaling, both derivative factors, low-order derivatives through older points, UniC
# after orders 1, 2 and 3 (with and without its scaling), and a final step to t = 0 after a UniC step.
PROBE = SolverSchedule(
    timesteps=(1.0, 0.8, 0.62, 0.5, 0.37, 0.25, 0.16, 0.08, 0.0),
    steps=(
        S("data", 1, (), "bh2", corrector="unic"),
        S("noise", 2, ((1,),), "bh1", first_derivative_factor=1.3, corrector="unic"),
        S("data", 3, ((1, 2), (1, 2)), "linear", 0.7, first_derivative_factor=0.8, second_derivative_factor=0.5),
        S("noise", 4, ((1, 2, 3), (1, 2, 3), (1, 2, 3)), "bh2", corrector="unic"),
        S("data", 3, ((2,), (1, 3)), "bh1", corrector="unic"),
        S("noise", 1, (), "bh1", corrector="unic"),
        S("data", 2, ((1, 3),), "none", corrector="unic"),
        S("noise", 1),
    ),
)
ANALYTIC_START = SolverSchedule(
    timesteps=(1.0, 0.7, 0.45, 0.3, 0.1),
    steps=(S("data", 1, (), "bh1", corrector="unic"), S("noise", 2, ((1,),)), S("data", 3, ((2,), (1, 2)), "bh2"), S()),
    first_step="analytic",
)


@settings(max_examples=120, deadline=None)
@given(schedules(with_skip=False))
@example(PROBE)
@example(ANALYTIC_START)
@example(dataclasses.replace(ANALYTIC_START, first_step="model"))
def test_every_step_matches_an_independent_quadrature_reference(schedule):
    """Any valid schedule (orders 1–4, both forms, every scaling and active-point set, UniC, analytic
    first step, a final step to t = 0) run on a Gaussian agrees with the quadrature reference to 1e-9.

    Schedules whose derivative fits are ill-conditioned (condition number > 1e8 in the scale-free
    offsets, ~3% of draws, e.g. seven points with one gap a thousandth of the others) are skipped: there
    the two codes' round-off legitimately differs by cond·ε (up to 2e-7 seen), with no coefficient wrong."""
    assume(worst_fit_condition(schedule) <= 1e8)
    assert_matches_reference(schedule)


@settings(max_examples=25, deadline=None)
@given(schedules(with_skip=False).map(lambda s: dataclasses.replace(s, first_step="model")))
def test_the_reference_itself_is_exact_on_a_point_mass(schedule):
    """The reference is held to the closed form too (solvers.md §5), so agreement is not a shared error
    in the parts the point mass does see (x coefficients, zeroth-order term, final step, UniC bookkeeping)."""
    out = reference_solve(POINT_MASS, schedule, X_T)[-1]
    exact = gaussian_flow(X_T.numpy(), schedule.timesteps[0], schedule.timesteps[-1], np.zeros((DIM, DIM)))
    assert relative_error(out, exact) <= 1e-8


# --- 2. local error of one step from exact history, through the public API ------------------------


class ExactHistory:
    """The Gaussian's exact model, except at the history times, where it answers as if the sampler
    were on the exact path x*(t_j): with ε*(x*_j) for a noise-form step, and for a data-form step with the
    ε that makes the sampler's own conversion (x − σ_j ε)/α_j equal x̂₀*(x*_j) whatever x it is called at.
    Either way the values the step under test reads at the history points are exact and do not depend
    on x, so the state reached at t_s is an affine function A·x_T + c of x_T (every exponential-integrator
    update is linear in x and the stored values, with scalar coefficients, solvers.md §2)."""

    def __init__(self, prediction: str, history: dict[float, np.ndarray]):
        self.prediction, self.history = prediction, history

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        key = float(t[0])
        if key not in self.history:
            return GAUSSIAN(x, t)
        eps, x0 = GAUSSIAN.predictions(torch.from_numpy(self.history[key]), t)
        if self.prediction == "noise":
            return eps
        return (x - float(NOISE.alpha(key)) * x0) / float(NOISE.sigma(key))


HISTORY_GAPS = (0.8, 1.3, 1.0)  # λ-gaps between the history points, in units of h (oldest first)
LAMBDA_S = -0.5


def one_step_error(step: Step, h: float) -> float:
    """RMS error of `step` taken from λ_s to λ_s + h with exact x_s and exact history (three earlier points
    at λ_s − h·(1.0), λ_s − h·(1.0 + 1.3), λ_s − h·(1.0 + 1.3 + 0.8)).

    Schedule: three order-1 history steps t_0 → t_1 → t_2 → t_s, the step under test t_s → t_{s+1}, one more
    order-1 step to t_{s+2} so that a UniC correction is applied (it runs after the evaluation at t_{s+1};
    the trajectory then holds the corrected x_{s+1}). x_T is chosen so that the sampler arrives at t_s
    exactly on the path: two probe solves give A and c in x_s = A·x_T + c (see ExactHistory), the third
    starts from x_T = (x*_s − c)/A. The new point of UniC is the true model at the predicted x̃_{s+1}.
    """
    lams = [LAMBDA_S - h * sum(HISTORY_GAPS[j:]) for j in range(3)] + [LAMBDA_S, LAMBDA_S + h, LAMBDA_S + 2 * h]
    times = tuple(float(NOISE.t_of_lambda(lam)) for lam in lams)
    s = 3
    x_star = {t: gaussian_flow(X_T.numpy(), 1.0, t) for t in times}
    history = [Step(prediction=step.prediction)] * s
    schedule = SolverSchedule(timesteps=times, steps=(*history, step, Step(prediction=step.prediction)))
    model = ExactHistory(step.prediction, {t: x_star[t] for t in times[:s]})

    def trajectory(x_T: np.ndarray) -> list[np.ndarray]:
        solution = solve(model, schedule, torch.from_numpy(x_T), NOISE, return_trajectory=True)
        return [x.numpy() for x in solution.trajectory]

    target = x_star[times[s]]
    c = trajectory(np.zeros_like(target))[s]
    a = float(np.sum((trajectory(target)[s] - c) * target) / np.sum(target * target))
    states = trajectory((target - c) / a)
    assert relative_error(states[s], target) <= 1e-12, "the step under test must start on the exact path"
    return float(np.sqrt(np.mean((states[s + 1] - x_star[times[s + 1]]) ** 2)))


STEP_SIZES = np.array([0.04, 0.02, 0.01])


def observed_local_order(step: Step) -> float:
    """Slope of log(error) against log(h) over h, h/2, h/4 (least squares through the three points)."""
    errors = np.array([one_step_error(step, h) for h in STEP_SIZES])
    return float(np.polyfit(np.log(STEP_SIZES), np.log(errors), 1)[0])


@pytest.mark.parametrize("corrector", ["none", "unic"])
@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_one_step_from_exact_history_has_local_error_of_order_k_plus_one(order, prediction, corrector):
    """An order-k step whose derivatives use the k − 1 latest points errs by O(h^{k+1}) (solvers.md §5);
    the UniC corrector re-does it with one more order through the new point, O(h^{k+2})."""
    step = Step.multistep(order, prediction, corrector=corrector)
    expected = order + 1 + (corrector == "unic")
    assert observed_local_order(step) == pytest.approx(expected, abs=0.3)


# --- 3. the checks have teeth: one wrong coefficient, patched into solversearch.plan ------------


def _phi_off(k: int, factor: float):
    original = plan.phi
    return lambda n, z: original(n, z) * (factor if n == k else 1.0)


def _bh1_off(factor: float):
    original = plan.first_derivative_scale
    return lambda step, hh: original(step, hh) * (factor if step.scaling == "bh1" else 1.0)


def _weights_without_factorials(r, n):
    """The derivative system without the 1/m! of solvers.md §2: wrong second and third derivatives."""
    q = len(r)
    return np.linalg.solve(np.asarray(r)[None, :] ** np.arange(1, q + 1)[:, None], np.eye(q)[n - 1])


def _unic_without_scaling():
    original = plan.unic_correction
    return lambda step, *rest: original(dataclasses.replace(step, scaling="none", linear_coefficient=0.0), *rest)


def _second_derivative_factor_ignored():
    original = plan.exponential_update
    return lambda *args: original(*args[:-1], [1.0 if n == 1 else c for n, c in enumerate(args[-1])])


MUTANTS = {
    "phi3_off_by_1e-5": ("phi", lambda: _phi_off(3, 1 + 1e-5)),
    "phi4_off_by_1e-5": ("phi", lambda: _phi_off(4, 1 + 1e-5)),
    "bh1_off_by_1e-6": ("first_derivative_scale", lambda: _bh1_off(1 + 1e-6)),
    "derivative_weights_without_factorials": ("derivative_weights", lambda: _weights_without_factorials),
    "unic_without_its_scaling": ("unic_correction", _unic_without_scaling),
    "second_derivative_factor_ignored": ("exponential_update", _second_derivative_factor_ignored),
}


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_wrong_derivative_coefficient_fails_the_reference_check_but_not_the_point_mass(monkeypatch, mutant):
    """Each mutant changes one coefficient of the derivative terms (by as little as 1e-6 relative). The
    point-mass closed form cannot see it; the reference check on the Gaussian must."""
    name, make = MUTANTS[mutant]
    monkeypatch.setattr(plan, name, make())
    point_mass_out = solve(POINT_MASS, PROBE, X_T, NOISE).sample.numpy()
    exact = gaussian_flow(X_T.numpy(), PROBE.timesteps[0], PROBE.timesteps[-1], np.zeros((DIM, DIM)))
    assert relative_error(point_mass_out, exact) <= 1e-8
    with pytest.raises(AssertionError, match="relative error per time"):
        assert_matches_reference(PROBE)


@pytest.mark.parametrize(
    "attribute, make, step, true_order, mutated_order",
    [
        ("phi", lambda: _phi_off(2, 1.1), Step.multistep(2, "data"), 3, 2),
        ("derivative_weights", lambda: _weights_without_factorials, Step.multistep(3, "noise"), 4, 3),
        ("first_derivative_scale", lambda: _bh1_off(2.0), Step.multistep(2, "noise", scaling="bh1"), 3, 2),
        (
            "first_derivative_scale",
            lambda: _bh1_off(2.0),
            Step(prediction="data", scaling="bh1", corrector="unic"),
            3,
            2,
        ),
    ],
    ids=[
        "phi2_off_by_10_percent",
        "derivative_weights_without_factorials",
        "bh1_without_its_half",
        "unic_bh1_without_its_half",
    ],
)
def test_a_wrong_coefficient_lowers_the_observed_local_order(
    monkeypatch, attribute, make, step, true_order, mutated_order
):
    """The local-error measurement needs no reference code, yet a wrong coefficient costs the step an
    order of accuracy, which it sees."""
    assert observed_local_order(step) == pytest.approx(true_order, abs=0.3)
    monkeypatch.setattr(plan, attribute, make())
    assert observed_local_order(step) == pytest.approx(mutated_order, abs=0.3)
