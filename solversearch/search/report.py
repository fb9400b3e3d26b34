"""The end of a search: pick the winners on fresh noise, then compare them on other fresh noise, paired.

Every candidate of a search was scored on the same noise (the search seed), so the minimum over many
candidates partly fits that noise. The `select_top` best searched schedules, and likewise the best of
the baseline pool, are therefore re-scored on a selection seed; the best there wins. The winners and
the teacher (the converged solution: the floor) are then scored on K validation seeds that neither
saw, and the searched winner is compared with the best baseline per seed: the mean of the paired
differences, its 95 % confidence interval and a verdict, for every metric — not only the objective.
Each report seed costs one teacher solve at the report's n, the bulk of the report: `RayScoring` builds
them all at once on the search's workers, `LocalScoring` one after the other in this process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from ..errors import SolversearchError
from ..evaluator import EvaluationResult, EvaluationSettings, Evaluator
from ..metrics.reference import ArrayCache
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
    parallel: bool = False,
) -> Report:
    """Rows: this search's winner, its best pruned schedule (when it evaluated any), each compared
    study's winner, and the best baseline of them all; with `validate`, scored as described above, in
    this process or (`parallel`) as Ray tasks on the initialised Ray's workers."""
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
    scoring = (RayScoring if parallel else LocalScoring)(model, experiment, progress)
    metric = experiment.metric.name
    candidates = [(label, pool[: experiment.validation_top]) for label, pool in pools]
    on_selection_seed = scoring.select(unique(e for _, pool in candidates for e in pool))
    chosen = []
    for label, pool in candidates:
        selection, winner = selected(((on_selection_seed[e.key], e) for e in pool), metric, lambda e: e.key)
        chosen.append((label, winner, selection))
    per_seed = scoring.validate(unique(winner for _, winner, _ in chosen))
    rows = tuple(
        ReportRow(label, winner, selection, tuple(results[winner.key] for results, _ in per_seed))
        for label, winner, selection in chosen
    )
    report = Report(
        rows,
        tuple(floor for _, floor in per_seed),
        selection_seed=experiment.selection_seed,
        validation_seeds=tuple(experiment.validation_seeds),
        n=experiment.metric.n * experiment.validation_factor,
        reference=scoring.reference_description(),
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


def unique(evaluations: Iterable[TrialRecord]) -> list[TrialRecord]:
    """Each schedule once, first occurrence first: pools overlap (the best pruned schedule may be the
    winner, another study may hold the same schedule), and one seed gives one number."""
    first: dict[str, TrialRecord] = {}
    for evaluation in evaluations:
        first.setdefault(evaluation.key, evaluation)
    return list(first.values())


class LocalScoring:
    """The report's evaluations in this process, one seed after the other: one evaluator per seed, whose
    teacher (built once, or read from the disk cache) serves every schedule scored on that seed and its floor."""

    def __init__(self, model: ModelHandle, experiment: Experiment, progress: Progress):
        self.model, self.experiment, self.progress = model, experiment, progress
        self._selection: Evaluator | None = None

    def select(self, evaluations: Sequence[TrialRecord]) -> dict[str, EvaluationResult]:
        """Every candidate on the selection seed, by key."""
        seed = self.experiment.selection_seed
        self._selection = _evaluator(self.model, self.experiment, seed, self.progress, "selection")
        results = {}
        self.progress("selection", 0, len(evaluations))
        for done, evaluation in enumerate(evaluations, start=1):
            results[evaluation.key] = self._selection.evaluate(evaluation.schedule)
            self.progress("selection", done, len(evaluations))
        return results

    def validate(self, winners: Sequence[TrialRecord]) -> list[tuple[dict[str, EvaluationResult], EvaluationResult]]:
        """Per validation seed: the winners' results by key, and the floor (the seed's teacher scored)."""
        seeds = self.experiment.validation_seeds
        out = []
        self.progress("validation", 0, len(seeds))
        for done, seed in enumerate(seeds, start=1):
            check = _evaluator(self.model, self.experiment, seed, self.progress, f"validation seed {seed}")
            out.append(({e.key: check.evaluate(e.schedule) for e in winners}, check.floor()))
            self.progress("validation", done, len(seeds))
        return out

    def reference_description(self) -> str:
        assert self._selection is not None, "select() first"
        return self._selection.reference().description


class RayScoring:
    """The report's evaluations as Ray tasks, each with the resources of one search trial: every seed's
    teacher is one task, all submitted at once, and each schedule on a seed (and its floor) one task that
    reads that teacher from Ray's object store. The selection's scores run while the validation seeds'
    teachers are built; the reference statistics are the driver's, built or read once."""

    def __init__(self, model: ModelHandle, experiment: Experiment, progress: Progress):
        import ray

        self.experiment, self.progress = experiment, progress
        driver = Evaluator(model, validation_settings(experiment, experiment.selection_seed))
        self.reference = driver.reference()
        self.cache_dir = str(driver.cache.directory)  # the workers' teachers go where the driver's would
        resources = experiment.resources
        self.task = ray.remote(_worker_task).options(
            num_cpus=resources.cpu, num_gpus=resources.gpu, resources=dict(resources.custom)
        )
        reference = ray.put(self.reference)
        seeds = (experiment.selection_seed, *experiment.validation_seeds)
        self.prepared = {seed: self._submit("prepare", seed, reference) for seed in seeds}
        self.floors = [self._submit("floor", seed, self.prepared[seed]) for seed in experiment.validation_seeds]

    def select(self, evaluations: Sequence[TrialRecord]) -> dict[str, EvaluationResult]:
        seed = self.experiment.selection_seed
        pending = [self._submit("evaluate", seed, self.prepared[seed], e.schedule.to_dict()) for e in evaluations]
        teachers = list(self.prepared.values())  # counted too: they run first, before the selection's scores
        results = self._gather("the report seeds' teachers and the selection", teachers + pending)[len(teachers) :]
        return {e.key: result for e, result in zip(evaluations, results)}

    def validate(self, winners: Sequence[TrialRecord]) -> list[tuple[dict[str, EvaluationResult], EvaluationResult]]:
        seeds = self.experiment.validation_seeds
        pending = [
            self._submit("evaluate", seed, self.prepared[seed], e.schedule.to_dict()) for seed in seeds for e in winners
        ]
        results = self._gather("validation", pending + self.floors)
        per_seed = [results[i * len(winners) : (i + 1) * len(winners)] for i in range(len(seeds))]
        floors = results[len(pending) :]
        return [({e.key: r for e, r in zip(winners, scored)}, floor) for scored, floor in zip(per_seed, floors)]

    def reference_description(self) -> str:
        return self.reference.description

    def _submit(self, kind: str, seed: int, *arguments):
        threads = max(1, int(self.experiment.resources.cpu))
        settings = validation_settings(self.experiment, seed)
        return self.task.remote(kind, self.experiment.model, settings, threads, self.cache_dir, *arguments)

    def _gather(self, what: str, pending: list) -> list:
        """The tasks' results in order, with progress as they finish."""
        import ray

        waiting, done = list(pending), 0
        self.progress(what, 0, len(pending))
        while waiting:
            finished, waiting = ray.wait(waiting, num_returns=1, timeout=1.0)  # back in Python for a signal
            if finished:
                done += len(finished)
                self.progress(what, done, len(pending))
        try:
            return ray.get(pending)
        except ray.exceptions.RayTaskError as error:  # a user's error on a worker stays a one-line message
            if isinstance(error.cause, SolversearchError):
                raise error.cause from None
            raise


# A report worker's models (one per spec and device) and its latest evaluator, kept for the process's next
# task: tasks come grouped by seed, so the next one mostly reuses the seed's teacher and its features. Only
# the latest: a seed's teacher features at validation n may be large (Inception layers).
_WORKER_MODELS: dict[tuple[str, str], ModelHandle] = {}
_WORKER_EVALUATOR: dict[tuple[str, EvaluationSettings], Evaluator] = {}


def _worker_task(kind: str, spec: str, settings: EvaluationSettings, threads: int, cache_dir: str, *arguments):
    """One report task on a Ray worker: "prepare" (reference) → Prepared with the seed's teacher; "floor"
    (prepared) → the teacher scored; "evaluate" (prepared, schedule dict) → the schedule's result."""
    import ray
    import torch

    from ..models.spec import load_model
    from ..schedule import SolverSchedule

    torch.set_num_threads(threads)
    if ray.get_gpu_ids():
        settings = replace(settings, device="cuda")
    if (spec, settings.device) not in _WORKER_MODELS:
        _WORKER_MODELS[spec, settings.device] = load_model(spec, settings.device)
    model = _WORKER_MODELS[spec, settings.device]
    if (spec, settings) not in _WORKER_EVALUATOR:
        given = {"reference": arguments[0]} if kind == "prepare" else {"prepared": arguments[0]}
        _WORKER_EVALUATOR.clear()
        _WORKER_EVALUATOR[spec, settings] = Evaluator(model, settings, ArrayCache(Path(cache_dir)), **given)
    evaluator = _WORKER_EVALUATOR[spec, settings]
    if kind == "prepare":
        return evaluator.prepare()
    if kind == "floor":
        return evaluator.floor()
    return evaluator.evaluate(SolverSchedule.from_dict(arguments[1]))


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
