"""Noise schedules: the published check values, inverses, and agreement with diffusers' own tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from solversearch import DiscreteVP, LinearVP, noise_schedule_from_dict
from solversearch.errors import NoiseScheduleError


def float64_ddpm() -> DiscreteVP:
    return DiscreteVP.from_diffusers_config({"precision": "float64"})


def test_discrete_ddpm_check_values_from_dpm_solver_construction():
    noise = float64_ddpm()
    assert noise.lambda_(1e-3) == pytest.approx(4.6051, abs=1e-4)
    assert noise.lambda_(1.0) == pytest.approx(-5.0588, abs=1e-4)
    assert noise.alpha(1.0) == pytest.approx(0.0063528, rel=1e-5)
    assert noise.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-4)


def test_float32_alphas_cumprod_are_diffusers_own(ddpm_noise):
    """By default ᾱ is the float32 product the network was trained with, i.e. diffusers' table."""
    for config in (
        {},
        {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.03},
    ):
        ours = DiscreteVP.from_diffusers_config(config)
        theirs = DDPMScheduler(**config).alphas_cumprod.double().numpy()
        np.testing.assert_array_equal(ours.alphas_cumprod, theirs)


def test_continuous_linear_vp_check_values():
    noise = LinearVP()
    assert noise.lambda_(1.0) == pytest.approx(-5.0250, abs=1e-4)
    assert noise.lambda_(1e-3) == pytest.approx(4.5577, abs=1e-4)


@pytest.mark.parametrize("noise", [float64_ddpm(), DiscreteVP.from_diffusers_config({}), LinearVP()], ids=repr)
def test_lambda_inverse_round_trips(noise):
    t = np.concatenate([np.linspace(1e-3, 1.0, 997), [0.5e-3, 1.0]])
    np.testing.assert_allclose(noise.t_of_lambda(noise.lambda_(t)), t, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("noise", [DiscreteVP.from_diffusers_config({}), LinearVP()], ids=repr)
def test_alpha_sigma_are_variance_preserving_and_clean_at_zero(noise):
    t = np.linspace(0.0, 1.0, 1001)
    np.testing.assert_allclose(noise.alpha(t) ** 2 + noise.sigma(t) ** 2, 1.0, rtol=1e-14)
    assert noise.alpha(0.0) == 1.0 and noise.sigma(0.0) == 0.0 and noise.lambda_(0.0) == np.inf
    assert np.all(np.diff(noise.lambda_(t)) < 0)


def test_discrete_knots_are_the_training_noise_levels(ddpm_noise):
    n = np.arange(1000)
    t = ddpm_noise.timestep_to_t(n)
    np.testing.assert_allclose(ddpm_noise.alpha(t) ** 2, ddpm_noise.alphas_cumprod, rtol=1e-13)
    network_time = ddpm_noise.network_time(torch.from_numpy(t))
    np.testing.assert_allclose(network_time.numpy(), n, atol=1e-9)


def test_log_alpha_is_piecewise_linear_between_knots(ddpm_noise):
    t0, t1 = ddpm_noise.timestep_to_t(np.array([410, 411]))
    mid = ddpm_noise.log_alpha((t0 + t1) / 2)
    assert mid == pytest.approx((ddpm_noise.log_alpha(t0) + ddpm_noise.log_alpha(t1)) / 2, rel=1e-13)


@pytest.mark.parametrize("noise", [DiscreteVP.from_diffusers_config({}), LinearVP()], ids=repr)
def test_torch_log_alpha_matches_numpy(noise):
    t = torch.cat([torch.rand(200, dtype=torch.float64), torch.tensor([0.0, 1.0, 1e-3], dtype=torch.float64)])
    np.testing.assert_allclose(noise.torch_log_alpha()(t).numpy(), noise.log_alpha(t.numpy()), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("noise", [DiscreteVP.from_diffusers_config({}), LinearVP()], ids=repr)
def test_torch_t_of_lambda_inverts_lambda_and_matches_numpy(noise):
    t = torch.cat([torch.rand(200, dtype=torch.float64) * 0.999 + 1e-3, torch.tensor([1.0, 1e-3], dtype=torch.float64)])
    lam = torch.from_numpy(noise.lambda_(t.numpy()))
    np.testing.assert_allclose(noise.torch_t_of_lambda(lam).numpy(), t.numpy(), rtol=1e-11)
    np.testing.assert_allclose(noise.torch_t_of_lambda(lam).numpy(), noise.t_of_lambda(lam.numpy()), rtol=1e-13)


@pytest.mark.parametrize(
    "noise",
    [
        DiscreteVP.from_diffusers_config({}),
        DiscreteVP.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"}),
        DiscreteVP.from_diffusers_config({"trained_betas": list(np.linspace(1e-4, 0.02, 50))}),
        LinearVP(0.1, 19.9),
    ],
    ids=repr,
)
def test_to_dict_rebuilds_an_equal_schedule(noise):
    rebuilt = noise_schedule_from_dict(noise.to_dict())
    assert rebuilt == noise
    np.testing.assert_array_equal(rebuilt.log_alpha(np.linspace(0, 1, 11)), noise.log_alpha(np.linspace(0, 1, 11)))


@pytest.mark.parametrize(
    "config, words",
    [
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
        ({"precision": "float16"}, "precision"),
        ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"beta_start": -0.1}, "beta_start"),
        ({"beta_end": 2.0}, "beta_end"),
        ({"beta_end": None}, "beta_end: required"),
        ({"trained_betas": "0.1"}, "trained_betas"),
        ({"trained_betas": [0.1, 1.5]}, "trained_betas"),
    ],
)
def test_unsupported_configs_raise_a_clear_error(config, words):
    with pytest.raises(NoiseScheduleError, match=words):
        DiscreteVP.from_diffusers_config(config)


def test_unknown_kind_is_an_error():
    with pytest.raises(NoiseScheduleError, match="unknown noise schedule kind"):
        noise_schedule_from_dict({"kind": "ve"})


@pytest.mark.parametrize("description, words", [
    ({"kind": "linear_vp", "beta_1": 20.0}, "beta_0: required"),
    ({"kind": "linear_vp", "beta_0": "0.1", "beta_1": 20.0}, "beta_0"),
    ({"kind": "linear_vp", "beta_0": 0.1, "beta_1": 20.0, "time_scale": float("inf")}, "time_scale"),
    ({"kind": "discrete_vp", "beta_start": [1]}, "beta_start"),
    (["discrete_vp"], "must be a mapping"),
])
def test_a_described_noise_schedule_with_bad_parameters_names_the_parameter(description, words):
    """A schedule file's noise_schedule block is user input: every parameter is checked, not only `kind`."""
    with pytest.raises(NoiseScheduleError, match=words):
        noise_schedule_from_dict(description)
