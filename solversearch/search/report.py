"""The end of a search: pick the winners on fresh noise, then compare them on other fresh noise, paired.

Every candidate of a search was scored on the same noise (the search seed), so the minimum over many
candidates partly fits that noise. The `select_top` best searched schedules, and likewise the best of
the baseline pool, are therefore re-scored on a selection seed; the best there wins. The winners and
the teacher (the converged solution: the floor) are then scored on K validation seeds that neither
saw, and the searched winner is compared with the best baseline per seed: the mean of the paired
differences, its 95 % confidence interval and a verdict, for every metric — not only the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from ..errors import SolversearchError
from ..evaluator import EvaluationResult, EvaluationSettings, Evaluator
from ..models.spec import ModelHandle
from ..presets import PRESETS
from ..statistics import PairedDifference, excess_ratio, paired_difference
from .baseline_pool import ALGORITHM as BASELINE_POOL
from .database import storage_url
from .experiment import Experiment, evaluation_settings
from .record import TrialRecord
from .storage import open_existing

# Every view of quality the report shows side by side, whatever the search optimised.
REPORT_METRICS = ("fid", "kid", "teacher_distance", "error_to_reference")
SEARCHED, BEST_BASELINE = "searched", "best baseline"
T = TypeVar("T")

# (what, done, total): progress of the selection and validation evaluations
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReportRow:
    """One schedule of the final comparison: as stored, on the selection seed, on each validation seed."""

    label: str
    stored: TrialRecord
    selection: EvaluationResult | None
    validation: tuple[EvaluationResult, ...] = ()

    def values(self, metric: str) -> list[float]:
        return [r.metrics().get(metric, math.nan) for r in self.validation]

    def mean(self, metric: str) -> float:
        values = self.values(metric)
        return sum(values) / len(values) if values else math.nan


@dataclass(frozen=True)
class Report:
    """The rows, the floor on the same validation seeds, and the paired comparison of the searched
    winner with the best baseline (empty without validation)."""

    rows: tuple[ReportRow, ...]
    floor: tuple[EvaluationResult, ...] = ()
    comparisons: dict[str, PairedDifference] = field(default_factory=dict)
    selection_seed: int | None = None
    validation_seeds: tuple[int, ...] = ()
    n: int | None = None
    reference: str = ""

    def row(self, label: str) -> ReportRow | None:
        return next((r for r in self.rows if r.label == label), None)

    def floor_mean(self, metric: str) -> float:
        values = [r.metrics().get(metric, math.nan) for r in self.floor]
        return sum(values) / len(values) if values else math.nan

    def excess_left(self, metric: str) -> float:
        """(searched − floor) / (best baseline − floor) on the validation means."""
        searched, baseline = self.row(SEARCHED), self.row(BEST_BASELINE)
        if searched is None or baseline is None:
            return math.nan
        return excess_ratio(searched.mean(metric), baseline.mean(metric), self.floor_mean(metric))

    def comparison_record(self) -> dict:
        """What the export writes into the winner's provenance."""
        baseline = self.row(BEST_BASELINE)
        return {
            "against": baseline.stored.schedule.name if baseline else None,
            "validation_seeds": list(self.validation_seeds),
            "n": self.n,
            "reference": self.reference,
            "metrics": {
                metric: {
                    **difference.to_dict(),
                    "floor": _plain(self.floor_mean(metric)),
                    "excess_left": _plain(self.excess_left(metric)),
                }
                for metric, difference in self.comparisons.items()
            },
        }


def is_baseline(evaluation: TrialRecord) -> bool:
    """The baseline pool's evaluations; in studies from before the pool, the stage-0 presets
    (named "<preset>/<grid>/nfe<N>")."""
    if evaluation.algorithm == BASELINE_POOL:
        return True
    return evaluation.stage == 0 and evaluation.schedule.name.split("/")[0] in PRESETS


def ranked(history: list[TrialRecord], baselines: bool) -> list[TrialRecord]:
    """Finished, non-diverged evaluations of one kind, best stored value first (ties by key)."""
    pool = [e for e in history if not e.diverged and math.isfinite(e.values[0]) and is_baseline(e) == baselines]
    return sorted(pool, key=lambda e: (e.values[0], e.key))


def final_report(
    experiment: Experiment,
    model: ModelHandle,
    history: list[TrialRecord],
    validate: bool,
    on_progress: Progress | None = None,
) -> Report:
    """Rows: this search's winner, its best pruned schedule (when it evaluated any), each compared
    study's winner, and the best baseline of them all; with `validate`, scored as described above."""
    searched = ranked(history, baselines=False)
    pools: list[tuple[str, list[TrialRecord]]] = [
        (SEARCHED, searched),
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
    pools.append((BEST_BASELINE, sorted(baselines, key=lambda e: (e.values[0], e.key))))
    pools = [(label, pool) for label, pool in pools if pool]
    if not validate:
        return Report(tuple(ReportRow(label, pool[0], None) for label, pool in pools))

    progress = on_progress or (lambda what, done, total: None)
    metric = experiment.metric.name
    selection_seed = experiment.selection_seed
    select = _Scored(_evaluator(model, experiment, selection_seed, progress, "selection"))
    candidates = [(label, pool[: experiment.validation_top]) for label, pool in pools]
    total, done = sum(len(pool) for _, pool in candidates), 0
    progress("selection", 0, total)
    chosen = []
    for label, pool in candidates:
        scored = []
        for evaluation in pool:
            scored.append((select(evaluation), evaluation))
            done += 1
            progress("selection", done, total)
        selection, winner = selected(scored, metric, lambda evaluation: evaluation.key)
        chosen.append((label, winner, selection))

    seeds = experiment.validation_seeds
    validation: dict[str, list[EvaluationResult]] = {label: [] for label, _, _ in chosen}
    floor = []
    progress("validation", 0, len(seeds))
    for i, seed in enumerate(seeds):
        check = _Scored(_evaluator(model, experiment, seed, progress, f"validation seed {seed}"))
        for label, winner, _ in chosen:
            validation[label].append(check(winner))
        floor.append(check.evaluator.floor())
        progress("validation", i + 1, len(seeds))
    rows = tuple(ReportRow(label, winner, selection, tuple(validation[label])) for label, winner, selection in chosen)
    report = Report(
        rows,
        tuple(floor),
        selection_seed=selection_seed,
        validation_seeds=tuple(seeds),
        n=experiment.metric.n * experiment.validation_factor,
        reference=select.evaluator.reference().description,
    )
    searched_row, baseline_row = report.row(SEARCHED), report.row(BEST_BASELINE)
    if searched_row is not None and baseline_row is not None:
        report = replace(report, comparisons=paired_comparisons(searched_row.validation, baseline_row.validation))
    return report


def selected(
    scored: Iterable[tuple[EvaluationResult, T]], metric: str, tie: Callable[[T], str]
) -> tuple[EvaluationResult, T]:
    """The candidate with the lowest `metric` on the selection seed: (its result, the candidate). A
    diverged (infinite) or unmeasured value counts as infinite; equal values go to the lowest `tie(candidate)`."""

    def order(pair: tuple[EvaluationResult, T]) -> tuple[float, str]:
        value = pair[0].metrics().get(metric, math.inf)
        return (math.inf if math.isnan(value) else value), tie(pair[1])

    return min(scored, key=order)


def paired_comparisons(
    a: Sequence[EvaluationResult], b: Sequence[EvaluationResult], metrics: Sequence[str] = REPORT_METRICS
) -> dict[str, PairedDifference]:
    """A − B per metric over the same seeds (a[i] and b[i] from the same x_T), for every metric both
    sides measured (an infinite, diverged value counts; a missing or NaN one, e.g. KID without
    reference features, leaves the metric out)."""
    comparisons = {}
    for metric in metrics:
        a_values = [r.metrics().get(metric, math.nan) for r in a]
        b_values = [r.metrics().get(metric, math.nan) for r in b]
        if a_values and not any(math.isnan(v) for v in a_values + b_values):
            comparisons[metric] = paired_difference(a_values, b_values)
    return comparisons


class _Scored:
    """An evaluator that scores each schedule once: pools overlap (the best pruned schedule may be the
    winner, another study may hold the same schedule), and one seed gives one number."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.results: dict[str, EvaluationResult] = {}

    def __call__(self, evaluation: TrialRecord) -> EvaluationResult:
        if evaluation.key not in self.results:
            self.results[evaluation.key] = self.evaluator.evaluate(evaluation.schedule)
        return self.results[evaluation.key]


def _evaluator(model: ModelHandle, experiment: Experiment, seed: int, progress: Progress, what: str) -> Evaluator:
    """A fresh-noise evaluator with `validation_factor`× the search's samples, its reference and teacher
    built (with progress) before the first schedule is scored."""
    evaluator = Evaluator(model, validation_settings(experiment, seed))
    evaluator.prepare(lambda built, done, total: progress(f"{what}: {built}", done, total))
    return evaluator


def validation_settings(experiment: Experiment, seed: int) -> EvaluationSettings:
    return replace(
        evaluation_settings(experiment),
        seed=seed,
        n=experiment.metric.n * experiment.validation_factor,
        error_to_reference=True,
    )


def _plain(value: float) -> float | None:
    return value if math.isfinite(value) else None
