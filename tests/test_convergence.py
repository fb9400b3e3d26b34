"""Convergence orders against exact solutions: the solver math verified by mathematics.

Protocol (reference/solvers.md §5): λ-uniform grids with N = 10…320 steps, error E(N) = RMS of
x_N − x_ref, observed order log₂(E(N)/E(2N)) at the finest pair. Warm-up steps use lower orders (as
the presets do); their constant is tiny at high noise, so they do not cap the measured order.

One Gaussian, closed form: integrated from t = 1 to t = 0.2. On the full [1, 1e-3] interval the λ-uniform
multistep errors of a single Gaussian telescope — the local errors ∝ h^{k+1} F^{(k)}(λ_j) sum to
h^k [F^{(k−1)}] over an interval where x̂₀ is flat at both ends — so order-3 methods appear to converge
at order 4 there; stopping where x̂₀ still bends shows the true order.
Two-component mixture: integrated over [1, 1e-3] against scipy's DOP853 at rtol 1e-12.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from solversearch import LinearVP, SolverSchedule, Step, presets, solve
from solversearch.grids import logsnr_uniform
from solversearch.models import GaussianMixtureDenoiser
from solversearch.plan import exponential_update

NOISE = LinearVP()
RNG = np.random.default_rng(0)
DIM = 3
COV_A = (lambda a: a @ a.T * 0.5 + 0.05 * np.eye(DIM))(RNG.normal(size=(DIM, DIM)))
MU_A = RNG.normal(size=DIM)
COV_B = (lambda a: a @ a.T * 0.3 + 0.05 * np.eye(DIM))(RNG.normal(size=(DIM, DIM)))
X_T = torch.randn(8, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
NS = [10, 20, 40, 80, 160, 320]


def gaussian_solution(x_s: np.ndarray, t_s: float, t: float) -> np.ndarray:
    """x_t = α_t μ + U diag(√((α_t² d + σ_t²)/(α_s² d + σ_s²))) Uᵀ (x_s − α_s μ)."""
    d, u = np.linalg.eigh(COV_A)
    a_s, s_s, a_t, s_t = NOISE.alpha(t_s), NOISE.sigma(t_s), NOISE.alpha(t), NOISE.sigma(t)
    factor = np.sqrt((a_t**2 * d + s_t**2) / (a_s**2 * d + s_s**2))
    return a_t * MU_A + ((x_s - a_s * MU_A) @ u) * factor @ u.T


def mixture_reference(model: GaussianMixtureDenoiser, t_end: float) -> np.ndarray:
    """DOP853 on y = x/α in λ: dy/dλ = −e^{−λ} ε*(α y)."""

    def rhs(lam, y):
        t = float(NOISE.t_of_lambda(lam))
        alpha = NOISE.alpha(t)
        x = torch.from_numpy(alpha * y.reshape(X_T.shape))
        eps = model(x, torch.full((X_T.shape[0],), t, dtype=torch.float64)).numpy()
        return (-np.exp(-lam) * eps).ravel()

    lam0, lam1 = float(NOISE.lambda_(1.0)), float(NOISE.lambda_(t_end))
    y0 = (X_T.numpy() / NOISE.alpha(1.0)).ravel()
    sol = solve_ivp(rhs, (lam0, lam1), y0, method="DOP853", rtol=1e-12, atol=1e-12)
    assert sol.success
    return sol.y[:, -1].reshape(X_T.shape) * NOISE.alpha(t_end)


def one_gaussian():
    model = GaussianMixtureDenoiser(np.array([1.0]), MU_A[None], COV_A[None], NOISE)
    return model, 0.2, gaussian_solution(X_T.numpy(), 1.0, 0.2)


def two_component_mixture():
    model = GaussianMixtureDenoiser(
        np.array([0.4, 0.6]), np.stack([MU_A, -1.2 * MU_A]), np.stack([COV_A, COV_B]), NOISE
    )
    return model, 1e-3, mixture_reference(model, 1e-3)


PROBLEMS = {"one_gaussian": one_gaussian, "two_component_mixture": two_component_mixture}


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
