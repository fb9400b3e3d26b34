"""The final report's rows: which stored evaluations stand for the search, its pruning, and the baselines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from solversearch import DiscreteVP, presets
from solversearch.search.experiment import load_experiment
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
