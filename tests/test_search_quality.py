"""The search beats the hand-designed solvers where the truth is known: on the exact digits mixture the
FID is computed against the mixture's own moments, so no proxy can be gamed. The winner and the best of
the whole baseline pool are re-scored on five validation seeds the search never saw (twice the samples).
The searched schedule must have the lower mean exact FID and be significantly closer to the converged
solution: a paired 95 % interval below zero on the teacher distance. (Five seeds are too few for
the FID interval itself to exclude zero at these margins: its seed-to-seed spread is about 0.01.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from solversearch.search.experiment import load_experiment
from solversearch.search.report import BEST_BASELINE, SEARCHED
from solversearch.search.runner import run_search

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("nfe", [4, 6])
def test_s3_on_the_exact_mixture_beats_the_best_baseline_on_fresh_noise(nfe, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    experiment = load_experiment(REPO / "experiments" / "gmm_digits.yaml").override(
        nfe=nfe, storage_url=f"sqlite:///{tmp_path / 'gmm.db'}"
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
