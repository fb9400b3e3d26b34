"""The final report: which stored evaluations stand for the search, its pruning and the baselines, and
the paired comparison of the winner with the best baseline on fresh seeds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from solversearch import DiscreteVP, presets
from solversearch.search import TrialRecord, report
from solversearch.search.experiment import load_experiment
from solversearch.search.report import final_report

REPO = Path(__file__).resolve().parents[1]
NOISE = DiscreteVP.from_diffusers_config({})


def stored(number: int, fid: float, schedule, stage: int = 1) -> TrialRecord:
    return TrialRecord(
        number=number,
        schedule=schedule,
        key=str(number),
        values=(fid,),
        metrics={"fid": fid},
        diverged=False,
        stage=stage,
        algorithm="autodiffusion",
        cost={"nfe": schedule.nfe},
        n=500,
        seed=0,
    )


def test_a_search_that_pruned_reports_its_best_pruned_schedule_beside_its_winner(tmp_path):
    experiment = replace(load_experiment(REPO / "experiments" / "digits_autodiffusion.yaml"), compare=())
    unpruned = replace(presets.build("dpmpp_2m", NOISE, 5, "time_quadratic"), name="")
    base = replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name="")
    pruned = replace(base, steps=(replace(base.steps[0], skip=("mid_block.resnets.0",)), *base.steps[1:]))
    baseline = presets.build("ddim", NOISE, 5, "logsnr")  # named "ddim/logsnr/nfe5" by build
    history = [
        stored(0, 0.9, baseline, stage=0),
        stored(1, 0.5, unpruned),
        stored(2, 0.6, pruned),
        stored(3, float("inf"), pruned),
    ]
    rows = {row.label: row.stored.number for row in final_report(experiment, None, history, validate=False).rows}
    assert rows == {"searched": 1, "best pruned": 2, "best baseline": 0}


def test_a_search_without_pruning_has_no_pruned_row():
    experiment = replace(load_experiment(REPO / "experiments" / "digits.yaml"), compare=())
    history = [stored(1, 0.5, replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name=""))]
    assert [row.label for row in final_report(experiment, None, history, validate=False).rows] == ["searched"]


class FakeEvaluator:
    """Scores from a table instead of samples: metric value = table[schedule name] + per-seed noise that is
    the same for every schedule (common random numbers), large against the differences."""

    calls: ClassVar[list[tuple[int, str]]] = []
    table: ClassVar[dict[str, float]] = {}

    def __init__(self, model, settings):
        self.seed = settings.seed

    def prepare(self, on_progress=None):
        return None

    def reference(self):
        return SimpleNamespace(description="test data")

    def _result(self, value: float):
        metrics = {"fid": value, "kid": value / 10, "teacher_distance": 2 * value, "error_to_reference": 0.1}
        return SimpleNamespace(metrics=lambda: metrics, nfe=5, samples_per_second=1.0, to_dict=lambda: metrics)

    def evaluate(self, schedule):
        FakeEvaluator.calls.append((self.seed, schedule.decisions_key()))
        return self._result(self.table[schedule.name] + self.noise())

    def floor(self):
        return self._result(self.noise())

    def noise(self) -> float:
        return 10.0 * self.seed + 0.01 * (self.seed % 2)


def test_a_schedule_in_several_rows_is_scored_once_per_seed(monkeypatch):
    """The best pruned schedule is also the winner here: it must not be re-sampled for the second row."""
    monkeypatch.setattr(report, "Evaluator", FakeEvaluator)
    FakeEvaluator.calls = []
    experiment = replace(load_experiment(REPO / "experiments" / "digits_autodiffusion.yaml"), compare=())
    base = replace(presets.build("dpmpp_2m", NOISE, 5, "logsnr"), name="searched")
    pruned = replace(base, steps=(replace(base.steps[0], skip=("mid_block.resnets.0",)), *base.steps[1:]))
    FakeEvaluator.table = {"searched": 0.5, "ddim/logsnr/nfe5": 0.9}
    history = [stored(0, 0.9, presets.build("ddim", NOISE, 5, "logsnr"), stage=0), stored(1, 0.5, pruned)]
    result = final_report(experiment, None, history, validate=True)
    assert [row.label for row in result.rows] == ["searched", "best pruned", "best baseline"]
    assert result.rows[0].stored.number == result.rows[1].stored.number == 1
    seeds = len(experiment.validation_seeds)
    assert len(FakeEvaluator.calls) == len(set(FakeEvaluator.calls)) == 2 * (1 + seeds)  # (selection + seeds) × 2


def test_the_winner_is_compared_with_the_best_baseline_paired_over_the_validation_seeds(monkeypatch):
    """Per-seed noise (10 × seed) dwarfs the difference (0.2) but is shared: the paired difference is exactly
    −0.2 on every seed, significant; the pixel distance is equal on every seed: no significant difference."""
    monkeypatch.setattr(report, "Evaluator", FakeEvaluator)
    FakeEvaluator.calls = []
    experiment = replace(load_experiment(REPO / "experiments" / "digits.yaml"), compare=())
    searched = replace(presets.build("dpmpp_2m", NOISE, 5, "time_quadratic"), name="searched")
    FakeEvaluator.table = {"searched": 0.3, "ddim/logsnr/nfe5": 0.5, "unipc_2_bh2/logsnr/nfe5": 0.7}
    history = [
        stored(0, 0.5, presets.build("ddim", NOISE, 5, "logsnr"), stage=0),
        stored(1, 0.4, presets.build("unipc_2_bh2", NOISE, 5, "logsnr"), stage=0),
        stored(2, 0.3, searched),
    ]
    result = final_report(experiment, None, history, validate=True)
    assert result.row("best baseline").stored.number == 0  # picked on the selection seed, not the search's
    fid = result.comparisons["fid"]
    assert fid.mean == pytest.approx(-0.2) and fid.verdict == "better"
    assert result.comparisons["error_to_reference"].verdict == "no significant difference"
    seeds = experiment.validation_seeds
    assert result.floor_mean("fid") == pytest.approx(sum(10.0 * s + 0.01 * (s % 2) for s in seeds) / len(seeds))
    assert result.excess_left("fid") == pytest.approx(0.3 / 0.5)
    record = result.comparison_record()
    assert record["against"] == "ddim/logsnr/nfe5" and record["validation_seeds"] == list(experiment.validation_seeds)
    assert record["metrics"]["fid"]["verdict"] == "better" and record["metrics"]["fid"]["excess_left"] == pytest.approx(
        0.6
    )


class CountingDenoiser:
    """The model's denoiser, counting the samples it denoises: a solve of k steps on n samples counts k·n."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, t, *args, **kwargs):
        self.calls += x.shape[0]
        return self.denoiser(x, t, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.denoiser, name)


def gmm_report_case():
    """The exact mixture, 100 samples per report seed, two validation seeds; two baselines and two searched schedules."""
    from solversearch.models.spec import load_model

    base = load_experiment(REPO / "experiments" / "gmm_digits.yaml")
    experiment = replace(
        base,
        metric=replace(base.metric, name="teacher_distance", n=50, batch_size=100),
        validation_count=2,
        validation_top=2,
        compare=(),
    )
    model = load_model("gmm:digits")
    noise = model.noise_schedule
    history = [
        stored(0, 0.5, presets.build("ddim", noise, 5, "logsnr"), stage=0),
        stored(1, 0.4, presets.build("dpmpp_2m", noise, 5, "logsnr"), stage=0),
        stored(2, 0.3, replace(presets.build("unipc_2_bh2", noise, 5, "time_quadratic"), name="")),
        stored(3, 0.35, replace(presets.build("dpmpp_3m", noise, 5, "logsnr"), name="")),
    ]
    return experiment, model, history


def report_values(result) -> list:
    """Every number of a report: per row the selection and validation metrics, and the floor's."""
    rows = [(r.label, r.stored.number, r.selection.metrics(), [v.metrics() for v in r.validation]) for r in result.rows]
    return [rows, [f.metrics() for f in result.floor], result.reference]


def test_each_seed_s_teacher_is_solved_once_and_a_rerun_reads_it_from_the_cache(tmp_path, monkeypatch):
    """Counted on the denoiser: one teacher solve per seed (selection + 2 validation seeds) and each schedule
    once per seed, nothing else; a second report solves no teacher and gives the same numbers."""
    from solversearch.evaluator import TEACHER_STEPS, teacher_schedule
    from solversearch.metrics.reference import ArrayCache

    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(tmp_path))
    experiment, model, history = gmm_report_case()
    counting = CountingDenoiser(model.denoiser)
    model = replace(model, denoiser=counting)
    first = final_report(experiment, model, history, validate=True)
    n, seeds = experiment.metric.n * experiment.validation_factor, len(experiment.validation_seeds)
    teacher_nfe = teacher_schedule(model.noise_schedule, TEACHER_STEPS).nfe
    selection = 4 * 5  # all four candidates (the top 2 of each kind), NFE 5 each
    validation = seeds * 2 * 5  # the searched winner and the best baseline on each validation seed
    assert counting.calls == n * ((1 + seeds) * teacher_nfe + selection + validation)
    assert sorted(b["kind"] for b in ArrayCache(tmp_path).builds()) == ["teacher"] * (1 + seeds)

    counting.calls = 0
    second = final_report(experiment, model, history, validate=True)
    assert counting.calls == n * (selection + validation)  # the teachers come from the cache
    assert len(ArrayCache(tmp_path).builds()) == 1 + seeds
    assert report_values(second) == report_values(first)
