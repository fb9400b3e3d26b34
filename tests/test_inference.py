"""Inference: SearchedScheduler inside diffusers loops and pipelines reproduces solversearch's sampler."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMPipeline, DDPMScheduler

from solversearch import DiscreteVP, SearchedScheduler, SolverSchedule, Step, presets, solve
from solversearch.errors import ScheduleError, SolversearchError
from solversearch.inference import check_compatibility
from solversearch.models import UNetDenoiser
from solversearch.models.spec import load_model

from .conftest import make_tiny_conditional_unet, make_tiny_unet

REPO = Path(__file__).resolve().parents[1]
NOISE = DiscreteVP.from_diffusers_config({})
X_T = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def diffusers_loop(scheduler, unet, x_T, steps=None):
    """The loop every diffusers pipeline runs."""
    scheduler.set_timesteps(steps)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        with torch.no_grad():
            out = unet(model_input, t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def searched_schedule() -> SolverSchedule:
    """A schedule as a search produces it: free times, mixed decisions, the analytic first step."""
    steps = (
        Step(prediction="noise"),
        Step.multistep(2, "data", scaling="linear", linear_coefficient=0.3, corrector="unic"),
        Step(prediction="data", order=3, derivative_points=((1,), (1, 2)), corrector="unic"),
        Step.multistep(2, "noise", scaling="bh1"),
        Step(),
    )
    return SolverSchedule(
        timesteps=(1.0, 0.83, 0.52, 0.21, 0.06, 0.0),
        steps=steps,
        first_step="analytic",
        noise_schedule=NOISE.to_dict(),
        name="searched",
    )


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", sorted(presets.PRESETS) + ["searched"])
def test_scheduler_in_a_diffusers_loop_reproduces_the_sampler(name, prediction_type, tiny_unet):
    schedule = searched_schedule() if name == "searched" else presets.build(name, NOISE, 6, "trailing")
    scheduler = SearchedScheduler.from_schedule(schedule, DDPMScheduler(prediction_type=prediction_type).config)
    expected = solve(UNetDenoiser(tiny_unet, NOISE, prediction_type), schedule, X_T).sample
    got = diffusers_loop(scheduler, tiny_unet, X_T)
    assert float((got - expected).abs().max()) <= 1e-5
    assert len(scheduler.timesteps) == schedule.nfe


def test_ddpm_pipeline_runs_a_searched_schedule(tmp_path):
    unet = make_tiny_unet(channels=3).float()
    schedule = presets.build("unipc_3_bh2", NOISE, 5, "logsnr")
    pipe = DDPMPipeline(unet=unet, scheduler=SearchedScheduler.from_schedule(schedule, DDPMScheduler().config))
    generator = torch.Generator().manual_seed(0)
    images = pipe(batch_size=2, generator=generator, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    # DDPMPipeline draws x_T with the generator, then clamps (x + 1)/2 to [0, 1]: redo it by hand.
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    expected = ((solve(UNetDenoiser(unet, NOISE), schedule, x_T).sample / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1)
    assert float((torch.from_numpy(images) - expected).abs().max()) <= 1e-5


def test_ddpm_pipeline_refuses_the_analytic_first_step():
    unet = make_tiny_unet(channels=3).float()
    pipe = DDPMPipeline(
        unet=unet, scheduler=SearchedScheduler.from_schedule(searched_schedule(), DDPMScheduler().config)
    )
    with pytest.raises(ScheduleError, match="scale_model_input"):
        pipe(batch_size=1, num_inference_steps=4)


def tiny_text_to_image():
    unet = make_tiny_conditional_unet()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    ).eval()
    return unet, vae


def stable_diffusion_loop(scheduler, unet, vae, latents, prompt_embeds, negative_embeds, guidance_scale, steps):
    """StableDiffusionPipeline.__call__'s denoising loop (prompt embeddings given as tensors)."""
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    guided = guidance_scale > 1.0
    embeds = torch.cat([negative_embeds, prompt_embeds]) if guided else prompt_embeds
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        with torch.no_grad():
            noise_pred = unet(model_input, t, encoder_hidden_states=embeds).sample
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor).sample, latents


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("analytic", [False, True])
def test_text_to_image_loop_with_and_without_guidance(guidance_scale, analytic):
    unet, vae = tiny_text_to_image()
    config = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    noise = DiscreteVP.from_diffusers_config(config)
    schedule = presets.build("dpmpp_2m", noise, 5, "trailing")
    if analytic:
        schedule = SolverSchedule(
            timesteps=(1.0, 0.7, 0.4, 0.15, 0.04, 0.0),
            steps=(Step(), Step.multistep(2), Step.multistep(2), Step.multistep(2), Step()),
            first_step="analytic",
        )
    scheduler = SearchedScheduler.from_schedule(schedule, config)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    prompts, negatives = torch.randn(2, 5, 12, generator=generator), torch.randn(2, 5, 12, generator=generator)
    images, final = stable_diffusion_loop(
        scheduler, unet, vae, latents, prompts, negatives, guidance_scale, schedule.nfe
    )
    denoiser = UNetDenoiser(unet, noise, guidance_scale=guidance_scale).bind(
        encoder_hidden_states=prompts, **({"negative_encoder_hidden_states": negatives} if guidance_scale > 1 else {})
    )
    expected = solve(denoiser, schedule, latents).sample
    assert float((final - expected).abs().max()) <= 1e-5
    assert images.shape == (2, 3, 16, 16) and bool(images.isfinite().all())


def test_export_then_scheduler_save_and_load_give_identical_outputs(tmp_path, tiny_unet):
    """`solversearch export` → from_schedule → save_pretrained → from_pretrained → identical outputs."""
    from solversearch.cli import main
    from solversearch.search import StudyStore, TrialRecord

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = StudyStore(url, "round-trip")
    schedule = searched_schedule()
    store.record(
        TrialRecord(schedule, key="k1", stage=1, algorithm="s3", metrics={"fid": 1.0}, cost={"nfe": 4.0}, n=10),
        [1.0],
    )
    exported = tmp_path / "best.json"
    assert main(["export", "round-trip", "--storage", url, "--out", str(exported)]) == 0
    first = SearchedScheduler.from_schedule(exported, DDPMScheduler().config)
    first.save_pretrained(tmp_path / "scheduler")
    second = SearchedScheduler.from_pretrained(tmp_path / "scheduler")
    assert second.schedule.timesteps == schedule.timesteps and second.schedule.steps == schedule.steps
    assert torch.equal(diffusers_loop(first, tiny_unet, X_T), diffusers_loop(second, tiny_unet, X_T))


def test_bad_inputs_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ScheduleError, match="not valid JSON"):
        SearchedScheduler.from_schedule(bad, {})
    doc = presets.build("ddim", NOISE, 4, "logsnr").to_dict()
    doc["format"] = "solversearch.schedule/v0"
    bad.write_text(json.dumps(doc))
    with pytest.raises(ScheduleError, match="format"):
        SearchedScheduler.from_schedule(bad, {})
    scheduler = SearchedScheduler.from_schedule(presets.build("ddim", NOISE, 4, "logsnr"), {})
    with pytest.raises(ScheduleError, match="num_inference_steps=4"):
        scheduler.set_timesteps(50)


def test_a_different_noise_schedule_or_prediction_type_is_an_error_and_other_weights_a_warning():
    cosine = DiscreteVP.from_diffusers_config({"beta_schedule": "squaredcos_cap_v2"})
    schedule = presets.build("dpmpp_2m", NOISE, 5, "logsnr")
    with pytest.raises(ScheduleError, match="noise schedule"):
        SearchedScheduler.from_schedule(schedule, {"beta_schedule": "squaredcos_cap_v2"})
    handle = load_model("gmm:digits")
    tagged = schedule.with_metadata(provenance={"prediction_type": "v_prediction"})
    with pytest.raises(ScheduleError, match="v_prediction"):
        check_compatibility(tagged, handle)
    other = schedule.with_metadata(model_fingerprint="0000000000000000")
    with pytest.warns(UserWarning, match="searched on model"):
        check_compatibility(other, handle)
    with pytest.raises(SolversearchError, match="searched on model"):
        check_compatibility(other, handle, strict=True)
    assert cosine != NOISE


def test_sample_api_and_cli(tmp_path):
    import numpy as np

    from solversearch import sample

    schedule = presets.build("dpmpp_2m", NOISE, 5, "logsnr")
    path = schedule.save(tmp_path / "s.json")
    images = sample("gmm:digits", path, n=6, seed=3)
    assert images.shape == (6, 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images, sample("gmm:digits", schedule, n=6, seed=3))
    out = tmp_path / "grid.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "solversearch.cli",
            "sample",
            "--model",
            "gmm:digits",
            "--schedule",
            str(path),
            "--n",
            "8",
            "--out",
            str(out),
            "--npz",
            str(tmp_path / "s.npz"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0 and np.load(tmp_path / "s.npz")["samples"].shape == (8, 1, 8, 8)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "solversearch.cli",
            "sample",
            "--model",
            "gmm:digits",
            "--schedule",
            str(tmp_path / "nope.json"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot read" in bad.stderr


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    """The "Use a searched schedule" example in the README, executed as written."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use a searched schedule", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    schedule = presets.build("unipc_2_bh2", NOISE, 5, "trailing").with_metadata(noise_schedule=NOISE.to_dict())
    schedule.save(tmp_path / "digits-nfe5.json")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the documented example
    assert namespace["images"].shape[0] == 4


def pruned_schedule(units) -> SolverSchedule:
    base = presets.build("unipc_2_bh2", NOISE, 5, "logsnr")
    skips = [(), (units[0],), (units[1], units[-1]), (), (units[2],)]
    return SolverSchedule(
        timesteps=base.timesteps,
        steps=tuple(Step(**{**s.__dict__, "skip": k}) for s, k in zip(base.steps, skips)),
        noise_schedule=NOISE.to_dict(),
    )


def test_a_pruned_schedule_runs_inside_an_unmodified_pipeline():
    """`with pruned(unet, scheduler)` applies each step's skip set to the network call of that step:
    the pipeline then reproduces the sampler, which passes the skip sets to the denoiser itself."""
    from solversearch.inference import pruned
    from solversearch.models.pruning import prunable_units

    unet = make_tiny_unet(channels=3).float()
    schedule = pruned_schedule(prunable_units(unet))
    pipe = DDPMPipeline(unet=unet, scheduler=SearchedScheduler.from_schedule(schedule, DDPMScheduler().config))
    with pruned(pipe.unet, pipe.scheduler):
        images = pipe(
            batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=5, output_type="np"
        ).images
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    expected = ((solve(UNetDenoiser(unet, NOISE), schedule, x_T).sample / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1)
    unpruned = (
        (
            solve(UNetDenoiser(unet, NOISE), presets.build("unipc_2_bh2", NOISE, 5, "logsnr"), x_T).sample / 2 + 0.5
        ).clamp(0, 1)
    ).permute(0, 2, 3, 1)
    assert float((torch.from_numpy(images) - expected).abs().max()) <= 1e-5
    assert float((expected - unpruned).abs().max()) > 1e-3  # the skipping really happened
    assert unet(torch.zeros(1, 3, 8, 8), 10).sample.shape == (1, 3, 8, 8)  # and the network is whole again


def test_unknown_skipped_blocks_are_clear_errors(tmp_path):
    from solversearch.inference import pruned

    unet = make_tiny_unet(channels=3).float()
    schedule = pruned_schedule(["down_blocks.0.resnets.0", "mid_block.resnets.7", "up_blocks.0.resnets.0"])
    scheduler = SearchedScheduler.from_schedule(schedule, DDPMScheduler().config)
    with pytest.raises(ScheduleError, match="mid_block.resnets.7"), pruned(unet, scheduler):
        pass
    path = schedule.save(tmp_path / "pruned.json")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "solversearch.cli",
            "sample",
            "--model",
            "bundled:digits",
            "--schedule",
            str(path),
            "--n",
            "2",
            "--out",
            str(tmp_path / "g.png"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and "mid_block.resnets.7" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "g.png").exists()
