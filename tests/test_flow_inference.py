"""SearchedScheduler on rectified-flow and EDM models: a tiny Stable Diffusion 3 pipeline and an EDM loop
reproduce solversearch's sampler, and the exported sigma lists drive diffusers' own flow and EDM
schedulers to the same samples as the first-order preset on the same times."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

from solversearch import (
    KarrasVE,
    RectifiedFlow,
    SearchedScheduler,
    SolverSchedule,
    Step,
    noise_schedule_from_diffusers_config,
    presets,
    solve,
)
from solversearch.errors import ScheduleError
from solversearch.exports import export_diffusers
from solversearch.models import UNetDenoiser

SIZE = 8  # latent pixels per side; patch size 1, so 64 image tokens
EMBED = 12  # width of the (random) prompt embeddings
POOLED = 6  # width of the pooled prompt embedding
FLOW_CONFIGS = {
    "static": {"shift": 3.0},
    "dynamic": {"use_dynamic_shifting": True},  # diffusers' default base/max shift and sequence lengths
}


def flow_path(kind: str) -> tuple[dict, RectifiedFlow]:
    """A FlowMatchEulerDiscreteScheduler config and its path; a dynamic path gets the μ that the SD3 pipeline
    computes for SIZE × SIZE latents."""
    config = FlowMatchEulerDiscreteScheduler(**FLOW_CONFIGS[kind]).config
    noise = RectifiedFlow.from_diffusers_config(config)
    return config, noise.with_mu(noise.mu_for(SIZE * SIZE)) if noise.use_dynamic_shifting else noise


def tiny_sd3(scheduler) -> StableDiffusion3Pipeline:
    """SD3 from random tiny components in float64; no text encoders or tokenizers: the pipeline takes
    prompt embeddings as tensors."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=SIZE,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=EMBED,
        pooled_projection_dim=POOLED,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.06,
        scaling_factor=1.5,
        sample_size=SIZE,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer.double().eval(),
        scheduler=scheduler,
        vae=vae.double().eval(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


class GuidedVelocity(torch.nn.Module):
    """The SD3 transformer called the way UNetDenoiser calls a UNet, `network(x, time).sample`, with the
    prompt embeddings bound and classifier-free guidance applied to the velocity as the pipeline does."""

    def __init__(self, transformer, prompt, pooled, negative, negative_pooled, guidance_scale):
        super().__init__()
        self.transformer, self.guidance_scale = transformer, guidance_scale
        self.prompt, self.pooled, self.negative, self.negative_pooled = prompt, pooled, negative, negative_pooled

    def forward(self, x, time):
        guided = self.guidance_scale > 1.0
        embeds = torch.cat([self.negative, self.prompt]) if guided else self.prompt
        pooled = torch.cat([self.negative_pooled, self.pooled]) if guided else self.pooled
        inputs = torch.cat([x, x]) if guided else x
        times = torch.cat([time, time]) if guided else time
        out = self.transformer(
            hidden_states=inputs,
            timestep=times,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if guided:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return SimpleNamespace(sample=out)


def prompts(batch: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shapes = {
        "prompt_embeds": (batch, 5, EMBED),
        "pooled_prompt_embeds": (batch, POOLED),
        "negative_prompt_embeds": (batch, 5, EMBED),
        "negative_pooled_prompt_embeds": (batch, POOLED),
    }
    return {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}


def run_pipeline(pipe, latents, guidance_scale, **options) -> torch.Tensor:
    with torch.no_grad():
        return pipe(
            **prompts(),
            latents=latents,
            guidance_scale=guidance_scale,
            height=SIZE,
            width=SIZE,
            output_type="latent",
            **options,
        ).images


def sampler_reference(pipe, noise, schedule, latents, guidance_scale) -> torch.Tensor:
    embeds = prompts()
    network = GuidedVelocity(
        pipe.transformer,
        embeds["prompt_embeds"],
        embeds["pooled_prompt_embeds"],
        embeds["negative_prompt_embeds"],
        embeds["negative_pooled_prompt_embeds"],
        guidance_scale,
    )
    with torch.no_grad():
        return solve(UNetDenoiser(network, noise, "flow_prediction"), schedule, latents).sample


def searched_flow_schedule(noise: RectifiedFlow) -> SolverSchedule:
    """Free times from σ = 1 (its first step is the x̂₀ step), mixed predictions, orders and correctors;
    no derivative is fitted through the point at σ = 1."""
    steps = (
        Step(),
        Step(prediction="noise", corrector="unic"),
        Step.multistep(2, "data", scaling="bh2", corrector="unic"),
        Step(prediction="data", order=3, derivative_points=((1,), (1, 2))),
        Step(),
    )
    return SolverSchedule(
        timesteps=(1.0, 0.86, 0.62, 0.35, 0.12, 0.0), steps=steps, noise_schedule=noise.to_dict(), name="searched-flow"
    )


def flow_schedule(name: str, noise: RectifiedFlow) -> SolverSchedule:
    if name == "searched":
        return searched_flow_schedule(noise)
    preset, grid = name.split("/")
    return presets.build(preset, noise, 5, grid)


LATENTS = torch.randn(2, 4, SIZE, SIZE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "schedule_name, path, guidance_scale",
    [
        ("searched", "static", 1.0),
        ("searched", "dynamic", 3.0),
        ("dpmpp_2m/flow_sigmas", "static", 3.0),  # starts below σ = 1
        ("unipc_3_bh2/shifted", "dynamic", 1.0),  # starts at σ = 1
    ],
)
def test_stable_diffusion_3_pipeline_runs_a_searched_schedule_as_the_sampler_does(schedule_name, path, guidance_scale):
    config, noise = flow_path(path)
    schedule = flow_schedule(schedule_name, noise)
    pipe = tiny_sd3(SearchedScheduler.from_schedule(schedule, config))
    assert pipe.scheduler.timesteps.tolist() == pytest.approx([1000 * t for t in schedule.timesteps[:-1]], rel=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The pipeline computes its own μ from the latent size (dynamic shifting) and passes it on: it is the
        # schedule's, so nothing is said.
        got = run_pipeline(pipe, LATENTS, guidance_scale, num_inference_steps=schedule.nfe)
    assert not [w for w in caught if "mu=" in str(w.message)]
    expected = sampler_reference(pipe, noise, schedule, LATENTS, guidance_scale)
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("path", ["static", "dynamic"])
def test_flow_match_euler_takes_the_exported_sigmas_and_reproduces_the_flow_euler_preset(path):
    """The flow-Euler step is DDIM on a flow path: the model's own FlowMatchEulerDiscreteScheduler, given the
    exported (unshifted) sigmas, lands on the schedule's σ and gives the samples of DDIM on them."""
    config, noise = flow_path(path)
    schedule = presets.build("ddim", noise, 5, "shifted")
    doc = export_diffusers(schedule, noise, "sigmas")
    assert "unshifted" in doc["units"] and doc["dropped"] == []  # first order, data form, ends at 0: all of it
    own = FlowMatchEulerDiscreteScheduler.from_config(config)
    own.set_timesteps(sigmas=doc["sigmas"], mu=noise.mu)
    np.testing.assert_allclose(own.sigmas.double().numpy(), schedule.timesteps, rtol=1e-6, atol=1e-7)
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(config))
    got = run_pipeline(pipe, LATENTS, 1.0, sigmas=doc["sigmas"])
    expected = sampler_reference(pipe, noise, schedule, LATENTS, 1.0)
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("path", ["static", "dynamic"])
def test_exported_flow_sigmas_of_any_times_land_on_them_and_list_what_was_dropped(path):
    config, noise = flow_path(path)
    schedule = searched_flow_schedule(noise)
    doc = export_diffusers(schedule, noise)  # sigmas: the only kind a flow model has
    own = FlowMatchEulerDiscreteScheduler.from_config(config)
    own.set_timesteps(sigmas=doc["sigmas"], mu=noise.mu)
    np.testing.assert_allclose(own.sigmas.double().numpy(), schedule.timesteps, rtol=1e-6, atol=1e-7)
    dropped = " | ".join(doc["dropped"])
    assert "orders [1, 1, 2, 3, 1]" in dropped and "noise (ε) prediction at steps [1]" in dropped
    assert "UniC corrector after steps [1, 2]" in dropped and "SearchedScheduler" in doc["note"]


def test_a_pipeline_at_another_image_size_warns_that_mu_differs_and_its_own_sigmas_are_ignored():
    config, noise = flow_path("dynamic")
    scheduler = SearchedScheduler.from_schedule(searched_flow_schedule(noise), config)
    assert scheduler.config.use_dynamic_shifting and scheduler.config.mu == pytest.approx(noise.mu)
    with pytest.warns(UserWarning, match="mu=0.5 .*searched at mu=0.4675"):
        scheduler.set_timesteps(5, mu=noise.mu_for(256))  # 16 × 16 latents
    with pytest.warns(UserWarning, match="ignores the sigmas="):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5), mu=noise.mu)  # what FluxPipeline passes
    with pytest.raises(ScheduleError, match="sigmas= has 28 entries"):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.02, 28), mu=noise.mu)
    static = SearchedScheduler.from_schedule(searched_flow_schedule(flow_path("static")[1]), flow_path("static")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        static.set_timesteps(5, mu=1.7)  # a static shift ignores mu, as FlowMatchEulerDiscreteScheduler does


def test_a_flow_scheduler_saves_and_loads_with_its_path(tmp_path):
    config, noise = flow_path("dynamic")
    first = SearchedScheduler.from_schedule(searched_flow_schedule(noise), config)
    first.save_pretrained(tmp_path)
    second = SearchedScheduler.from_pretrained(tmp_path)
    assert second.noise == first.noise == noise and second.config.prediction_type == "flow_prediction"
    assert torch.equal(second.timesteps, first.timesteps)
    again = SearchedScheduler.from_schedule(searched_flow_schedule(noise), second.config)  # a swapped pipe's config
    assert again.noise == noise


def test_a_schedule_searched_at_another_mu_only_warns_but_on_another_shift_is_refused():
    config, noise = flow_path("dynamic")
    with pytest.warns(UserWarning, match="searched at mu=0.4675, this model is shifted with mu=1.1"):
        SearchedScheduler.from_schedule(searched_flow_schedule(noise), config, mu=1.1)
    other = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, max_shift=1.3).config
    with pytest.raises(ScheduleError, match="noise schedule"):
        SearchedScheduler.from_schedule(searched_flow_schedule(noise), other)
    _, noise = flow_path("static")
    with pytest.raises(ScheduleError, match="noise schedule"):
        SearchedScheduler.from_schedule(
            searched_flow_schedule(noise), FlowMatchEulerDiscreteScheduler(shift=1.0).config
        )


# --- EDM ------------------------------------------------------------------------------------------------


def edm_loop(scheduler, unet, x):
    """EDMEulerScheduler's loop (after set_timesteps): scale_model_input (c_in·x) → network at the
    scheduler's timestep (c_noise) → step (the output preconditioning and the update)."""
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


EDM = KarrasVE()
X_EDM = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def searched_edm_schedule() -> SolverSchedule:
    steps = (
        Step(),
        Step.multistep(2, "data", scaling="linear", linear_coefficient=0.3, corrector="unic"),
        Step(prediction="data", order=3, derivative_points=((1,), (1, 2)), corrector="unic"),
        Step.multistep(2, "noise", scaling="bh1"),
        Step(),
    )
    return SolverSchedule(
        timesteps=(1.0, 0.2, 0.03, 0.004, 0.0004, 0.0), steps=steps, noise_schedule=EDM.to_dict(), name="searched-edm"
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["searched", "dpmpp_3m/edm", "unipc_2_bh2/karras"])
def test_edm_loop_runs_a_searched_schedule_as_the_sampler_does(name, prediction_type, tiny_unet):
    if name == "searched":
        schedule = searched_edm_schedule()
    else:
        preset, grid = name.split("/")
        schedule = presets.build(preset, EDM, 5, grid)
    config = EDMEulerScheduler(prediction_type=prediction_type).config
    scheduler = SearchedScheduler.from_schedule(schedule, config)
    assert scheduler.init_noise_sigma == pytest.approx(EDM.prior_std(schedule.timesteps[0]))
    x_T = X_EDM * scheduler.init_noise_sigma
    scheduler.set_timesteps(schedule.nfe)
    got = edm_loop(scheduler, tiny_unet, x_T)
    expected = solve(UNetDenoiser(tiny_unet, EDM, prediction_type), schedule, x_T).sample
    assert float((got - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_on_the_edm_grid_is_diffusers_edm_euler_step_for_step(prediction_type, tiny_unet):
    """An independent oracle for the EDM contract (init_noise_sigma aside: EDMEulerScheduler draws with
    √(σ_max² + 1)): diffusers' own EDM Euler in the same loop from the same x."""
    schedule = presets.build("ddim", EDM, 6, "edm")
    ours = SearchedScheduler.from_schedule(schedule, EDMEulerScheduler(prediction_type=prediction_type).config)
    theirs = EDMEulerScheduler(prediction_type=prediction_type)
    ours.set_timesteps(6)
    theirs.set_timesteps(6)
    assert ours.timesteps.tolist() == pytest.approx(theirs.timesteps.tolist(), rel=1e-6)
    x = X_EDM * 80.0
    got, expected = edm_loop(ours, tiny_unet, x), edm_loop(theirs, tiny_unet, x)
    assert float((got - expected).abs().max()) <= 1e-5  # diffusers computes σ in float32: ~1e-7 apart


def test_edm_euler_takes_the_exported_ramp_and_reproduces_ddim_on_the_schedules_times(tiny_unet):
    times = searched_edm_schedule().timesteps
    schedule = presets.ddim(times).with_metadata(noise_schedule=EDM.to_dict())
    doc = export_diffusers(schedule, EDM, "sigmas")
    np.testing.assert_allclose(doc["sigmas"], [80.0 * t for t in times[:-1]], rtol=1e-12)
    theirs = EDMEulerScheduler()
    theirs.set_timesteps(sigmas=torch.tensor(doc["edm_euler_ramp"]))
    np.testing.assert_allclose(theirs.sigmas.double().numpy(), [80.0 * t for t in times], rtol=1e-5)
    x = X_EDM * 80.0
    got = edm_loop(theirs, tiny_unet, x)
    expected = solve(UNetDenoiser(tiny_unet, EDM), schedule, x).sample
    assert float((got - expected).abs().max()) <= 1e-5


def test_edm_add_noise_inverts_the_network_time(tiny_unet):
    scheduler = SearchedScheduler.from_schedule(searched_edm_schedule(), EDMEulerScheduler().config)
    x0, eps = torch.ones(2, 1, 2, 2, dtype=torch.float64), torch.full((2, 1, 2, 2), 2.0, dtype=torch.float64)
    noisy = scheduler.add_noise(x0, eps, scheduler.timesteps[:2])
    sigmas = torch.tensor([80.0, 16.0], dtype=torch.float64).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, x0 + sigmas * eps, rtol=1e-6, atol=0)


def test_a_flow_pipeline_refuses_the_analytic_first_step_it_cannot_run():
    """SD3 never calls scale_model_input, which the analytic first step needs."""
    config, noise = flow_path("static")
    schedule = SolverSchedule(
        timesteps=(0.999, 0.6, 0.3, 0.0),
        steps=(Step(), Step.multistep(2), Step()),
        first_step="analytic",
        noise_schedule=noise.to_dict(),
    )
    pipe = tiny_sd3(SearchedScheduler.from_schedule(schedule, config))
    with pytest.raises(ScheduleError, match="scale_model_input"):
        run_pipeline(pipe, LATENTS, 1.0, num_inference_steps=schedule.nfe)


def test_an_in_memory_scheduler_config_names_its_path_by_its_keys():
    """`pipe.scheduler.config` has no _class_name (a saved scheduler_config.json has): the keys only flow
    schedulers (shift) and EDM ones (sigma_data) have tell the family."""
    assert noise_schedule_from_diffusers_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config) == RectifiedFlow(
        shift=3.0
    )
    assert noise_schedule_from_diffusers_config(EDMEulerScheduler(sigma_max=60.0).config) == KarrasVE(sigma_max=60.0)
