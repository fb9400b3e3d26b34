"""Schedule predictors: encodings that stay finite and local, rankings that generalise across NFE budgets.

The data set is every preset on six grids at NFE 3–8, each scored by its RMS error to a 200-step
third-order solution from the same x_T on the exact digits mixture: a true metric, not a stand-in.
"""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings

from solversearch import SolverSchedule, Step, grids, presets, solve
from solversearch.models.spec import load_model
from solversearch.predictor import (
    GLOBAL_FEATURES,
    STEP_COLUMNS,
    STEP_FEATURES,
    STEP_SCALE,
    GradientBoostingPredictor,
    RankingPredictor,
    encode_globals,
    encode_schedule,
    kendall_tau,
    metric_targets,
)

from .strategies import schedules

GRID_NAMES = ("logsnr", "time_uniform", "time_quadratic", "karras", "trailing", "leading")
NFES = (3, 4, 5, 6, 8)
REFERENCE_STEPS = 200


@dataclasses.dataclass(frozen=True)
class Dataset:
    schedules: list[SolverSchedule]
    errors: np.ndarray

    def subset(self, indices) -> tuple[list[SolverSchedule], np.ndarray]:
        return [self.schedules[k] for k in indices], self.errors[np.asarray(indices)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The development machine has 2 cores shared with other jobs; the tiny tensors here (64 samples,
    # a 32-unit GRU) run several times faster on one thread than on two oversubscribed ones.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def handle():
    return load_model("gmm:digits")


@pytest.fixture(scope="module")
def noise(handle):
    return handle.noise_schedule


@pytest.fixture(scope="module")
def dataset(handle, noise) -> Dataset:
    unique: dict[str, SolverSchedule] = {}
    for name in presets.PRESETS:
        for grid in GRID_NAMES:
            for nfe in NFES:
                schedule = presets.build(name, noise, nfe, grid)
                unique.setdefault(schedule.decisions_key(), schedule)
    x_T = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    references: dict[tuple[float, float], torch.Tensor] = {}
    errors = []
    for schedule in unique.values():
        key = (schedule.timesteps[0], schedule.timesteps[-1])
        if key not in references:
            references[key] = _reference(handle, noise, x_T, *key)
        sample = solve(handle.denoiser, schedule, x_T).sample
        errors.append((sample - references[key]).pow(2).mean().sqrt().item())
    return Dataset(list(unique.values()), np.array(errors))


def _reference(handle, noise, x_T: torch.Tensor, t_start: float, t_end: float) -> torch.Tensor:
    """A fine logSNR-uniform UniPC-3 solution; to reach t = 0 it integrates to the end of the model's
    range (t = 1/N) and takes the denoising step from there, as every schedule ending at 0 does."""
    positive_end = t_end if t_end > 0 else noise.default_t_end(REFERENCE_STEPS)
    times = grids.logsnr_uniform(noise, REFERENCE_STEPS, t_start, positive_end)
    if t_end == 0.0:
        times = np.append(times, 0.0)
    reference = presets.unipc(times, 3, "bh2", lower_order_final=False)
    return solve(handle.denoiser, reference, x_T).sample


def _random_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(0).permutation(n)
    cut = int(0.75 * n)
    return order[:cut], order[cut:]


def _analytic_to_zero() -> SolverSchedule:
    """An analytic first step, a low-order third-order step, an extreme linear scaling and a step to 0."""
    steps = (
        Step(),
        Step.multistep(2, scaling="linear", linear_coefficient=1e308, corrector="unic"),
        Step(order=3, derivative_points=((1,), (1, 2)), second_derivative_factor=0.5),
        Step(skip=("mid.attn",)),
    )
    return SolverSchedule(timesteps=(1.0, 0.6, 0.3, 0.1, 0.0), steps=steps, first_step="analytic")


def column(name: str) -> int:
    return STEP_COLUMNS.index(name)


# --- encoding -----------------------------------------------------------------------------------


def test_one_row_per_step_for_schedules_of_every_length(noise):
    for nfe in (3, 5, 8):
        schedule = presets.build("unipc_3_bh2", noise, nfe, "logsnr")
        assert encode_schedule(schedule, noise).shape == (nfe, STEP_FEATURES)
        assert encode_schedule(schedule, noise).dtype == np.float32
        assert encode_globals(schedule).shape == (GLOBAL_FEATURES,)
    analytic = _analytic_to_zero()
    assert encode_schedule(analytic, noise).shape == (4, STEP_FEATURES)
    np.testing.assert_allclose(encode_globals(analytic), [0.3, 0.4, 1.0, 1.0])  # NFE 3 of 4 steps


def test_the_step_to_zero_and_the_analytic_first_step_encode_finitely_and_only_where_they_are(noise):
    rows = encode_schedule(_analytic_to_zero(), noise, n_units=4)
    assert np.isfinite(rows).all()
    np.testing.assert_array_equal(rows[:, column("to_zero")], [0, 0, 0, 1])
    np.testing.assert_array_equal(rows[:, column("analytic_first_step")], [1, 0, 0, 0])
    np.testing.assert_array_equal(rows[:, column("low_order_derivative")], [0, 0, 1, 0])
    np.testing.assert_array_equal(rows[:, column("skip_fraction")], [0, 0, 0, 0.25])
    assert rows[1, column("linear_coefficient")] > 0 and rows[1, column("unic")] == 1


def test_step_sizes_add_up_to_the_logsnr_span_of_the_schedule(noise):
    """Telescoping: the normalised steps of a logSNR-uniform grid are equal and sum to the whole span."""
    schedule = presets.build("dpmpp_2m", noise, 6, "logsnr")
    steps = encode_schedule(schedule, noise)[:, column("step_size")]
    lam = noise.lambda_(np.array([schedule.timesteps[0], schedule.timesteps[-1]]))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-5)
    assert steps.sum() * STEP_SCALE == pytest.approx(lam[1] - lam[0], rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(schedules())
def test_every_valid_schedule_encodes_to_bounded_finite_numbers(ddpm_noise, schedule):
    rows = encode_schedule(schedule, ddpm_noise, n_units=3)
    assert rows.shape == (schedule.n_steps, STEP_FEATURES)
    assert np.isfinite(rows).all() and np.abs(rows).max() <= 4.0
    assert np.isfinite(encode_globals(schedule)).all()


def test_changing_one_decision_changes_exactly_that_steps_row(noise):
    schedule = presets.build("unipc_2_bh2", noise, 6, "logsnr")
    before = encode_schedule(schedule, noise)
    for index, change in ((2, {"corrector": "none"}), (4, {"prediction": "noise"}), (3, {"scaling": "bh1"})):
        steps = list(schedule.steps)
        steps[index] = dataclasses.replace(steps[index], **change)
        after = encode_schedule(dataclasses.replace(schedule, steps=tuple(steps)), noise)
        changed = np.flatnonzero((after != before).any(axis=1))
        assert changed.tolist() == [index], change


# --- ranking quality ----------------------------------------------------------------------------


def test_the_data_set_spans_a_wide_range_of_errors(dataset):
    """Guards the ranking tests: they mean something only if the schedules differ a lot."""
    assert len(dataset.schedules) > 300
    assert dataset.errors.max() / dataset.errors.min() > 20


def test_ranking_predictor_ranks_an_unseen_nfe_budget(dataset, noise):
    train = [k for k, s in enumerate(dataset.schedules) if s.nfe != 5]
    held_out = [k for k, s in enumerate(dataset.schedules) if s.nfe == 5]
    predictor = RankingPredictor(noise).fit(*dataset.subset(train))
    schedules, errors = dataset.subset(held_out)
    # Measured 0.64 (seed 0), 0.64–0.71 over seeds 0–4.
    assert kendall_tau(predictor.predict(schedules), errors) >= 0.55


def test_ranking_predictor_ranks_a_random_held_out_quarter(dataset, noise):
    train, test = _random_split(len(dataset.schedules))
    predictor = RankingPredictor(noise).fit(*dataset.subset(train))
    schedules, errors = dataset.subset(test)
    # Measured 0.80 (seed 0), 0.80–0.84 over seeds 0–4.
    assert kendall_tau(predictor.predict(schedules), errors) >= 0.65


def test_gradient_boosting_baseline_ranks_a_random_held_out_quarter(dataset, noise):
    train, test = _random_split(len(dataset.schedules))
    predictor = GradientBoostingPredictor(noise).fit(*dataset.subset(train))
    schedules, errors = dataset.subset(test)
    # Measured 0.77 (0.770–0.772 over seeds 0–4).
    assert kendall_tau(predictor.predict(schedules), errors) >= 0.6


# --- determinism, padding, persistence ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_fit(dataset) -> tuple[list[SolverSchedule], np.ndarray]:
    """A quick training set (NFE 3 and 4 only) for tests about mechanics rather than accuracy."""
    return dataset.subset([k for k, s in enumerate(dataset.schedules) if s.nfe in (3, 4)])


def test_same_seed_gives_identical_predictions_and_refitting_changes_nothing(small_fit, dataset, noise):
    probe = dataset.schedules
    predictor = RankingPredictor(noise, epochs=40, seed=1).fit(*small_fit)
    first = predictor.predict(probe)
    np.testing.assert_array_equal(RankingPredictor(noise, epochs=40, seed=1).fit(*small_fit).predict(probe), first)
    np.testing.assert_array_equal(predictor.fit(*small_fit).predict(probe), first)
    other_seed = RankingPredictor(noise, epochs=40, seed=2).fit(*small_fit).predict(probe)
    assert not np.array_equal(other_seed, first)


def test_fitting_leaves_the_global_torch_rng_alone(small_fit, noise):
    state = torch.get_rng_state()
    RankingPredictor(noise, epochs=2).fit(*small_fit)
    assert torch.equal(torch.get_rng_state(), state)


def test_a_prediction_does_not_depend_on_the_other_schedules_in_the_batch(small_fit, dataset, noise):
    """Padding is masked: a short schedule scores the same alone as next to an 8-step one."""
    predictor = RankingPredictor(noise, epochs=40).fit(*small_fit)
    short = presets.build("ddim", noise, 3, "karras")
    long = presets.build("unipc_3_bh2", noise, 8, "trailing")
    np.testing.assert_allclose(predictor.predict([short, long])[0], predictor.predict([short])[0], rtol=1e-5)


@pytest.mark.parametrize(
    "make", [lambda noise: RankingPredictor(noise, epochs=40), GradientBoostingPredictor], ids=["ranking", "gbr"]
)
def test_a_pickled_predictor_predicts_the_same(make, small_fit, dataset, noise):
    predictor = make(noise).fit(*small_fit)
    restored = pickle.loads(pickle.dumps(predictor))
    np.testing.assert_array_equal(restored.predict(dataset.schedules), predictor.predict(dataset.schedules))


def test_without_distinguishable_pairs_fit_succeeds_and_predicts_no_preference(noise):
    schedules = [presets.build("ddim", noise, 3, "logsnr"), presets.build("ddim", noise, 4, "logsnr")]
    predictor = RankingPredictor(noise).fit(schedules, [0.100, 0.101])  # log gap 0.01 < min_gap
    np.testing.assert_array_equal(predictor.predict(schedules), [0.0, 0.0])
    assert GradientBoostingPredictor(noise).fit(schedules[:1], [0.1]).predict(schedules).tolist() == [0.0, 0.0]


# --- targets and the rank statistic -------------------------------------------------------------


def test_diverged_metrics_rank_worst():
    targets = metric_targets([1.0, float("inf"), 0.5, float("nan"), np.e])
    # log 1 = 0, log e = 1: the diverged ones get 1 + 1 = 2, strictly worse than every finite one.
    np.testing.assert_allclose(targets, [0.0, 2.0, np.log(0.5), 2.0, 1.0])
    assert np.isfinite(metric_targets([float("inf"), float("nan")])).all()


def test_kendall_tau_of_identical_and_reversed_orderings():
    values = [0.3, 0.1, 2.0, 0.7]
    assert kendall_tau(values, values) == pytest.approx(1.0)
    assert kendall_tau(values, [-v for v in values]) == pytest.approx(-1.0)
    assert kendall_tau([1.0, 1.0, 1.0], values[:3]) == 0.0  # undefined (constant) → 0
