"""Presets reproduce diffusers' own schedulers step for step (same config, same x_T, same spacing).

diffusers keeps its σ table in float32 (it is computed in float64 and rounded); every reference run
below replaces that table by the float64 values of the same formula, √((1 − ᾱ)/ᾱ) on the scheduler's
own ᾱ, so that the comparison measures the algorithms, not float32 rounding. DPMSolverMultistep
still rounds the sample to float32 inside `step`, which bounds its agreement to ~1e-6.

The tiny random UNet is run as a v-prediction model (so its x̂₀ = αx − σv stays O(1), like a trained
model's); the digits mixture is an ε model.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from solversearch import presets, solve
from solversearch.grids import DIFFUSERS_SPACINGS, diffusers_grid
from solversearch.models import UNetDenoiser

TOLERANCE = 1e-5


def float64_sigmas(scheduler) -> None:
    alphas_cumprod = scheduler.alphas_cumprod.double()
    table = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    final = 0.0 if scheduler.sigmas[-1] == 0 else float(table[0])
    scheduler.sigmas = torch.cat([table[scheduler.timesteps], torch.tensor([final], dtype=torch.float64)])


def run_diffusers(scheduler, n, network, x_T, upgrade_sigmas=True):
    scheduler.set_timesteps(n)
    if upgrade_sigmas:
        float64_sigmas(scheduler)
    x = x_T.clone()
    for timestep in scheduler.timesteps:
        with torch.no_grad():
            x = scheduler.step(network(x, timestep), timestep, x).prev_sample
    return x


@pytest.fixture(scope="module", params=["tiny_unet_v_prediction", "digits_mixture_epsilon"])
def model(request, tiny_unet, digits_gmm, ddpm_noise):
    """(our denoiser, diffusers-side network(x, integer timestep), prediction_type, x_T)."""
    generator = torch.Generator().manual_seed(0)
    if request.param == "tiny_unet_v_prediction":
        denoiser = UNetDenoiser(tiny_unet, ddpm_noise, "v_prediction")
        x_T = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=generator)
        return denoiser, lambda x, timestep: tiny_unet(x, timestep).sample, "v_prediction", x_T

    def network(x, timestep):
        t = torch.full((x.shape[0],), float(ddpm_noise.timestep_to_t(int(timestep))), dtype=torch.float64)
        return digits_gmm(x, t)

    x_T = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=generator)
    return digits_gmm, network, "epsilon", x_T


def multistep_cases(final: str):
    """(name, diffusers scheduler kwargs, our preset builder) for DPM-Solver++ and UniPC."""
    cases = [
        (
            "dpmpp_2m_midpoint",
            {"cls": DPMSolverMultistepScheduler, "solver_type": "midpoint"},
            lambda t: presets.dpmpp_2m(t),
        ),
        (
            "dpmpp_2m_heun",
            {"cls": DPMSolverMultistepScheduler, "solver_type": "heun"},
            lambda t: presets.dpmpp_2m(t, "heun"),
        ),
        ("dpmpp_3m", {"cls": DPMSolverMultistepScheduler, "solver_order": 3}, lambda t: presets.dpmpp_3m(t)),
    ]
    for p in (1, 2, 3):
        for variant in ("bh1", "bh2"):
            for predict_x0 in (True, False):
                # diffusers' UniPC returns NaN when bh1 or noise prediction meets a final σ = 0
                # (B(h) or e^h is infinite there); those combinations are compared with sigma_min only.
                if final == "zero" and (variant == "bh1" or not predict_x0):
                    continue
                kwargs = {
                    "cls": UniPCMultistepScheduler,
                    "solver_order": p,
                    "solver_type": variant,
                    "predict_x0": predict_x0,
                }
                prediction = "data" if predict_x0 else "noise"
                build = lambda t, p=p, v=variant, pr=prediction: presets.unipc(t, p, v, pr)
                cases.append((f"unipc_{p}_{variant}_{prediction}", kwargs, build))
    return cases


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
@pytest.mark.parametrize("spacing", DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("n", [5, 10, 20])
def test_multistep_presets_reproduce_diffusers(model, ddpm_noise, n, spacing, final):
    denoiser, network, prediction_type, x_T = model
    times = diffusers_grid(ddpm_noise, n, spacing, final=final)
    differences = {}
    for name, kwargs, build in multistep_cases(final):
        kwargs = dict(kwargs)
        scheduler = kwargs.pop("cls")(
            timestep_spacing=spacing, prediction_type=prediction_type, final_sigmas_type=final, **kwargs
        )
        expected = run_diffusers(scheduler, n, network, x_T)
        ours = solve(denoiser, build(times), x_T, ddpm_noise).sample
        differences[name] = float((ours - expected).abs().max())
    assert max(differences.values()) <= TOLERANCE, differences


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("n", [5, 10, 20])
def test_ddim_preset_reproduces_ddim_scheduler(model, ddpm_noise, n, spacing):
    denoiser, network, prediction_type, x_T = model
    scheduler = DDIMScheduler(timestep_spacing=spacing, clip_sample=False, prediction_type=prediction_type)
    expected = run_diffusers(scheduler, n, network, x_T, upgrade_sigmas=False)
    ours = solve(denoiser, presets.ddim(diffusers_grid(ddpm_noise, n, spacing, convention="ddim")), x_T).sample
    assert float((ours - expected).abs().max()) <= TOLERANCE


@pytest.mark.parametrize("n", [5, 10, 20])
def test_ddim_preset_on_linspace_reproduces_first_order_dpm_solver(model, ddpm_noise, n):
    """DDIMScheduler's linspace spacing steps to t − 1000//n but evaluates the model at the next
    linspace timestep, so its state and the model's time input disagree (a diffusers quirk no ODE
    solver reproduces). DDIM is first-order DPM-Solver++; that scheduler's linspace run is matched."""
    denoiser, network, prediction_type, x_T = model
    scheduler = DPMSolverMultistepScheduler(
        timestep_spacing="linspace", solver_order=1, prediction_type=prediction_type
    )
    expected = run_diffusers(scheduler, n, network, x_T)
    ours = solve(denoiser, presets.ddim(diffusers_grid(ddpm_noise, n, "linspace")), x_T).sample
    assert float((ours - expected).abs().max()) <= TOLERANCE
