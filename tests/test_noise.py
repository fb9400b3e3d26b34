"""Noise schedules: the published check values, inverses, and agreement with diffusers' own tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from solversearch import (
    DiscreteVP,
    KarrasVE,
    LinearVP,
    RectifiedFlow,
    noise_schedule_from_dict,
    noise_schedule_from_diffusers_config,
)
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


@pytest.mark.parametrize(
    "description, words",
    [
        ({"kind": "linear_vp", "beta_1": 20.0}, "beta_0: required"),
        ({"kind": "linear_vp", "beta_0": "0.1", "beta_1": 20.0}, "beta_0"),
        ({"kind": "linear_vp", "beta_0": 0.1, "beta_1": 20.0, "time_scale": float("inf")}, "time_scale"),
        ({"kind": "discrete_vp", "beta_start": [1]}, "beta_start"),
        (["discrete_vp"], "must be a mapping"),
    ],
)
def test_a_described_noise_schedule_with_bad_parameters_names_the_parameter(description, words):
    """A schedule file's noise_schedule block is user input: every parameter is checked, not only `kind`."""
    with pytest.raises(NoiseScheduleError, match=words):
        noise_schedule_from_dict(description)


# --- rectified flow and EDM paths ------------------------------------------------------------------

FLOW_AND_EDM = [
    RectifiedFlow(),
    RectifiedFlow(shift=3.0, num_train_timesteps=500),
    RectifiedFlow(use_dynamic_shifting=True, mu=0.7),
    KarrasVE(),
    KarrasVE(sigma_min=0.01, sigma_max=20.0, sigma_data=1.0, rho=5.0),
]


def interior_times(noise) -> np.ndarray:
    """Times with finite λ, out to both ends of the grids (flow: 1 − 1/N and 1/N; EDM: σ_max and σ_min)."""
    t_end = noise.default_t_end(10)
    return np.concatenate([np.linspace(t_end, noise.t_start, 997), [t_end / 10, noise.t_start]])


@pytest.mark.parametrize("noise", FLOW_AND_EDM, ids=repr)
def test_flow_and_edm_lambda_inverse_round_trips(noise):
    t = interior_times(noise)
    np.testing.assert_allclose(noise.t_of_lambda(noise.lambda_(t)), t, rtol=1e-12)
    assert np.all(np.diff(noise.lambda_(t[:-2])) < 0)


def test_flow_path_is_the_straight_line_between_data_and_noise():
    flow = RectifiedFlow()
    t = np.linspace(0.0, 1.0, 101)
    np.testing.assert_array_equal(flow.alpha(t), 1.0 - t)
    np.testing.assert_array_equal(flow.sigma(t), t)
    assert flow.lambda_(0.0) == np.inf and flow.lambda_(1.0) == -np.inf
    assert flow.t_start == 1.0 - 1.0 / 1000 and flow.alpha(1.0) == 0.0
    assert flow.network_time(torch.tensor([0.25], dtype=torch.float64)).item() == 250.0


def test_edm_path_has_unit_alpha_and_log_sigma_network_time():
    edm = KarrasVE()
    t = np.array([1.0, 0.5, 0.002 / 80])
    np.testing.assert_array_equal(edm.alpha(t), 1.0)
    np.testing.assert_allclose(edm.sigma(t), 80.0 * t, rtol=1e-15)
    np.testing.assert_allclose(edm.lambda_(t), -np.log(80.0 * t), rtol=1e-15)
    assert edm.prior_std(1.0) == 80.0 and RectifiedFlow().prior_std(1.0) == 1.0
    np.testing.assert_allclose(edm.t_of_sigma(edm.sigma(t)), t, rtol=1e-15)


@pytest.mark.parametrize("noise", FLOW_AND_EDM, ids=repr)
def test_flow_and_edm_torch_functions_match_numpy(noise):
    t = torch.from_numpy(interior_times(noise))
    lam = noise.torch_lambda(t)
    np.testing.assert_allclose(lam.numpy(), noise.lambda_(t.numpy()), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(noise.torch_t_of_lambda(lam).numpy(), noise.t_of_lambda(lam.numpy()), rtol=1e-13)
    alpha, sigma = noise.torch_alpha_sigma()(t)
    np.testing.assert_allclose(alpha.numpy(), noise.alpha(t.numpy()), rtol=1e-15)
    np.testing.assert_allclose(sigma.numpy(), noise.sigma(t.numpy()), rtol=1e-15)
    alpha_of_lambda, sigma_of_lambda = noise.torch_alpha_sigma_of_lambda(lam)
    np.testing.assert_allclose(alpha_of_lambda.numpy(), noise.alpha(t.numpy()), rtol=1e-12)
    np.testing.assert_allclose(sigma_of_lambda.numpy(), noise.sigma(t.numpy()), rtol=1e-12)


@pytest.mark.parametrize(
    "noise",
    [*FLOW_AND_EDM, RectifiedFlow(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.3)],
    ids=repr,
)
def test_flow_and_edm_to_dict_rebuild_an_equal_path(noise):
    rebuilt = noise_schedule_from_dict(json.loads(json.dumps(noise.to_dict())))
    assert rebuilt == noise and type(rebuilt) is type(noise)
    if isinstance(noise, RectifiedFlow):
        assert (rebuilt.shift, rebuilt.mu, rebuilt.time_shift_type) == (noise.shift, noise.mu, noise.time_shift_type)
        assert rebuilt.dynamic == noise.dynamic or not noise.use_dynamic_shifting


def scheduler_config(scheduler) -> dict:
    """What `save_pretrained` writes to scheduler_config.json."""
    return json.loads(scheduler.to_json_string())


@pytest.mark.parametrize(
    "scheduler, expected",
    [
        (FlowMatchEulerDiscreteScheduler(shift=3.0), RectifiedFlow(shift=3.0)),
        (
            FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4, time_shift_type="linear"),
            RectifiedFlow(use_dynamic_shifting=True, base_shift=0.4, time_shift_type="linear"),
        ),
        (
            DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"),
            RectifiedFlow(shift=5.0),
        ),
        (UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=2.0), RectifiedFlow(shift=2.0)),
        (EDMEulerScheduler(sigma_max=40.0, sigma_data=1.0), KarrasVE(sigma_max=40.0, sigma_data=1.0)),
        (EDMDPMSolverMultistepScheduler(sigma_min=0.01, rho=5.0), KarrasVE(sigma_min=0.01, rho=5.0)),
        (
            DDPMScheduler(beta_schedule="scaled_linear"),
            DiscreteVP.from_diffusers_config({"beta_schedule": "scaled_linear"}),
        ),
        (DPMSolverMultistepScheduler(), DiscreteVP.from_diffusers_config({})),
    ],
    ids=lambda value: type(value).__name__,
)
def test_diffusers_scheduler_configs_give_their_family_of_path(scheduler, expected):
    assert noise_schedule_from_diffusers_config(scheduler_config(scheduler)) == expected


def test_a_dynamic_flow_config_takes_mu_from_the_caller():
    config = scheduler_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    assert noise_schedule_from_diffusers_config(config, mu=0.9).mu == 0.9
    unresolved = noise_schedule_from_diffusers_config(config)
    with pytest.raises(NoiseScheduleError, match="give mu"):
        unresolved.shifted(0.5)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: RectifiedFlow(shift=0.0), "shift"),
        (lambda: RectifiedFlow(shift=float("nan")), "shift"),
        (lambda: RectifiedFlow(num_train_timesteps=1), "num_train_timesteps"),
        (lambda: RectifiedFlow(num_train_timesteps=1000.0), "num_train_timesteps"),
        (lambda: RectifiedFlow(time_shift_type="cubic"), "time_shift_type"),
        (lambda: RectifiedFlow(use_dynamic_shifting="yes"), "use_dynamic_shifting"),
        (lambda: RectifiedFlow(use_dynamic_shifting=True, mu="0.5"), "mu"),
        (lambda: RectifiedFlow(use_dynamic_shifting=True, time_shift_type="linear", mu=-1.0), "mu"),
        (lambda: RectifiedFlow(max_image_seq_len=1), "max_image_seq_len"),
        (lambda: RectifiedFlow(base_shift=None), "base_shift"),
        (lambda: KarrasVE(sigma_min=1.0, sigma_max=0.5), "sigma_min < sigma_max"),
        (lambda: KarrasVE(sigma_data=0.0), "sigma_data"),
        (lambda: KarrasVE(rho="7"), "rho"),
        (lambda: noise_schedule_from_dict({"kind": "edm", "sigma_schedule": "exponential"}), "sigma_schedule"),
        (lambda: noise_schedule_from_dict({"kind": "edm", "sigma_max": [80]}), "sigma_max"),
        (lambda: noise_schedule_from_dict({"kind": "rectified_flow", "shift": "3"}), "shift"),
        (
            lambda: noise_schedule_from_diffusers_config(
                {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift_terminal": 0.1}
            ),
            "shift_terminal",
        ),
        (
            lambda: noise_schedule_from_diffusers_config({"use_flow_sigmas": True, "use_karras_sigmas": True}),
            "use_karras_sigmas",
        ),
    ],
)
def test_bad_flow_and_edm_parameters_name_the_parameter(make, words):
    with pytest.raises(NoiseScheduleError, match=words):
        make()


SHIFTED_FLOWS = [
    RectifiedFlow(shift=3.0),
    RectifiedFlow(shift=0.5),
    RectifiedFlow(use_dynamic_shifting=True, mu=1.15),
    RectifiedFlow(use_dynamic_shifting=True, time_shift_type="linear", mu=2.5),
]


@pytest.mark.parametrize("flow", SHIFTED_FLOWS, ids=repr)
def test_unshifted_inverts_shifted(flow):
    s = np.concatenate([[0.0, 1e-4], np.linspace(0.001, 1.0, 999)])
    np.testing.assert_allclose(flow.unshifted(flow.shifted(s)), s, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flow.shifted(flow.unshifted(s)), s, rtol=1e-12, atol=1e-15)
    assert flow.shifted(1.0) == 1.0 and flow.shifted(0.0) == 0.0


@pytest.mark.parametrize("flow", SHIFTED_FLOWS, ids=repr)
def test_shifted_is_flow_match_eulers_shift(flow):
    """FlowMatchEulerDiscreteScheduler shifts whatever sigmas it is handed; its float32 result is ours."""
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=flow.shift, use_dynamic_shifting=flow.use_dynamic_shifting, time_shift_type=flow.time_shift_type
    )
    s = np.linspace(1.0, 0.01, 23)
    scheduler.set_timesteps(sigmas=s, **({"mu": flow.mu} if flow.use_dynamic_shifting else {}))
    np.testing.assert_allclose(scheduler.sigmas[:-1].double().numpy(), flow.shifted(s), rtol=1e-6)


@pytest.mark.parametrize("flow", SHIFTED_FLOWS, ids=repr)
def test_a_shift_moves_log_snr_by_a_constant(flow):
    """σ' = sσ/(1 + (s − 1)σ) is λ' = λ − ln s (s = e^μ, or μ itself for the linear dynamic shift): shifted
    grids are the same grids moved towards the noise, so λ-uniform grids stay λ-uniform."""
    scale = (
        flow.shift
        if not flow.use_dynamic_shifting
        else (np.exp(flow.mu) if flow.time_shift_type == "exponential" else flow.mu)
    )
    s = np.linspace(0.001, 0.999, 101)
    np.testing.assert_allclose(flow.lambda_(flow.shifted(s)), flow.lambda_(s) - np.log(scale), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("image_seq_len", [64, 256, 1024, 4096, 8192])
@pytest.mark.parametrize(
    "dynamic", [{}, {"base_shift": 0.3, "max_shift": 1.5, "base_image_seq_len": 64, "max_image_seq_len": 1024}]
)
def test_mu_for_is_fluxs_calculate_shift(image_seq_len, dynamic):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    flow = RectifiedFlow(use_dynamic_shifting=True, **dynamic)
    names = {"base_image_seq_len": "base_seq_len", "max_image_seq_len": "max_seq_len"}
    expected = calculate_shift(image_seq_len, **{names.get(k, k): v for k, v in dynamic.items()})
    assert flow.mu_for(image_seq_len) == pytest.approx(expected, rel=1e-12)
    assert flow.with_mu(flow.mu_for(image_seq_len)).mu == flow.mu_for(image_seq_len)


def test_edm_preconditioning_and_noise_input_are_the_edm_schedulers():
    edm = KarrasVE(sigma_data=0.7)
    scheduler = EDMEulerScheduler(sigma_data=0.7)
    sigma = torch.tensor([0.002, 0.3, 1.0, 17.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    out = torch.randn(5, dtype=torch.float64)
    c_in, c_skip, c_out = edm.preconditioning(sigma)
    torch.testing.assert_close(c_in * x, scheduler.precondition_inputs(x, sigma), rtol=1e-14, atol=0)
    torch.testing.assert_close(
        c_skip * x + c_out * out, scheduler.precondition_outputs(x, out, sigma), rtol=1e-13, atol=1e-15
    )
    torch.testing.assert_close(
        edm.network_time(sigma / 80.0), scheduler.precondition_noise(sigma), rtol=1e-14, atol=1e-15
    )
