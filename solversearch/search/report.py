"""The end of a search: pick the winners on fresh noise and re-score them on other fresh noise.

Every candidate of a search was scored on the same noise (seed s), so the minimum over many
candidates partly fits that noise. The `select_top` best searched schedules, and likewise the best
baselines, are therefore re-scored on a selection seed; the best there wins; the winners are then
reported on a third, validation seed. Both use `validation_factor`× the samples of the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import SolversearchError
from ..evaluator import EvaluationResult, EvaluationSettings, Evaluator
from ..models.spec import ModelHandle
from .experiment import Experiment
from .storage import StoredEvaluation, open_existing, storage_url

SELECTION_SEED_OFFSET = 1000


@dataclass(frozen=True)
class ReportRow:
    """One schedule of the final comparison: as stored, on the selection seed, on the validation seed."""

    label: str
    stored: StoredEvaluation
    selection: EvaluationResult | None
    validated: EvaluationResult | None


def is_baseline(evaluation: StoredEvaluation) -> bool:
    """Stage-0 presets are the baselines (their names are "<preset>/<grid>/nfe<N>")."""
    from ..presets import PRESETS

    return evaluation.stage == 0 and evaluation.schedule.name.split("/")[0] in PRESETS


def ranked(history: list[StoredEvaluation], baselines: bool) -> list[StoredEvaluation]:
    """Finished, non-diverged evaluations of one kind, best stored value first."""
    pool = [e for e in history if not e.diverged and math.isfinite(e.values[0]) and is_baseline(e) == baselines]
    return sorted(pool, key=lambda e: e.values[0])


def final_report(experiment: Experiment, model: ModelHandle, history: list[StoredEvaluation], validate: bool) -> list[ReportRow]:
    """Rows: this search's winner, its best pruned schedule (when it evaluated any), each compared
    study's winner, and the best baseline of them all."""
    searched = ranked(history, baselines=False)
    pools: list[tuple[str, list[StoredEvaluation]]] = [
        ("searched", searched),
        ("best pruned", [e for e in searched if any(step.skip for step in e.schedule.steps)]),
    ]
    baselines = ranked(history, baselines=True)
    for name in experiment.compare:
        try:
            other = open_existing(storage_url(experiment.storage_url), name).history()
        except SolversearchError:
            continue  # not run yet: nothing to compare with
        pools.append((f"best of {name}", ranked(other, baselines=False)))
        baselines += ranked(other, baselines=True)
    pools.append(("best baseline", sorted(baselines, key=lambda e: e.values[0])))
    pools = [(label, pool) for label, pool in pools if pool]
    if not validate:
        return [ReportRow(label, pool[0], None, None) for label, pool in pools]

    select = _Scored(Evaluator(model, _settings(experiment, experiment.metric.seed + SELECTION_SEED_OFFSET)))
    check = _Scored(Evaluator(model, _settings(experiment, experiment.validation_seed)))
    metric = experiment.metric.name
    rows = []
    for label, pool in pools:
        scored = [(select(e), e) for e in pool[: experiment.validation_top]]
        selection, winner = min(scored, key=lambda pair: pair[0].metrics().get(metric, math.inf))
        rows.append(ReportRow(label, winner, selection, check(winner)))
    return rows


class _Scored:
    """An evaluator that scores each schedule once: pools overlap (the best pruned schedule may be the
    winner, another study may hold the same schedule), and one seed gives one number."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.results: dict[str, EvaluationResult] = {}

    def __call__(self, evaluation: StoredEvaluation) -> EvaluationResult:
        if evaluation.key not in self.results:
            self.results[evaluation.key] = self.evaluator.evaluate(evaluation.schedule)
        return self.results[evaluation.key]


def _settings(experiment: Experiment, seed: int) -> EvaluationSettings:
    from .runner import evaluation_settings

    return replace(
        evaluation_settings(experiment),
        seed=seed,
        n=experiment.metric.n * experiment.validation_factor,
        error_to_reference=False,
    )
