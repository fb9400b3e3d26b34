"""The evaluator: deterministic, common random numbers, divergence as a result, a converged teacher, and
metrics whose floor (the model's converged samples) scores best and that improve with NFE."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from solversearch import SolverSchedule, Step, presets
from solversearch.evaluator import EvaluationSettings, Evaluator, teacher_schedule
from solversearch.metrics.distances import error_to_reference
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model
from solversearch.statistics import BETTER, WORSE, paired_difference


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ArrayCache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def gmm_model():
    return load_model("gmm:digits")


def test_same_seed_gives_the_same_numbers_twice(gmm_model, cache):
    schedule = presets.build("dpmpp_2m", gmm_model.noise_schedule, 5, "logsnr")
    settings = EvaluationSettings(n=400, seed=3, batch_size=150)
    first = Evaluator(gmm_model, settings, cache).evaluate(schedule)
    second = Evaluator(gmm_model, settings, cache).evaluate(schedule)
    assert first.metrics() == second.metrics()
    other = Evaluator(gmm_model, EvaluationSettings(n=400, seed=4), cache).evaluate(schedule)
    assert other.fid != first.fid


def test_batching_does_not_change_the_samples(gmm_model, cache):
    schedule = presets.build("unipc_2_bh2", gmm_model.noise_schedule, 6, "trailing")
    a = Evaluator(gmm_model, EvaluationSettings(n=300, batch_size=300), cache).sample(schedule)
    b = Evaluator(gmm_model, EvaluationSettings(n=300, batch_size=70), cache).sample(schedule)
    assert (a - b).abs().max() < 1e-5


def test_a_diverging_schedule_is_a_result_not_an_exception(gmm_model, cache):
    """A valid schedule whose linear scaling coefficient overflows the update to inf/NaN."""
    steps = (Step(), Step.multistep(2, scaling="linear", linear_coefficient=1e308), Step())
    schedule = SolverSchedule(timesteps=(1.0, 0.5, 0.2, 0.01), steps=steps)
    result = Evaluator(gmm_model, EvaluationSettings(n=100), cache).evaluate(schedule)
    assert result.diverged and math.isinf(result.fid) and math.isinf(result.kid)
    assert result.to_dict()["fid"] is None and result.to_dict()["diverged"] is True


def test_exact_fid_and_error_to_reference_rank_ddim_below_higher_order_solvers(gmm_model, cache):
    evaluator = Evaluator(gmm_model, EvaluationSettings(n=1000), cache)
    ddim = evaluator.evaluate(presets.build("ddim", gmm_model.noise_schedule, 5, "logsnr"))
    unipc = evaluator.evaluate(presets.build("unipc_3_bh2", gmm_model.noise_schedule, 5, "logsnr"))
    assert unipc.error_to_reference < ddim.error_to_reference
    assert unipc.fid < ddim.fid


def test_the_teacher_is_converged(gmm_model, cache):
    """The teacher (50 steps) is within a small fraction of a good 10-NFE solver's distance of a solution
    with four times the steps: its own error cannot decide a comparison between fast schedules."""
    evaluator = Evaluator(gmm_model, EvaluationSettings(n=200), cache)
    finer = evaluator.sample(teacher_schedule(gmm_model.noise_schedule, 4 * evaluator.settings.reference_steps))
    teacher_error = error_to_reference(evaluator.teacher(), finer)
    ten_steps = evaluator.evaluate(presets.build("unipc_2_bh2", gmm_model.noise_schedule, 10, "logsnr"))
    assert teacher_error < 0.1 * ten_steps.error_to_reference, (teacher_error, ten_steps.error_to_reference)


def test_teacher_distances_are_zero_for_the_teacher_and_agree_with_each_other(gmm_model, cache):
    """The floor is the teacher itself; with identity features the perceptual distance is the per-sample
    mean square, i.e. the square of the pixel RMS distance."""
    evaluator = Evaluator(gmm_model, EvaluationSettings(n=200), cache)
    floor = evaluator.floor()
    assert floor.teacher_distance == 0.0 and floor.error_to_reference == 0.0
    result = evaluator.evaluate(presets.build("ddim", gmm_model.noise_schedule, 6, "logsnr"))
    assert result.teacher_distance == pytest.approx(result.error_to_reference**2, rel=1e-6)


def test_exact_mixture_samples_score_nearly_zero(gmm_model, cache):
    """Exact mixture samples against the exact moments: only the finite-sample bias of 10,000 samples
    remains, which is ~ tr Σ / n (the mean's share) plus the covariance's; samples and moments are both
    unclamped (29 % of the mixture's pixel values lie outside [−1, 1])."""
    evaluator = Evaluator(gmm_model, EvaluationSettings(n=10_000, batch_size=5000, error_to_reference=False), cache)
    exact = gmm_model.denoiser.sample_data(10_000, torch.Generator().manual_seed(7)).float()
    assert float((exact.abs() > 1).float().mean()) > 0.2
    _, cov = gmm_model.exact_reference()
    fid = evaluator.score(exact)["fid"]
    assert 0 < fid < 10 * np.trace(cov) / 10_000, fid


@pytest.mark.parametrize("metric", ["fid", "kid", "teacher_distance", "error_to_reference"])
def test_on_the_mixture_the_floor_scores_best_and_dpmpp_2m_improves_with_nfe(mixture_scores, metric):
    floor_best_and_monotone(mixture_scores, metric)


@pytest.fixture(scope="module")
def mixture_scores(gmm_model, cache):
    return scores_on_fresh_seeds(gmm_model, cache, n=1000)


SEEDS = (11, 12, 13)  # never used by searches (0), selection (1000) or validation (1–5)
MONOTONE_NFE = (4, 6, 10, 20)
FLOOR_RIVALS = [
    (solver, grid, nfe)
    for solver in ("dpmpp_2m", "dpmpp_3m", "unipc_2_bh2", "unipc_3_bh2", "deis_3")
    for grid in ("logsnr", "time_quadratic", "time_uniform")
    for nfe in (6,)
]


def scores_on_fresh_seeds(model, cache, n: int) -> dict[str, list[dict[str, float]]]:
    """Per schedule, its metrics on each fresh seed: the floor, DPM-Solver++(2M) at 4, 6, 10, 20 NFE, and
    the strongest presets at NFE 6 (where a fast solver comes closest to the floor)."""
    out: dict[str, list[dict[str, float]]] = {}
    for seed in SEEDS:
        evaluator = Evaluator(model, EvaluationSettings(n=n, seed=seed), cache)
        out.setdefault("floor", []).append(evaluator.floor().metrics())
        for nfe in MONOTONE_NFE:
            schedule = presets.build("dpmpp_2m", model.noise_schedule, nfe, "logsnr")
            out.setdefault(f"dpmpp_2m/{nfe}", []).append(evaluator.evaluate(schedule).metrics())
        for solver, grid, nfe in FLOOR_RIVALS:
            schedule = presets.build(solver, model.noise_schedule, nfe, grid)
            out.setdefault(schedule.name, []).append(evaluator.evaluate(schedule).metrics())
    return out


def floor_best_and_monotone(scores: dict[str, list[dict[str, float]]], metric: str) -> None:
    """(a) No schedule is significantly better than the converged samples (paired over the seeds, with the
    interval the seed spread gives); (b) DPM-Solver++(2M) never gets significantly worse with more NFE and is
    significantly better at 20 than at 4."""
    values = {name: [s[metric] for s in per_seed] for name, per_seed in scores.items()}
    for name, rival in values.items():
        if name != "floor":
            assert paired_difference(values["floor"], rival).verdict != WORSE, (metric, name, values["floor"], rival)
    chain = [values[f"dpmpp_2m/{nfe}"] for nfe in MONOTONE_NFE]
    for fewer, more in itertools.pairwise(chain):
        assert paired_difference(more, fewer).verdict != WORSE, (metric, chain)
    assert paired_difference(chain[-1], chain[0]).verdict == BETTER, (metric, chain)


def test_the_cost_is_reported(gmm_model, cache):
    schedule = presets.build("ddim", gmm_model.noise_schedule, 4, "logsnr")
    result = Evaluator(gmm_model, EvaluationSettings(n=200, error_to_reference=False), cache).evaluate(schedule)
    assert result.nfe == 4 and result.seconds > 0 and result.samples_per_second > 0
    assert result.seconds == pytest.approx(result.sampling_seconds + result.metric_seconds, rel=1e-6)
    assert result.error_to_reference is None


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled:digits")


@pytest.fixture(scope="module")
def bundled_scores(bundled, cache):
    return scores_on_fresh_seeds(bundled, cache, n=500)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["fid", "kid", "teacher_distance", "error_to_reference"])
def test_on_the_bundled_model_the_floor_scores_best_and_dpmpp_2m_improves_with_nfe(bundled_scores, metric):
    """FID and KID here are to the real digits, in the proxy network's features: the model's converged
    samples must still score best (a metric that prefers a fast solver's output to the converged model
    rewards solver error)."""
    floor_best_and_monotone(bundled_scores, metric)
