"""Convergence orders against exact solutions: the solver math verified by mathematics.

Protocol (reference/solvers.md §5): λ-uniform grids with N = 10…320 steps, error E(N) = RMS of
x_N − x_ref, observed order log₂(E(N)/E(2N)) at the finest pair. Warm-up steps use lower orders (as
the presets do); their constant is tiny at high noise, so they do not cap the measured order.

One Gaussian, closed form: integrated from t = 1 to t = 0.2. On the full [1, 1e-3] interval the λ-uniform
multistep errors of a single Gaussian telescope — the local errors ∝ h^{k+1} F^{(k)}(λ_j) sum to
h^k [F^{(k−1)}] over an interval where x̂₀ is flat at both ends — so order-3 methods appear to converge
at order 4 there; stopping where x̂₀ still bends shows the true order.
Two-component mixture: integrated over [1, 1e-3] against scipy's DOP853 at rtol 1e-12.

Every path is the same exponential integrator in λ, so the preset orders hold on rectified-flow and EDM
paths too: the mixture is integrated between each path's usual end points, on λ-uniform grids whose first
step is split finely (`warm_started_logsnr`). Without that split the order-1 warm-up step of a noise-form
method (DEIS) leaves an O(h²) error that, from EDM's σ_max = 80, caps its measured order near 2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from solversearch import KarrasVE, LinearVP, NoiseSchedule, RectifiedFlow, SolverSchedule, Step, presets, solve
from solversearch.grids import logsnr_uniform
from solversearch.models import GaussianMixtureDenoiser
from solversearch.plan import exponential_update

NOISE = LinearVP()
RNG = np.random.default_rng(0)
DIM = 3
_A = RNG.normal(size=(DIM, DIM))
COV_A = _A @ _A.T * 0.5 + 0.05 * np.eye(DIM)
MU_A = RNG.normal(size=DIM)
_B = RNG.normal(size=(DIM, DIM))
COV_B = _B @ _B.T * 0.3 + 0.05 * np.eye(DIM)
X_T = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
NS = [10, 20, 40, 80, 160, 320]


def gaussian_solution(x_s: np.ndarray, t_s: float, t: float) -> np.ndarray:
    """x_t = α_t μ + U diag(√((α_t² d + σ_t²)/(α_s² d + σ_s²))) Uᵀ (x_s − α_s μ)."""
    d, u = np.linalg.eigh(COV_A)
    a_s, s_s, a_t, s_t = NOISE.alpha(t_s), NOISE.sigma(t_s), NOISE.alpha(t), NOISE.sigma(t)
    factor = np.sqrt((a_t**2 * d + s_t**2) / (a_s**2 * d + s_s**2))
    return a_t * MU_A + ((x_s - a_s * MU_A) @ u) * factor @ u.T


def mixture_reference(
    model: GaussianMixtureDenoiser, x_start: torch.Tensor, t_start: float, t_end: float
) -> np.ndarray:
    """DOP853 on y = x/α in λ: dy/dλ = −e^{−λ} ε*(α y), on the model's own path."""
    noise = model.noise_schedule

    def rhs(lam, y):
        t = float(noise.t_of_lambda(lam))
        alpha = noise.alpha(t)
        x = torch.from_numpy(alpha * y.reshape(x_start.shape))
        eps = model(x, torch.full((x_start.shape[0],), t, dtype=torch.float64)).numpy()
        return (-np.exp(-lam) * eps).ravel()

    lam0, lam1 = float(noise.lambda_(t_start)), float(noise.lambda_(t_end))
    y0 = (x_start.numpy() / noise.alpha(t_start)).ravel()
    sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y[:, -1].reshape(x_start.shape) * noise.alpha(t_end)


def one_gaussian():
    model = GaussianMixtureDenoiser(np.array([1.0]), MU_A[None], COV_A[None], NOISE)
    return model, 0.2, gaussian_solution(X_T.numpy(), 1.0, 0.2)


def two_component_mixture(noise: NoiseSchedule = NOISE) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(np.array([0.4, 0.6]), np.stack([MU_A, -1.2 * MU_A]), np.stack([COV_A, COV_B]), noise)


def two_component_problem():
    model = two_component_mixture()
    return model, 1e-3, mixture_reference(model, X_T, 1.0, 1e-3)


PROBLEMS = {"one_gaussian": one_gaussian, "two_component_mixture": two_component_problem}


def multistep(order: int, prediction: str):
    def build(times):
        steps = [Step.multistep(min(order, i + 1), prediction) for i in range(len(times) - 1)]
        return SolverSchedule(timesteps=tuple(times), steps=tuple(steps))

    return build


METHODS = {
    # name: (builder(times, prediction), theoretical global order)
    "ddim": (lambda p: lambda t: presets.ddim(t, p), 1),
    "multistep_2": (lambda p: multistep(2, p), 2),
    "multistep_3": (lambda p: multistep(3, p), 3),
    "unipc_1_bh2": (lambda p: lambda t: presets.unipc(t, 1, "bh2", p, lower_order_final=False), 2),
    "unipc_1_bh1": (lambda p: lambda t: presets.unipc(t, 1, "bh1", p, lower_order_final=False), 2),
    "unipc_2_bh2": (lambda p: lambda t: presets.unipc(t, 2, "bh2", p, lower_order_final=False), 3),
    "unipc_2_bh1": (lambda p: lambda t: presets.unipc(t, 2, "bh1", p, lower_order_final=False), 3),
    "unipc_3_bh2": (lambda p: lambda t: presets.unipc(t, 3, "bh2", p, lower_order_final=False), 4),
}


def observed_orders(problem, build):
    model, t_end, reference = problem
    errors = []
    for n in NS:
        out = solve(model, build(logsnr_uniform(NOISE, n, 1.0, t_end)), X_T).sample.numpy()
        errors.append(np.sqrt(np.mean((out - reference) ** 2)))
    errors = np.array(errors)
    return np.log2(errors[:-1] / errors[1:])


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    return PROBLEMS[request.param]()


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("method", list(METHODS))
def test_global_order_matches_theory(problem, method, prediction):
    build, order = METHODS[method]
    orders = observed_orders(problem, build(prediction))
    assert orders[-1] == pytest.approx(order, abs=0.3), orders


@pytest.mark.parametrize(
    "build, order",
    [
        (lambda t: presets.dpmpp_2m(t, "midpoint", lower_order_final=False), 2),
        (lambda t: presets.dpmpp_2m(t, "heun", lower_order_final=False), 2),
        (lambda t: presets.dpmpp_3m(t, lower_order_final=False, published=False), 3),
        (lambda t: presets.deis(t, 3, lower_order_final=False), 3),
    ],
    ids=["dpmpp_2m_midpoint", "dpmpp_2m_heun", "dpmpp_3m_exact_taylor", "deis_3"],
)
def test_preset_orders(problem, build, order):
    assert observed_orders(problem, build)[-1] == pytest.approx(order, abs=0.3)


def test_published_dpmpp_3m_converges_at_order_two(problem):
    """DPM-Solver++(3M) as published (and as diffusers runs it) weights the second-derivative term
    with ((e^{−h} − 1 + h)/h² − ½)·D2 where its D2 = h²F''/2 + O(h³): half of the Taylor term
    h³φ₃(−h)F''. The O(h³) local defect accumulates to a global error of order 2; doubling the term
    (`published=False`) restores order 3, as the test above shows."""
    orders = observed_orders(problem, lambda t: presets.dpmpp_3m(t, lower_order_final=False))
    assert orders[-1] == pytest.approx(2.0, abs=0.3)


# --- every path: VP, rectified flow (shift 1 and 3), EDM ---------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A noise path and the times its grids run between."""

    noise: NoiseSchedule
    t_start: float
    t_end: float


FLOW, FLOW_SHIFT3, EDM = RectifiedFlow(), RectifiedFlow(shift=3.0), KarrasVE()
INTERVALS = {
    "vp": Interval(NOISE, 1.0, 1e-3),
    "flow": Interval(FLOW, FLOW.t_start, FLOW.default_t_end(10)),
    # The shift moves λ by −ln 3 (σ' = 3σ/(1 + 2σ)): the shifted model's grids run between the shifted ends.
    "flow_shift3": Interval(
        FLOW_SHIFT3,
        float(FLOW_SHIFT3.shifted(FLOW_SHIFT3.t_start)),
        float(FLOW_SHIFT3.shifted(FLOW_SHIFT3.default_t_end(10))),
    ),
    "edm": Interval(EDM, EDM.t_start, EDM.default_t_end(10)),
}
PATH_NS = [80, 160, 320, 640]


def warm_started_logsnr(noise: NoiseSchedule, n: int, t_start: float, t_end: float) -> np.ndarray:
    """The λ-uniform grid with n steps, its first step of length h split into h/64, h/64, h/32, …, h/2: the
    lower-order warm-up steps of a multistep method then err by O((h/64)^{k+1}), far below the method's
    global O(h^p), so they no longer cap the measured order (reference/solvers.md §5)."""
    lam = np.linspace(noise.lambda_(t_start), noise.lambda_(t_end), n + 1)
    head = lam[0] + (lam[1] - lam[0]) * np.array([0.0] + [2.0**-k for k in range(6, 0, -1)])
    times = noise.t_of_lambda(np.concatenate([head, lam[1:]]))
    times[0], times[-1] = t_start, t_end
    return times


PATH_PRESETS = {
    # name: (builder(times), theoretical global order), the expectations of the VP tests above
    "ddim": (presets.ddim, 1),
    "dpmpp_2m": (lambda t: presets.dpmpp_2m(t, lower_order_final=False), 2),
    "dpmpp_3m_published": (lambda t: presets.dpmpp_3m(t, lower_order_final=False), 2),
    "dpmpp_3m_exact": (lambda t: presets.dpmpp_3m(t, lower_order_final=False, published=False), 3),
    "deis_3": (lambda t: presets.deis(t, 3, lower_order_final=False), 3),
    "unipc_3_bh2": (lambda t: presets.unipc(t, 3, "bh2", lower_order_final=False), 4),
}


@pytest.fixture(scope="module", params=list(INTERVALS))
def path_problem(request):
    """(interval, mixture on its path, x at t_start, reference solution at t_end)."""
    interval = INTERVALS[request.param]
    model = two_component_mixture(interval.noise)
    x_start = X_T * interval.noise.prior_std(interval.t_start)
    return interval, model, x_start, mixture_reference(model, x_start, interval.t_start, interval.t_end)


@pytest.mark.parametrize("preset", list(PATH_PRESETS))
def test_preset_orders_on_every_path(path_problem, preset):
    interval, model, x_start, reference = path_problem
    build, order = PATH_PRESETS[preset]
    errors = []
    for n in PATH_NS:
        times = warm_started_logsnr(interval.noise, n, interval.t_start, interval.t_end)
        out = solve(model, build(times), x_start, interval.noise).sample.numpy()
        errors.append(np.sqrt(np.mean((out - reference) ** 2)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert orders[-1] == pytest.approx(order, abs=0.3), orders


# --- local error: one step from exact history --------------------------------------------------


def exact_state(lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, ε*, x̂₀*) on the exact path of the one-Gaussian problem at log-SNR λ."""
    t = float(NOISE.t_of_lambda(lam))
    x = gaussian_solution(X_T.numpy(), 1.0, t)
    model = GaussianMixtureDenoiser(np.array([1.0]), MU_A[None], COV_A[None], NOISE)
    eps, x0 = model.predictions(torch.from_numpy(x), torch.full((x.shape[0],), t, dtype=torch.float64))
    return x, eps.numpy(), x0.numpy()


def local_error(prediction: str, points: list[list[int]], h: float, ratios=(1.0, 1.3, 0.8), lam_s=-0.5):
    """Error of one step of length h from λ_s with exact values at earlier points (spaced by h·ratios)."""
    history = [lam_s - h * sum(ratios[:j]) for j in range(4)]  # history[0] = λ_s, history[j] = j back
    lam_t = lam_s + h
    states = [exact_state(lam) for lam in history]
    lambdas = np.array(history[::-1])  # absolute indices: oldest first, s last
    s = len(history) - 1
    alphas = NOISE.alpha(NOISE.t_of_lambda(lambdas))
    sigmas = NOISE.sigma(NOISE.t_of_lambda(lambdas))
    t_t = float(NOISE.t_of_lambda(lam_t))
    absolute = [[s - b for b in p] for p in points]
    x_coef, weights = exponential_update(
        prediction, s, lambdas, alphas, sigmas, lam_t, NOISE.alpha(t_t), NOISE.sigma(t_t), absolute, [1.0] * len(points)
    )
    kind = 2 if prediction == "data" else 1
    x_new = x_coef * states[0][0] + sum(w * states[s - p][kind] for p, w in weights.items())
    return np.sqrt(np.mean((x_new - exact_state(lam_t)[0]) ** 2))


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize(
    "points, local_order",
    [
        ([], 2),
        ([[1]], 3),
        ([[1, 2], [1, 2]], 4),
        ([[1, 2, 3], [1, 2, 3], [1, 2, 3]], 5),
        ([[1], [1, 2]], 3),  # low-order first derivative (one point) caps the step at O(h³)
        ([[2, 3], [2, 3]], 4),  # any active points, not only the most recent ones
    ],
    ids=["order1", "order2", "order3", "order4", "order3_low_order_first_derivative", "order3_older_points"],
)
def test_local_error_of_one_step_from_exact_history(prediction, points, local_order):
    errors = [local_error(prediction, points, h) for h in (0.08, 0.04, 0.02)]
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert orders[-1] == pytest.approx(local_order, abs=0.3), orders
