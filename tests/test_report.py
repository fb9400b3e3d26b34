"""The final report's rows: which stored evaluations stand for the search, its pruning, and the baselines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from solversearch import DiscreteVP, presets
from solversearch.search.experiment import load_experiment
from solversearch.search import report
from solversearch.search.report import final_report
from solversearch.search.storage import StoredEvaluation

REPO = Path(__file__).resolve().parents[1]
NOISE = DiscreteVP.from_diffusers_config({})


def stored(number: int, fid: float, schedule, stage: int = 1) -> StoredEvaluation:
    return StoredEvaluation(number=number, schedule=schedule, key=str(number), values=(fid,), metrics={"fid": fid},
                            diverged=False, stage=stage, algorithm="autodiffusion", cost={"nfe": schedule.nfe},
                            n=500, seed=0)


def test_a_search_that_pruned_reports_its_best_pruned_schedule_beside_its_winner(tmp_path):
    experiment = replace(load_experiment(REPO / "experiments" / "digits_autodiffusion.yaml"), compare=())
    unpruned = replace(presets.build("dpmpp_2m", NOISE, 5, "time_quadratic"), name="")
    base = replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name="")
    pruned = replace(base, steps=(replace(base.steps[0], skip=("mid_block.resnets.0",)), *base.steps[1:]))
    baseline = presets.build("ddim", NOISE, 5, "logsnr")  # named "ddim/logsnr/nfe5" by build
    history = [stored(0, 0.9, baseline, stage=0), stored(1, 0.5, unpruned), stored(2, 0.6, pruned),
               stored(3, float("inf"), pruned)]
    rows = {row.label: row.stored.number for row in final_report(experiment, None, history, validate=False)}
    assert rows == {"searched": 1, "best pruned": 2, "best baseline": 0}


def test_a_search_without_pruning_has_no_pruned_row():
    experiment = replace(load_experiment(REPO / "experiments" / "digits.yaml"), compare=())
    history = [stored(1, 0.5, replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name=""))]
    assert [row.label for row in final_report(experiment, None, history, validate=False)] == ["searched"]


def test_a_schedule_in_several_rows_is_scored_once_per_seed(monkeypatch):
    """The best pruned schedule is also the winner here: it must not be re-sampled for the second row."""
    evaluated: list[tuple[int, str]] = []

    class CountingEvaluator:
        def __init__(self, model, settings):
            self.seed = settings.seed

        def evaluate(self, schedule):
            evaluated.append((self.seed, schedule.decisions_key()))
            return SimpleNamespace(metrics=lambda: {"fid": 1.0})

    monkeypatch.setattr(report, "Evaluator", CountingEvaluator)
    experiment = replace(load_experiment(REPO / "experiments" / "digits_autodiffusion.yaml"), compare=())
    base = replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name="")
    pruned = replace(base, steps=(replace(base.steps[0], skip=("mid_block.resnets.0",)), *base.steps[1:]))
    history = [stored(0, 0.9, presets.build("ddim", NOISE, 5, "logsnr"), stage=0), stored(1, 0.5, pruned)]
    rows = final_report(experiment, None, history, validate=True)
    assert [row.label for row in rows] == ["searched", "best pruned", "best baseline"]
    assert rows[0].stored.number == rows[1].stored.number == 1
    assert len(evaluated) == len(set(evaluated)) == 4  # two schedules × (selection, validation)
