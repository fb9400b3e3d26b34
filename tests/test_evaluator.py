"""The evaluator: deterministic, common random numbers, divergence as a result, metrics that order solvers."""

from __future__ import annotations

import math

import pytest

from solversearch import SolverSchedule, Step, presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model


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


def test_error_to_reference_vanishes_for_the_reference_itself(gmm_model, cache):
    evaluator = Evaluator(gmm_model, EvaluationSettings(n=200, reference_steps=60), cache)
    reference = evaluator._high_accuracy_schedule(1.0, 1e-3, 60)
    assert evaluator.evaluate(reference).error_to_reference < 1e-6


def test_the_cost_is_reported(gmm_model, cache):
    schedule = presets.build("ddim", gmm_model.noise_schedule, 4, "logsnr")
    result = Evaluator(gmm_model, EvaluationSettings(n=200, error_to_reference=False), cache).evaluate(schedule)
    assert result.nfe == 4 and result.seconds > 0 and result.samples_per_second > 0
    assert result.seconds == pytest.approx(result.sampling_seconds + result.metric_seconds, rel=1e-6)
    assert result.error_to_reference is None


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled:digits")


def test_bundled_model_fid_decreases_with_nfe(bundled, cache):
    """DPM-Solver++(2M) on the bundled UNet: proxy FID at NFE 3 > 5 > 10 > 50 (same x_T). n = 2000: at
    NFE 10 the solver error is already near the proxy-FID noise of smaller sample sets (see
    benchmarks/evaluation_throughput.py)."""
    evaluator = Evaluator(bundled, EvaluationSettings(n=2000, error_to_reference=False), cache)
    fids = [evaluator.evaluate(presets.build("dpmpp_2m", bundled.noise_schedule, nfe, "logsnr")).fid for nfe in (3, 5, 10, 50)]
    assert fids[0] > fids[1] > fids[2] > fids[3], fids


@pytest.mark.slow
def test_bundled_model_ddim_50_is_within_noise_of_the_floor(bundled, cache):
    """The floor is the model's own distribution (200 UniPC-3 steps). DDIM at NFE 50 sits within the
    seed-to-seed noise of the floor; DDIM at NFE 5 does not."""
    floors, ddim50, ddim5 = [], [], []
    for seed in range(3):
        evaluator = Evaluator(bundled, EvaluationSettings(n=500, seed=seed, error_to_reference=False), cache)
        floors.append(evaluator.floor().fid)
        ddim50.append(evaluator.evaluate(presets.build("ddim", bundled.noise_schedule, 50, "logsnr")).fid)
        ddim5.append(evaluator.evaluate(presets.build("ddim", bundled.noise_schedule, 5, "logsnr")).fid)
    spread = max(floors) - min(floors)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert abs(mean(ddim50) - mean(floors)) <= max(spread, 0.05 * mean(floors)), (floors, ddim50)
    assert mean(ddim5) - mean(floors) > 2 * spread, (floors, ddim5)
