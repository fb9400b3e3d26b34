"""The search beats the hand-designed solvers where the truth is known: on the exact digits mixture,
FID is computed against the mixture's own moments, and the winner is re-scored on fresh noise (another
seed, twice the samples) next to the best preset baseline, scored the same way."""

from __future__ import annotations

from pathlib import Path

import pytest

from solversearch.search.experiment import load_experiment
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
    rows = {row.label: row for row in outcome.report}
    searched, baseline = rows["searched"], rows["best baseline"]
    assert outcome.evaluations == experiment.budget.evaluations
    assert searched.validated.n == 2 * experiment.metric.n and searched.validated.seed != experiment.metric.seed
    assert searched.validated.fid < baseline.validated.fid, (searched.validated.fid, baseline.validated.fid)
    assert outcome.exported.exists()
