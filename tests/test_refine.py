"""Gradient refinement (refine.py): on problems whose answer is known it finds it, on the exact mixture it
lowers the exact FID on noise it never saw, and what it returns is an ordinary schedule that loads and
samples everywhere (our sampler, a diffusers loop)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from scipy.optimize import minimize

from solversearch import DiscreteVP, LinearVP, RectifiedFlow, SearchedScheduler, SolverSchedule, Step, presets, solve
from solversearch.errors import SolversearchError
from solversearch.evaluator import EvaluationSettings, Evaluator, teacher_schedule
from solversearch.metrics.reference import ArrayCache
from solversearch.models import GaussianMixtureDenoiser, UNetDenoiser
from solversearch.models.spec import ModelHandle, load_model
from solversearch.refine import EDGE, RefineSettings, TimeParametrisation, refine
from solversearch.schedule import load_schedule
from solversearch.statistics import paired_difference

from .test_inference import diffusers_loop

FRESH_SEEDS = (101, 102, 103)  # neither the refinement's seeds nor each other's


def handle(denoiser, shape, spec="test") -> ModelHandle:
    return ModelHandle(
        spec=spec, denoiser=denoiser, sample_shape=shape, fingerprint=spec, default_features="identity", data_range=None
    )


# --- a single Gaussian: the optimum of the discretisation error by brute force -------------------

VARIANCES = np.array([0.02, 0.2, 1.0, 3.0])  # N(0, diag): every solver is a linear map of x_T per dimension
GAUSSIAN_NOISE = LinearVP()


def gaussian() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(np.ones(1), np.zeros((1, 4)), np.diag(VARIANCES)[None], GAUSSIAN_NOISE)


def ddim_to_zero(lam1: float, lam2: float) -> SolverSchedule:
    t1, t2 = GAUSSIAN_NOISE.t_of_lambda(np.array([lam1, lam2]))
    return SolverSchedule(timesteps=(1.0, float(t1), float(t2), 0.0), steps=(Step(), Step(), Step()))


def population_error(model, lam1: float, lam2: float, exact: torch.Tensor) -> float:
    """E‖sample − teacher‖² over x_T ~ N(0, I): the solver's per-dimension gain against the exact one."""
    ones = torch.ones(1, 4, dtype=torch.float64)
    gain = solve(model, ddim_to_zero(lam1, lam2), ones).sample
    return float(((gain - exact) ** 2).sum())


def test_on_a_single_gaussian_refinement_moves_the_times_to_the_optimum_of_the_discretisation_error(tmp_path):
    """Three DDIM steps to t = 0 on N(0, diag(VARIANCES)): the two free log-SNR values that minimise the
    error to the exact flow are found by a grid search and Nelder–Mead on the closed-form gains; the
    refinement, which only sees 512 samples and a 50-step teacher, lands near them from a start far away."""
    model = gaussian()
    ones = torch.ones(1, 4, dtype=torch.float64)
    exact = solve(model, teacher_schedule(GAUSSIAN_NOISE, 200), ones).sample
    lam0 = float(GAUSSIAN_NOISE.lambda_(1.0))
    lam_end = float(GAUSSIAN_NOISE.lambda_(1e-3))
    grid = np.linspace(lam0 + 0.05, lam_end, 40)
    candidates = [(population_error(model, a, b, exact), a, b) for a in grid for b in grid if b > a + 0.05]
    _, a0, b0 = min(candidates)
    best = minimize(
        lambda p: population_error(model, p[0], p[1], exact) if lam0 < p[0] < p[1] else 1e9,
        [a0, b0],
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-12},
    )
    optimum = best.x

    start = np.array([lam0 + 0.3, lam0 + 0.6])  # far from the optimum: both steps early
    settings = RefineSettings(
        n=512, heldout_n=512, iterations=300, learning_rate=0.05, patience=300, learn_factors=False
    )
    result = refine(handle(model, (4,), "gaussian"), ddim_to_zero(*start), settings, cache=ArrayCache(tmp_path))
    learned = GAUSSIAN_NOISE.lambda_(np.array(result.schedule.timesteps[1:3]))
    assert np.linalg.norm(start - optimum) > 2.0
    assert np.linalg.norm(learned - optimum) < 0.1 * np.linalg.norm(start - optimum), (learned, optimum)
    assert result.heldout_losses[result.best_iteration] < 0.2 * result.heldout_losses[0]


# --- the exact mixture: fresh-seed FID ------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    return load_model("gmm:digits")


@pytest.mark.parametrize("nfe", [4, 5, 6])
@pytest.mark.parametrize("preset", ["ddim", "dpmpp_2m"])
def test_on_the_exact_mixture_refinement_lowers_the_exact_fid_on_fresh_noise(preset, nfe, mixture, tmp_path):
    schedule = presets.build(preset, mixture.noise_schedule, nfe, "logsnr")
    result = refine(mixture, schedule, RefineSettings(), cache=ArrayCache(tmp_path))
    assert result.best_iteration > 0 and not set(FRESH_SEEDS) & set(result.settings.seeds)
    before, after = [], []
    for seed in FRESH_SEEDS:
        evaluator = Evaluator(
            mixture, EvaluationSettings(n=1000, seed=seed, error_to_reference=False), ArrayCache(tmp_path)
        )
        before.append(evaluator.evaluate(schedule).fid)
        after.append(evaluator.evaluate(result.schedule).fid)
    difference = paired_difference(after, before)
    assert difference.high < 0, (before, after)


def test_on_a_flow_path_the_time_parametrisation_of_a_grid_from_pure_noise_reproduces_it():
    """diffusers' flow Euler grid starts at σ = 1 (λ = −∞): the start stays as it is, the split of the way
    starts at the path's t_start, and the initial parameters give the schedule's own times back (but for
    the end's offset from its bound)."""
    flow = RectifiedFlow()
    schedule = presets.build("ddim", flow, 5, "shifted")
    shape = TimeParametrisation(schedule, flow, None)
    split, end = (torch.tensor(v, dtype=torch.float64) for v in (shape.initial_split_logits, shape.initial_end_logit))
    lambdas = shape.lambdas(split, end)
    expected = flow.lambda_(np.array(schedule.timesteps[1:-1]))
    # The end sits on its bound (the usual end), so it starts EDGE of its range inside: λ moves by at most that.
    tolerance = EDGE * (expected[-1] - flow.lambda_(flow.t_start))
    assert lambdas[0] == -np.inf and shape.times(lambdas)[0] == 1.0
    np.testing.assert_allclose(lambdas[1:].numpy(), expected, rtol=0, atol=1.01 * tolerance)
    assert abs(float(lambdas[-1]) - expected[-1]) > 0.99 * tolerance  # the tolerance is the end's offset, not slack


@pytest.mark.slow
def test_on_a_flow_path_refining_euler_from_pure_noise_keeps_sigma_1_and_lowers_the_exact_fid(tmp_path):
    """diffusers' flow Euler grid starts at σ = 1 (λ = −∞): the start stays, the steps after it move."""
    flow = RectifiedFlow()
    model = GaussianMixtureDenoiser.fit_digits(flow)
    exact = load_model("gmm:digits").exact_reference  # the mixture's moments do not depend on the path
    mixture = replace(handle(model, model.sample_shape, "gmm-flow"), exact_reference=exact)
    schedule = presets.build("ddim", flow, 4, "shifted")
    result = refine(mixture, schedule, RefineSettings(), cache=ArrayCache(tmp_path))
    times = result.schedule.timesteps
    assert result.best_iteration > 0 and times[0] == 1.0 and times[1:] != schedule.timesteps[1:]
    assert all(np.isfinite(times)) and all(a > b for a, b in itertools.pairwise(times))
    before, after = [], []
    for seed in FRESH_SEEDS:
        evaluator = Evaluator(
            mixture, EvaluationSettings(n=1000, seed=seed, error_to_reference=False), ArrayCache(tmp_path)
        )
        before.append(evaluator.evaluate(schedule).fid)
        after.append(evaluator.evaluate(result.schedule).fid)
    assert paired_difference(after, before).high < 0, (before, after)


def test_a_step_that_overshoots_is_undone_and_retried_with_half_the_learning_rate(mixture, tmp_path):
    """From a learning rate 200× the default, the first steps wreck the times (or make them invalid); each
    is undone and the rate halved, and the refinement ends about where the default one does."""
    schedule = presets.build("ddim", mixture.noise_schedule, 5, "logsnr")
    default = refine(mixture, schedule, RefineSettings(), cache=ArrayCache(tmp_path))
    steep = refine(mixture, schedule, RefineSettings(learning_rate=20.0), cache=ArrayCache(tmp_path))
    parent = steep.heldout_losses[0]
    assert not steep.heldout_losses[1] < parent  # the first step overshot
    assert steep.heldout_losses[steep.best_iteration] < 0.5 * parent
    assert steep.heldout_losses[steep.best_iteration] <= 1.1 * default.heldout_losses[default.best_iteration]


# --- what refinement returns is an ordinary schedule ----------------------------------------------


def test_a_refined_schedule_round_trips_through_json_and_runs_in_a_diffusers_loop(tiny_unet, tmp_path):
    """Refinement through a real (tiny, random) UNet: the gradient reaches the times through its time
    embedding; the refined JSON loads back equal, and SearchedScheduler reproduces `solve` with it."""
    noise = DiscreteVP.from_diffusers_config({})
    denoiser = UNetDenoiser(tiny_unet, noise, "epsilon")
    parent = presets.build("dpmpp_2m", noise, 4, "logsnr")
    settings = RefineSettings(n=4, heldout_n=4, iterations=3, patience=3, reference_steps=20)
    result = refine(handle(denoiser, (2, 8, 8), "tiny"), parent, settings, cache=ArrayCache(tmp_path))
    refined = result.schedule
    assert refined.timesteps != parent.timesteps and refined.steps != parent.steps  # times and factors moved
    assert refined.provenance["refinement"]["parent_key"] == parent.decisions_key()
    loaded = load_schedule(refined.save(tmp_path / "refined.json"))
    assert loaded.timesteps == refined.timesteps and loaded.steps == refined.steps
    x_T = torch.randn(2, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = solve(denoiser, loaded, x_T).sample
    got = diffusers_loop(SearchedScheduler.from_schedule(loaded, DDPMScheduler().config), tiny_unet, x_T)
    assert float((got - expected).abs().max()) <= 1e-5


def test_a_refined_schedule_is_named_after_its_parent_and_an_unnamed_one_is_left_for_the_study_to_name(
    mixture, tmp_path
):
    """A preset's refinement says what it refined; a searched schedule has no name of its own, and the study
    names its refinement by its key, like every other searched schedule (never a made-up "schedule")."""
    settings = RefineSettings(n=8, heldout_n=8, iterations=1, patience=1)
    named = presets.build("ddim", mixture.noise_schedule, 4, "logsnr")
    assert named.name
    assert refine(mixture, named, settings, cache=ArrayCache(tmp_path)).schedule.name == f"{named.name}+refined"
    unnamed = named.with_metadata(name="")
    assert refine(mixture, unnamed, settings, cache=ArrayCache(tmp_path)).schedule.name == ""


def test_a_schedule_that_diverges_cannot_be_refined(mixture, tmp_path):
    times = [1.0, 0.999, 0.998, 0.002]
    exploding = SolverSchedule(
        timesteps=times,
        steps=(
            Step("noise"),
            Step.multistep(2, "noise", scaling="linear", linear_coefficient=1e30),
            Step.multistep(2, "noise"),
        ),
    )
    with pytest.raises(SolversearchError, match="diverges"):
        refine(mixture, exploding, RefineSettings(n=8, heldout_n=8, iterations=2), cache=ArrayCache(tmp_path))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n": 0}, "n must be a positive integer"),
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"seed": 5, "heldout_seed": 5}, "seeds must differ"),
        ({"end_range": (0.01, 0.001)}, "end_range"),
    ],
)
def test_bad_refinement_settings_are_user_errors(bad, message):
    with pytest.raises(SolversearchError, match=message):
        RefineSettings(**bad)


def test_the_refine_command_writes_a_refined_schedule_or_fails_cleanly(tmp_path, monkeypatch, capsys):
    from solversearch.cli import main

    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "refined.json"
    assert (
        main(
            [
                "refine",
                "--model",
                "gmm:digits",
                "--schedule",
                "ddim/logsnr",
                "--nfe",
                "4",
                "--out",
                str(out),
                "--iterations",
                "3",
                "--n",
                "16",
                "--heldout-n",
                "16",
            ]
        )
        == 0
    )
    refined = load_schedule(out)
    assert refined.nfe == 4 and refined.provenance["refinement"]["iterations"] >= 1
    assert refined.name.endswith("+refined")
    assert "held-out teacher distance" in capsys.readouterr().out
    for bad in (
        ["--schedule", "nope"],
        ["--schedule", "ddim", "--out", str(tmp_path / "missing" / "x.json")],
        ["--schedule", "ddim", "--learning-rate", "0"],
        ["--schedule", "study:2", "--storage", f"sqlite:///{tmp_path}/none.db"],
    ):
        arguments = ["refine", "--model", "gmm:digits", "--out", str(tmp_path / "bad.json"), *bad]
        assert main(arguments) == 2, bad
        assert not (tmp_path / "bad.json").exists()
    assert capsys.readouterr().err.count("solversearch: error:") == 4
