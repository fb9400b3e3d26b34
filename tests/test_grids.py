"""Timestep grids: the published check values and diffusers' own timestep lists."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from solversearch import DiscreteVP, KarrasVE, LinearVP, RectifiedFlow, grids
from solversearch.errors import SolversearchError


def test_logsnr_grid_check_values():
    noise = DiscreteVP.from_diffusers_config({"precision": "float64"})
    expected = [1, 0.89929, 0.78582, 0.65359, 0.49311, 0.30331, 0.13904, 0.05272, 0.01780, 0.00495, 0.001]
    np.testing.assert_allclose(grids.logsnr_uniform(noise, 10, 1.0, 1e-3), expected, atol=6e-6)


def test_logsnr_grid_is_uniform_in_lambda(ddpm_noise):
    lam = ddpm_noise.lambda_(grids.logsnr_uniform(ddpm_noise, 7, 1.0, 1e-3))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-9)


def test_time_grids_follow_their_formulas():
    np.testing.assert_allclose(grids.time_uniform(4, 1.0, 0.2), [1.0, 0.8, 0.6, 0.4, 0.2])
    quadratic = grids.time_quadratic(4, 1.0, 1e-2)
    np.testing.assert_allclose(np.diff(np.sqrt(quadratic)), (np.sqrt(1e-2) - 1) / 4)


def test_karras_grid_is_uniform_in_sigma_tilde_to_the_one_over_rho():
    noise = LinearVP()
    t = grids.karras(noise, 8, 1.0, 1e-3, rho=7.0)
    root = np.exp(-noise.lambda_(t)) ** (1 / 7)
    np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-9)
    assert t[0] == 1.0 and t[-1] == 1e-3


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, UniPCMultistepScheduler])
@pytest.mark.parametrize("spacing", grids.DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("n", [3, 5, 7, 10, 20, 50])
def test_multistep_timesteps_are_diffusers_own(scheduler, spacing, n):
    reference = scheduler(timestep_spacing=spacing)
    reference.set_timesteps(n)
    np.testing.assert_array_equal(grids.diffusers_timesteps(n, spacing), reference.timesteps.numpy())


@pytest.mark.parametrize("spacing", grids.DIFFUSERS_SPACINGS)
@pytest.mark.parametrize("n", [3, 5, 10, 20])
def test_ddim_timesteps_are_ddim_schedulers_own(spacing, n):
    reference = DDIMScheduler(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    reference.set_timesteps(n)
    ours = grids.diffusers_timesteps(n, spacing, steps_offset=reference.config.steps_offset, convention="ddim")
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())


def test_diffusers_grid_ends_at_sigma_zero_or_sigma_min(ddpm_noise):
    zero = grids.diffusers_grid(ddpm_noise, 5, "trailing")
    np.testing.assert_allclose(zero[:-1], (np.array([999, 799, 599, 399, 199]) + 1) / 1000)
    assert zero[-1] == 0.0
    assert grids.diffusers_grid(ddpm_noise, 5, "trailing", final="sigma_min")[-1] == pytest.approx(1e-3)


@pytest.mark.parametrize("path", ["ddpm", "flow", "flow_dynamic", "edm"])
def test_every_grid_of_a_path_has_n_plus_one_decreasing_times_in_0_1(path, ddpm_noise):
    noise = {
        "ddpm": ddpm_noise,
        "flow": RectifiedFlow(shift=3.0),
        "flow_dynamic": RectifiedFlow(use_dynamic_shifting=True, mu=0.8),
        "edm": KarrasVE(),
    }[path]
    applicable = [name for name in grids.GRIDS if grids.grid_applies(name, noise)]
    assert set(grids.FAMILY_GRIDS[noise.family]) <= set(applicable) or path == "ddpm"
    for name in applicable:
        t = grids.make_grid(name, noise, 6)
        assert len(t) == 7 and np.all(np.diff(t) < 0) and t[0] <= 1.0 and t[-1] >= 0.0


def test_the_schedulers_own_grids_exist_only_on_their_family(ddpm_noise):
    for name, noise in [("shifted", ddpm_noise), ("flow_sigmas", KarrasVE()), ("edm", RectifiedFlow())]:
        assert not grids.grid_applies(name, noise)
        with pytest.raises(SolversearchError, match="needs"):
            grids.make_grid(name, noise, 5)


def test_bad_grid_requests_are_user_errors(ddpm_noise):
    with pytest.raises(SolversearchError, match="unknown grid"):
        grids.make_grid("cosine", ddpm_noise, 5)
    with pytest.raises(SolversearchError, match="discrete"):
        grids.make_grid("leading", LinearVP(), 5)
    with pytest.raises(SolversearchError, match="repeated"):
        grids.diffusers_grid(ddpm_noise, 1000, "leading")
