"""The search beats the hand-designed solvers where the truth is known: on the exact digits mixture the
FID is computed against the mixture's own moments, so no proxy can be gamed. The winner and the best of
the whole baseline pool are re-scored on five validation seeds the search never saw (twice the samples).
The searched schedule must have the lower mean exact FID and be significantly closer to the converged
solution: a paired 95 % interval below zero on the teacher distance. (Five seeds are too few for
the FID interval itself to exclude zero at these margins: its seed-to-seed spread is about 0.01.)

The search is the hybrid S³ with gradient refinement (`s3_refine`), and it searches the teacher
distance, the quantity refinement learns. Plain S³ is not robust here: its trajectory changes with
every predictor-planned generation, and at NFE 4 some trajectories end farther from the teacher than
the best baseline (+0.001 and +0.003 in two runs), others closer. With the FID as objective the
hybrid's NFE-4 winner beat the best baseline's exact FID significantly but was farther from the
teacher: on the mixture the two disagree, and the claim checked here needs both."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from solversearch.search.experiment import load_experiment
from solversearch.search.report import BEST_BASELINE, SEARCHED
from solversearch.search.runner import run_search

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("nfe", [4, 6])
def test_the_hybrid_on_the_exact_mixture_beats_the_best_baseline_on_fresh_noise(nfe, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    base = load_experiment(REPO / "experiments" / "gmm_digits.yaml")
    experiment = replace(
        base.override(nfe=nfe, storage_url=f"sqlite:///{tmp_path / 'gmm.db'}"),
        algorithm="s3_refine",
        algorithm_settings={**base.algorithm_settings, "refine_top": 1},
        metric=replace(base.metric, name="teacher_distance"),
    )
    outcome = run_search(experiment, export_dir=tmp_path)
    report = outcome.report
    searched, baseline = report.row(SEARCHED), report.row(BEST_BASELINE)
    assert outcome.evaluations - outcome.baseline_evaluations == experiment.budget.evaluations
    assert report.validation_seeds == experiment.validation_seeds
    assert not {experiment.metric.seed, experiment.selection_seed} & set(report.validation_seeds)
    assert all(r.n == 2 * experiment.metric.n for r in searched.validation + baseline.validation)
    fid, teacher = report.comparisons["fid"], report.comparisons["teacher_distance"]
    assert fid.mean < 0, (fid.mean_a, fid.mean_b, fid.low, fid.high)
    assert teacher.high < 0, (teacher.mean_a, teacher.mean_b, teacher.low, teacher.high)
    assert report.floor_mean("fid") < searched.mean("fid")  # the exact samples are better still
    assert outcome.exported.exists()
