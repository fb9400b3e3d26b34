"""Presets on rectified-flow and EDM paths reproduce diffusers' own schedulers step for step (issue 13).

Each run first checks that the scheduler's own σ table is our grid to float32 rounding (diffusers keeps it
in float32), then puts the float64 grid in its place, so that the comparison measures the algorithms, as
test_diffusers_oracle does for VP. FlowMatchEuler, DPMSolverMultistep and EDMEuler round the sample to
float32 inside `step` (agreement ~1e-6); UniPC and EDMDPMSolver stay in float64 (~1e-14; ~1e-10 on UniPC's
own flow grid, whose first point sits at λ ≈ −13.8). Both sides call
the same raw network (a tiny random UNet, or the exact digits mixture posed as a velocity / EDM network),
ours through `UNetDenoiser`.

What diffusers 0.42.1 does differently, and how the comparison handles it:
- Under `use_flow_sigmas` DPMSolverMultistep and UniPC hand the network int(σ·N), truncated to an integer;
  flow models are trained at the continuous σ·N, which solversearch gives. The diffusers-side network here
  is called at σ·N of the scheduler's own σ.
- UniPC's default flow grid is not DPMSolver's (`flow_sigmas`): before the shift its sigmas are 1/N larger,
  and its first one, σ = 1, is nudged to 1 − 1e-6 to keep log α finite. UniPC is compared on both grids:
  its own (our times read from its table) and `flow_sigmas` (handed to it as `sigmas=`, unshifted).
- UniPC bh1 returns NaN after a final step to σ = 0 (its B(h) = −h is infinite there and multiplies a zero
  residual); there the comparison is of the corrected state before that step (`last_sample`).
- DPMSolverMultistep shifts dynamically only in the exponential form (μ becomes flow_shift = e^μ); UniPC
  and FlowMatchEuler in both.
- FlowMatchEuler starts at σ = 1 (α = 0), where our sampler asks the model for x̂₀.
- EDM pipelines start from √(σ_max² + 1)·z (`init_noise_sigma`), solversearch from σ_max·z (`prior_std`);
  both sides here start from the same state. The network sees c_in·x and c_noise = ¼ ln σ on both sides.

`pytest -s` prints the largest deviation of every case at the end of the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from solversearch import KarrasVE, RectifiedFlow, presets, solve
from solversearch.grids import make_grid
from solversearch.models import GaussianMixtureDenoiser, UNetDenoiser

TOLERANCE = 1e-5
GRID_RTOL = 1e-6  # diffusers' σ tables are float32 roundings of float64 values
EDM_DPM_GRID_RTOL = 5e-6  # EDMDPMSolverMultistep computes its Karras σ in float32, and ρ = 7 powers amplify that
NS = [5, 10, 20]
NS_UNIPC = [6, 15]  # six variants on two grids: fewer sizes keep the module fast

FLOW_PATHS = {
    "flow_shift1": RectifiedFlow(),
    "flow_shift3": RectifiedFlow(shift=3.0),
    "flow_dynamic_exp": RectifiedFlow(use_dynamic_shifting=True).with_mu(RectifiedFlow().mu_for(1024)),
    "flow_dynamic_linear": RectifiedFlow(use_dynamic_shifting=True, time_shift_type="linear", mu=2.0),
}
# DPMSolverMultistep accepts only the exponential dynamic shift.
DPM_FLOW_PATHS = [name for name, flow in FLOW_PATHS.items() if flow.time_shift_type == "exponential"]
EDM_PATHS = {
    "edm": KarrasVE(),
    "edm_custom": KarrasVE(sigma_min=0.01, sigma_max=20.0, sigma_data=1.0, rho=5.0),
}

DEVIATIONS: dict[tuple[str, str, str, int], float] = {}


@pytest.fixture(scope="module", autouse=True)
def deviation_table():
    """Print the largest deviation per (path, preset, grid, n) over the models (visible with `pytest -s`)."""
    yield
    print(f"\n{'path':20s} {'preset':24s} {'grid':16s} {'n':>3s}  max |ours − diffusers|")
    for (path, preset, grid, n), deviation in sorted(DEVIATIONS.items()):
        print(f"{path:20s} {preset:24s} {grid:16s} {n:3d}  {deviation:.1e}")


def check(case: tuple[str, str, str, int], ours: torch.Tensor, theirs: torch.Tensor) -> None:
    deviation = float((ours - theirs).abs().max())
    DEVIATIONS[case] = max(DEVIATIONS.get(case, 0.0), deviation)
    assert deviation <= TOLERANCE, (case, deviation)


# --- the same raw network on both sides -----------------------------------------------------------


def mixture_on(path, mixture: GaussianMixtureDenoiser) -> GaussianMixtureDenoiser:
    """The same Gaussian mixture under another noise path."""
    covariances = torch.einsum("kde,ke,kfe->kdf", mixture.eigenvectors, mixture.eigenvalues, mixture.eigenvectors)
    return GaussianMixtureDenoiser(
        mixture.log_weights.exp().numpy(), mixture.means.numpy(), covariances.numpy(), path, mixture.sample_shape
    )


def batch_times(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample network time as a (batch,) tensor in the dtype of `like`."""
    return torch.as_tensor(value).to(like.dtype).reshape(-1).expand(like.shape[0])


class VelocityMixture(torch.nn.Module):
    """The exact mixture as a flow network: input (x, σ·N), output the velocity ε − x̂₀."""

    def __init__(self, mixture: GaussianMixtureDenoiser, num_train_timesteps: int):
        super().__init__()
        self.mixture, self.num_train_timesteps = mixture, num_train_timesteps

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> SimpleNamespace:
        eps, x0 = self.mixture.predictions(x, batch_times(time, x) / self.num_train_timesteps)
        return SimpleNamespace(sample=eps - x0)


class PreconditionedMixture(torch.nn.Module):
    """The exact mixture as EDM's raw network F(c_in x, c_noise): the output that the preconditioning
    c_skip x + c_out F (c_out negated for v_prediction) turns into the exact x̂₀."""

    def __init__(self, mixture: GaussianMixtureDenoiser, path: KarrasVE, prediction_type: str):
        super().__init__()
        self.mixture, self.path = mixture, path
        self.sign = 1.0 if prediction_type == "epsilon" else -1.0

    def forward(self, scaled: torch.Tensor, c_noise: torch.Tensor) -> SimpleNamespace:
        sigma = torch.exp(4.0 * batch_times(c_noise, scaled))
        c_in, c_skip, c_out = self.path.preconditioning(sigma.reshape(-1, *[1] * (scaled.ndim - 1)))
        x = scaled / c_in
        x0 = self.mixture(x, sigma / self.path.sigma_max, target="x0")
        return SimpleNamespace(sample=self.sign * (x0 - c_skip * x) / c_out)


MODELS = ["tiny_unet", "digits_mixture"]


def raw_network(model: str, path, tiny_unet, digits_gmm, prediction_type: str) -> torch.nn.Module:
    if model == "tiny_unet":
        return tiny_unet
    if isinstance(path, RectifiedFlow):
        return VelocityMixture(mixture_on(RectifiedFlow(), digits_gmm), path.num_train_timesteps)
    return PreconditionedMixture(mixture_on(path, digits_gmm), path, prediction_type)


def standard_normal(model: str) -> torch.Tensor:
    shape = (2, 2, 8, 8) if model == "tiny_unet" else (3, 1, 8, 8)
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@dataclass(frozen=True)
class FlowSetup:
    """One flow case: the path, the raw velocity network, our denoiser around it, and x_T."""

    flow: RectifiedFlow
    network: torch.nn.Module
    denoiser: UNetDenoiser
    x_T: torch.Tensor


def flow_setup(model: str, path_name: str, tiny_unet, digits_gmm) -> FlowSetup:
    flow = FLOW_PATHS[path_name]
    network = raw_network(model, flow, tiny_unet, digits_gmm, "flow_prediction")
    return FlowSetup(flow, network, UNetDenoiser(network, flow, "flow_prediction"), standard_normal(model))


# --- running diffusers' schedulers ------------------------------------------------------------------


def use_float64_sigmas(scheduler, sigmas: np.ndarray, rtol: float = GRID_RTOL) -> None:
    """Check the scheduler's float32 σ table against `sigmas`, then put the float64 values in its place."""
    np.testing.assert_allclose(scheduler.sigmas.double().numpy(), sigmas, rtol=rtol, atol=0)
    scheduler.sigmas = torch.from_numpy(np.array(sigmas, dtype=np.float64))


def run_flow_scheduler(scheduler, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' loop with a velocity network called at σ·N of the scheduler's own (float64) σ."""
    n_train = scheduler.config.num_train_timesteps
    for i, timestep in enumerate(scheduler.timesteps):
        with torch.no_grad():
            velocity = network(x, scheduler.sigmas[i] * n_train).sample
        x = scheduler.step(velocity, timestep, x).prev_sample
    return x


def run_edm_scheduler(scheduler, network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers' EDM loop: the network sees scale_model_input(x) and the scheduler's timestep c_noise."""
    scheduler.timesteps = scheduler.precondition_noise(scheduler.sigmas[:-1])  # c_noise of the float64 σ
    for timestep in scheduler.timesteps:
        with torch.no_grad():
            output = network(scheduler.scale_model_input(x, timestep), timestep).sample
        x = scheduler.step(output, timestep, x).prev_sample
    return x


def flow_config(flow: RectifiedFlow) -> dict:
    return {
        "shift": flow.shift,
        "use_dynamic_shifting": flow.use_dynamic_shifting,
        "time_shift_type": flow.time_shift_type,
    }


def multistep_flow_config(flow: RectifiedFlow) -> dict:
    return {
        "use_flow_sigmas": True,
        "flow_shift": flow.shift,
        "use_dynamic_shifting": flow.use_dynamic_shifting,
        "time_shift_type": flow.time_shift_type,
        "prediction_type": "flow_prediction",
        "final_sigmas_type": "zero",
    }


def mu_argument(flow: RectifiedFlow) -> dict:
    return {"mu": flow.mu} if flow.use_dynamic_shifting else {}


# --- rectified flow -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("path_name", list(FLOW_PATHS))
@pytest.mark.parametrize("model", MODELS)
def test_flow_euler_is_ddim_on_the_shifted_grid(model, path_name, n, tiny_unet, digits_gmm):
    """FlowMatchEulerDiscreteScheduler (static shift, dynamic exponential and linear μ) = DDIM on `shifted`,
    starting at σ = 1 where the model gives x̂₀."""
    case = flow_setup(model, path_name, tiny_unet, digits_gmm)
    schedule = presets.build("ddim", case.flow, n, "shifted")
    assert schedule.timesteps[0] == 1.0
    ours = solve(case.denoiser, schedule, case.x_T, case.flow).sample

    scheduler = FlowMatchEulerDiscreteScheduler(**flow_config(case.flow))
    scheduler.set_timesteps(n, **mu_argument(case.flow))
    use_float64_sigmas(scheduler, make_grid("shifted", case.flow, n))
    check((path_name, "ddim", "shifted", n), ours, run_flow_scheduler(scheduler, case.network, case.x_T))


DPM_SOLVERS = {
    "dpmpp_2m": {"solver_order": 2, "solver_type": "midpoint"},
    "dpmpp_2m_heun": {"solver_order": 2, "solver_type": "heun"},
    "dpmpp_3m": {"solver_order": 3},
}


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("path_name", DPM_FLOW_PATHS)
@pytest.mark.parametrize("model", MODELS)
def test_dpm_solver_plus_plus_on_flow_sigmas(model, path_name, n, tiny_unet, digits_gmm):
    case = flow_setup(model, path_name, tiny_unet, digits_gmm)
    for preset, options in DPM_SOLVERS.items():
        ours = solve(case.denoiser, presets.build(preset, case.flow, n, "flow_sigmas"), case.x_T, case.flow).sample
        config = multistep_flow_config(case.flow)
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **options, **config)
        scheduler.set_timesteps(n, **mu_argument(case.flow))
        use_float64_sigmas(scheduler, make_grid("flow_sigmas", case.flow, n))
        check((path_name, preset, "flow_sigmas", n), ours, run_flow_scheduler(scheduler, case.network, case.x_T))


def compare_unipc(key: tuple, scheduler, case: FlowSetup, times: np.ndarray, p: int, variant: str) -> None:
    """UniPC-p on `times`. diffusers' bh1 ends in NaN after its step to σ = 0, so the corrected state before
    that step (diffusers' `last_sample`, our trajectory's second-to-last point) is what both variants compare;
    bh2 compares the final sample too."""
    theirs = run_flow_scheduler(scheduler, case.network, case.x_T)
    solution = solve(case.denoiser, presets.unipc(times, p, variant), case.x_T, case.flow, return_trajectory=True)
    path, preset, grid, n = key
    check((path, f"{preset} (x at σ_n-1)", grid, n), solution.trajectory[-2], scheduler.last_sample)
    if variant == "bh2":
        check(key, solution.sample, theirs)


UNIPC_VARIANTS = [(p, variant) for p in (1, 2, 3) for variant in ("bh1", "bh2")]


@pytest.mark.parametrize("n", NS_UNIPC)
@pytest.mark.parametrize("path_name", list(FLOW_PATHS))
@pytest.mark.parametrize("model", MODELS)
def test_unipc_on_flow_sigmas(model, path_name, n, tiny_unet, digits_gmm):
    """UniPC handed our `flow_sigmas` grid (unshifted, since it shifts what it is given)."""
    case = flow_setup(model, path_name, tiny_unet, digits_gmm)
    grid = make_grid("flow_sigmas", case.flow, n)
    for p, variant in UNIPC_VARIANTS:
        scheduler = UniPCMultistepScheduler(solver_order=p, solver_type=variant, **multistep_flow_config(case.flow))
        scheduler.set_timesteps(sigmas=case.flow.unshifted(grid[:-1]), **mu_argument(case.flow))
        use_float64_sigmas(scheduler, grid)
        compare_unipc((path_name, f"unipc_{p}_{variant}", "flow_sigmas", n), scheduler, case, grid, p, variant)


@pytest.mark.parametrize("n", NS_UNIPC)
@pytest.mark.parametrize("path_name", list(FLOW_PATHS))
@pytest.mark.parametrize("model", MODELS)
def test_unipc_on_its_own_flow_grid(model, path_name, n, tiny_unet, digits_gmm):
    """UniPC's default flow grid, read from its table: it starts at σ = 1 − 1e-6, not at α = 0, so the
    preset runs on it unchanged (its second step fits a derivative through λ ≈ −13.8, as UniPC does)."""
    case = flow_setup(model, path_name, tiny_unet, digits_gmm)
    for p, variant in UNIPC_VARIANTS:
        scheduler = UniPCMultistepScheduler(solver_order=p, solver_type=variant, **multistep_flow_config(case.flow))
        scheduler.set_timesteps(n, **mu_argument(case.flow))
        times = scheduler.sigmas.double().numpy()
        scheduler.sigmas = torch.from_numpy(times)
        compare_unipc((path_name, f"unipc_{p}_{variant}", "unipc_own", n), scheduler, case, times, p, variant)


@pytest.mark.parametrize("path_name", list(FLOW_PATHS))
def test_unipc_default_flow_grid_sits_one_training_step_above_flow_sigmas(path_name):
    """Why UniPC gets its own comparison: before the shift its sigmas are DPMSolver's plus 1/N, and its
    first (σ = 1) is nudged to 1 − 1e-6."""
    flow, n = FLOW_PATHS[path_name], 10
    scheduler = UniPCMultistepScheduler(**multistep_flow_config(flow))
    scheduler.set_timesteps(n, **mu_argument(flow))
    own = scheduler.sigmas.double().numpy()
    assert own[0] == pytest.approx(1.0 - 1e-6, abs=1e-7) and own[-1] == 0.0
    offset = flow.unshifted(own[1:-1]) - flow.unshifted(make_grid("flow_sigmas", flow, n)[1:-1])
    np.testing.assert_allclose(offset, 1.0 / flow.num_train_timesteps, atol=1e-6)


# --- EDM ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("path_name", list(EDM_PATHS))
@pytest.mark.parametrize("model", MODELS)
def test_edm_schedulers_are_ddim_and_dpm_solver_plus_plus_on_the_edm_grid(
    model, path_name, prediction_type, n, tiny_unet, digits_gmm
):
    """EDMEulerScheduler = DDIM and EDMDPMSolverMultistepScheduler (orders 2, 3) = DPM-Solver++ on `edm`."""
    path = EDM_PATHS[path_name]
    network = raw_network(model, path, tiny_unet, digits_gmm, prediction_type)
    denoiser = UNetDenoiser(network, path, prediction_type)
    grid = make_grid("edm", path, n)
    x_T = standard_normal(model) * path.prior_std(grid[0])
    config = {
        "sigma_min": path.sigma_min,
        "sigma_max": path.sigma_max,
        "sigma_data": path.sigma_data,
        "rho": path.rho,
        "prediction_type": prediction_type,
    }
    dpm = EDMDPMSolverMultistepScheduler
    cases = [
        ("ddim", EDMEulerScheduler(**config), GRID_RTOL),
        ("dpmpp_2m", dpm(solver_order=2, **config), EDM_DPM_GRID_RTOL),
        ("dpmpp_2m_heun", dpm(solver_order=2, solver_type="heun", **config), EDM_DPM_GRID_RTOL),
        ("dpmpp_3m", dpm(solver_order=3, **config), EDM_DPM_GRID_RTOL),
    ]
    for preset, scheduler, rtol in cases:
        ours = solve(denoiser, presets.build(preset, path, n, "edm"), x_T, path).sample
        scheduler.set_timesteps(n)
        use_float64_sigmas(scheduler, path.sigma(grid), rtol)
        check((path_name, preset, f"edm/{prediction_type}", n), ours, run_edm_scheduler(scheduler, network, x_T))
