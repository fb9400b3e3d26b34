"""Run an experiment as a Ray Tune experiment whose trials are persisted in an Optuna study.

The driver builds the reference statistics and the teacher once (workers only read them), evaluates
the baseline pool, rebuilds the searcher from the study (so running the same command again resumes:
every stored evaluation is kept, none is repeated) and lets Ray Tune run the remaining budget on
workers; each finished trial is recorded from the driver as one complete Optuna trial the moment it
finishes. At the end the winner and the best baseline are compared on fresh seeds (`report.py`) and
the winner is written as `<study>.json` with that comparison in its provenance.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..errors import SearchInterrupted, SolversearchError
from ..evaluator import METRIC_NAMES, Evaluator, Prepared
from ..models.spec import ModelHandle, load_model
from ..refine import RefineSettings, prepare_teachers
from .base import Observation, Proposal, ScheduleSearcher, drive
from .baseline_pool import ALGORITHM as BASELINE_POOL
from .baseline_pool import BaselinePool
from .batching import MEMBER, BatchingSearcher, member_config
from .database import backend_of, redact_url, storage_url
from .encoding import ScheduleEncoding
from .experiment import Experiment, evaluation_settings
from .interruption import StopRequest, stop_on_signals, tuning
from .operators import LambdaOperators
from .provenance import exported_schedule
from .record import TrialRecord
from .registry import REFINING, make_searcher
from .report import BEST_BASELINE, SEARCHED, Report, final_report
from .storage import StudyStore
from .trainable import EvaluationContext, evaluate_trial, trial_result


@dataclass(frozen=True)
class SearchOutcome:
    study: str
    evaluations: int  # in the study: the baseline pool and the searched schedules
    baseline_evaluations: int
    new_evaluations: int
    best: TrialRecord | None
    best_baseline: TrialRecord | None
    report: Report
    exported: Path | None
    seconds: float
    search_seconds: float = 0.0  # this run's preparation, baseline pool and search (the study's wall_seconds)
    report_seconds: float = 0.0  # this run's selection and validation (the study's report_seconds)


def objectives(experiment: Experiment) -> tuple[str, ...]:
    return experiment.objectives or (experiment.metric.name,)


def study_description(experiment: Experiment, model: ModelHandle) -> dict[str, Any]:
    """What makes two runs the same search (checked when a study is resumed)."""
    return {
        "experiment": experiment.name,
        "model": experiment.model,
        "model_fingerprint": model.fingerprint,
        "prediction_type": model.denoiser.prediction_type,
        "metric": {
            "name": experiment.metric.name,
            "n": experiment.metric.n,
            "seed": experiment.metric.seed,
            "features": experiment.metric.features or model.default_features,
            # what FID is measured against; only when set, so studies older than this key still resume
            **(
                {"reference": [experiment.metric.reference, experiment.metric.reference_n]}
                if experiment.metric.reference or experiment.metric.reference_n
                else {}
            ),
        },
        "nfe": experiment.nfe,
        "space": experiment.space.describe(),
        "objectives": list(objectives(experiment)),
    }


def open_store(experiment: Experiment, model: ModelHandle) -> StudyStore:
    return StudyStore(
        storage_url(experiment.storage_url),
        experiment.study_name,
        directions=["minimize"] * len(objectives(experiment)),
        description=study_description(experiment, model),
    )


def observations_from(history: list[TrialRecord], metric: str) -> list[Observation]:
    return [Observation.from_record(record, metric) for record in history]


def searcher_for(experiment: Experiment, model: ModelHandle, history: list[TrialRecord]) -> ScheduleSearcher:
    """The experiment's searcher from the registry, rebuilt from the study's `history` (a resumed search).
    Only what the experiment and model hold is gathered here; names and settings are the registry's."""
    metric = list(objectives(experiment)) if len(objectives(experiment)) > 1 else experiment.metric.name
    units, costs = pruning_context(experiment, model)
    settings = dict(experiment.algorithm_settings)
    if experiment.algorithm in REFINING:  # refinement learns in the metric's feature space
        refine = settings.get("refine") or {}
        if not isinstance(refine, dict):
            raise SolversearchError(f"algorithm.settings.refine: expected a mapping, got {refine!r}")
        settings["refine"] = {"features": experiment.metric.features, **refine}
    return make_searcher(
        experiment.algorithm,
        experiment.space,
        experiment.nfe,
        model.noise_schedule,
        settings=settings,
        seed=experiment.algorithm_seed,  # the same seed on resume: the searcher re-plans its generation and skips what is done
        metric=metric,
        history=observations_from(history, experiment.metric.name),
        units=units,
        costs=costs,
    )


def pruning_context(experiment: Experiment, model: ModelHandle):
    """The model's prunable units and their MACs, when the experiment searches skipped blocks."""
    if experiment.space.skip is None and experiment.algorithm != "autodiffusion":
        return (), None
    units = tuple(getattr(model.denoiser, "units", ()))
    if not units:
        raise SolversearchError(
            f"{experiment.model} has no prunable network blocks; the space {experiment.space.name!r} needs them"
        )
    return units, model.denoiser.unit_costs()


class StudyRecorder:
    """Writes each finished trial to the study (one complete Optuna trial) and keeps progress figures."""

    def __init__(
        self,
        store: StudyStore,
        experiment: Experiment,
        model: ModelHandle,
        searcher: ScheduleSearcher,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.store, self.experiment, self.searcher, self.on_update = store, experiment, searcher, on_update
        self.noise = model.noise_schedule
        self.encodings: dict[int, ScheduleEncoding] = {}
        self.recorded = 0
        self.total: int | None = None  # evaluations this phase will run at most (for progress)
        self.started = time.perf_counter()
        self.predictor_before = float(store.get_attr("predictor_seconds", 0.0))
        self.best = min((e.values[0] for e in store.history() if math.isfinite(e.values[0])), default=math.inf)

    def record(self, config: dict[str, Any], report: dict[str, Any]) -> None:
        """Store the trial of `config` (its proposal) that reported `report` (a `TrialRecord.to_report()`)."""
        record = Proposal.from_config(config).record(report, str(config["algorithm"]))
        schedule = record.schedule.with_metadata(
            name=record.schedule.name or f"{self.experiment.study_name}/{record.key}",
            noise_schedule=self.noise.to_dict(),
        )
        encoding = self.encodings.setdefault(
            schedule.nfe, ScheduleEncoding(LambdaOperators(self.experiment.space, schedule.nfe, self.noise))
        )
        params, distributions = encoding.from_schedule(schedule)
        values = [record.value(o) for o in objectives(self.experiment)]
        self.store.record(replace(record, schedule=schedule), values, params=params, distributions=distributions)
        self.recorded += 1
        if math.isfinite(values[0]):
            self.best = min(self.best, values[0])
        taus = getattr(self.searcher, "kendall_taus", {})
        if taus:
            self.store.set_attr("kendall_tau", {str(k): v for k, v in sorted(taus.items())})
        if self.searcher.timings.get("predictor_seconds"):
            self.store.set_attr("predictor_seconds", self.predictor_before + self.searcher.timings["predictor_seconds"])
        if self.on_update is not None:
            self.on_update(
                {
                    "phase": "baselines" if self.searcher.algorithm == BASELINE_POOL else "search",
                    "recorded": self.recorded,
                    "total": self.total,
                    "best": self.best,
                    "stage": self.searcher.stage,
                    "tau": taus,
                    "elapsed": time.perf_counter() - self.started,
                }
            )


def run_search(
    experiment: Experiment,
    *,
    address: str | None = None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
    validate: bool = True,
    export_dir: Path | None = None,
) -> SearchOutcome:
    """Prepare, evaluate the baseline pool, search the remaining budget, report and export.

    `on_update` receives progress dicts: {"phase": "prepare" | "report", "what", "done",
    "total"} while references, teachers and the final comparison are built, and {"phase": "baselines" |
    "search", "recorded", "total", "best", "stage", "tau", "elapsed"} after every recorded trial.

    SIGINT or SIGTERM (in the main thread) ends it with `SearchInterrupted`: what was recorded is kept,
    nothing is reported or exported (search/interruption.py)."""
    address = address or experiment.ray_address
    with stop_on_signals() as stop:
        if address is None:
            return _search(experiment, None, on_update, validate, export_dir, stop)
        with ray_connection(address):  # a cluster: refuse a storage its nodes cannot share before anything is built
            check_cluster_storage(storage_url(experiment.storage_url))
            return _search(experiment, address, on_update, validate, export_dir, stop)


def _search(
    experiment: Experiment,
    address: str | None,
    on_update: Callable[[dict[str, Any]], None] | None,
    validate: bool,
    export_dir: Path | None,
    stop: StopRequest,
) -> SearchOutcome:
    started = time.perf_counter()
    notify = on_update or (lambda update: None)
    model = load_model(experiment.model)
    searcher_for(experiment, model, [])  # the algorithm and its settings (a warm start's file) fail before any work
    settings = evaluation_settings(experiment)
    prepared = Evaluator(model, settings).prepare(
        lambda what, done, total: notify({"phase": "prepare", "what": what, "done": done, "total": total})
    )
    if "kid" in objectives(experiment) and prepared.reference.features is None:
        raise SolversearchError(
            f"KID needs reference features, but the reference is {prepared.reference.description}: "
            "optimise fid or teacher_distance, or give metric.reference as images"
        )
    store = open_store(experiment, model)  # after the checks above: a refused run leaves no study behind
    try:
        try:
            new = _evaluate(experiment, address, model, settings, prepared, store, notify, on_update, stop)
        finally:  # finished or interrupted, the time spent searching is the study's
            add_seconds(store, "wall_seconds", time.perf_counter() - started)
        return _report_and_export(experiment, address, model, store, new, validate, export_dir, notify, started)
    except SearchInterrupted as interrupted:
        raise SearchInterrupted(interrupted.signum, kept=len(store.history())) from None


def _evaluate(
    experiment: Experiment,
    address: str | None,
    model: ModelHandle,
    settings,
    prepared: Prepared,
    store: StudyStore,
    notify: Callable[[dict[str, Any]], None],
    on_update: Callable[[dict[str, Any]], None] | None,
    stop: StopRequest,
) -> int:
    """The baseline pool, then the search of the remaining budget; returns the evaluations recorded."""
    new = evaluate_baseline_pool(experiment, model, store, Evaluator(model, settings, prepared=prepared), on_update)
    history = store.history()
    remaining = experiment.budget.evaluations - sum(1 for e in history if e.algorithm != BASELINE_POOL)
    if remaining > 0:
        with ray_connection(address):
            context = EvaluationContext(
                model=experiment.model, settings=settings, threads=max(1, int(experiment.resources.cpu))
            )
            searcher = searcher_for(experiment, model, history)
            if getattr(
                searcher, "refine_settings", None
            ):  # the refinement batches' teachers: built here once, read by the workers
                notify({"phase": "prepare", "what": "refinement teachers", "done": 0, "total": 1})
                prepare_teachers(model, RefineSettings(**searcher.refine_settings))
                notify({"phase": "prepare", "what": "refinement teachers", "done": 1, "total": 1})
            new += _run_tune(
                experiment,
                context,
                prepared,
                StudyRecorder(store, experiment, model, searcher, on_update),
                remaining,
                experiment.budget.wall_time_s,
                stop,
            )
    return new


def _report_and_export(
    experiment: Experiment,
    address: str | None,
    model: ModelHandle,
    store: StudyStore,
    new: int,
    validate: bool,
    export_dir: Path | None,
    notify: Callable[[dict[str, Any]], None],
    started: float,
) -> SearchOutcome:
    history = store.history()
    search_seconds = time.perf_counter() - started
    try:  # the selection and validation run as Ray tasks: the seeds' teachers in parallel, on the trials' resources
        with ray_connection(address) if validate else contextlib.nullcontext():
            report = final_report(
                experiment,
                model,
                history,
                validate,
                lambda what, done, total: notify({"phase": "report", "what": what, "done": done, "total": total}),
                parallel=validate,
            )
    finally:  # like wall_seconds: what the report cost is the study's, finished or interrupted
        report_seconds = time.perf_counter() - started - search_seconds
        add_seconds(store, "report_seconds", report_seconds)
    if validate and report.rows:
        store.set_attr(
            "validation",
            {
                "rows": {
                    r.label: {
                        "trial": r.stored.number,
                        "selection": r.selection.to_dict(),
                        "validation": [v.to_dict() for v in r.validation],
                    }
                    for r in report.rows
                },
                "floor": [f.to_dict() for f in report.floor],
                "comparison": report.comparison_record(),
            },
        )
    exported = None
    best = report.row(SEARCHED)
    if best is not None:
        winner = exported_schedule(
            best.stored,
            experiment.study_name,
            study_description(experiment, model),
            comparison=report.comparison_record() if report.comparisons else None,
            metrics={
                f"validation_{m}": best.mean(m) for m in METRIC_NAMES if best.validation and math.isfinite(best.mean(m))
            },
            storage=redact_url(storage_url(experiment.storage_url)),
            experiment=experiment.name,
            objective=experiment.metric.name,
        )
        folder = export_dir or Path(".")
        folder.mkdir(parents=True, exist_ok=True)  # a search's result is never lost to a missing folder
        exported = winner.save(folder / f"{experiment.study_name}.json")
    baseline = report.row(BEST_BASELINE)
    return SearchOutcome(
        experiment.study_name,
        len(history),
        sum(1 for e in history if e.algorithm == BASELINE_POOL),
        new,
        best.stored if best else None,
        baseline.stored if baseline else None,
        report,
        exported,
        time.perf_counter() - started,
        search_seconds,
        report_seconds,
    )


def add_seconds(store: StudyStore, name: str, seconds: float) -> None:
    """Add to a study's time attribute: a resumed study's cost is the sum over its runs."""
    store.set_attr(name, float(store.get_attr(name, 0.0)) + seconds)


def evaluate_baseline_pool(
    experiment: Experiment,
    model: ModelHandle,
    store: StudyStore,
    evaluator: Evaluator,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Evaluate what the study lacks of the baseline pool, in the driver, one schedule after the other:
    each preset costs one short evaluation, less than a Ray trial's own overhead for small models."""
    pool = BaselinePool(
        experiment.space,
        experiment.nfe,
        model.noise_schedule,
        metric=objectives(experiment)[0],
        history=observations_from(store.history(), experiment.metric.name),
        **experiment.baselines,
    )
    if not pool.queue:
        return 0
    recorder = StudyRecorder(store, experiment, model, pool, on_update)
    recorder.total = pool.size
    drive(pool, lambda schedule: trial_result(evaluator, schedule), pool.size, on_result=recorder.record)
    return recorder.recorded


@contextlib.contextmanager
def ray_connection(address: str | None) -> Iterator[None]:
    """Ray for the search phase: the cluster at `address`, or a private local Ray this command starts
    and shuts down."""
    import ray

    started_here = not ray.is_initialized()
    _connect(address)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def _run_tune(
    experiment: Experiment,
    context: EvaluationContext,
    prepared: Prepared,
    recorder: StudyRecorder,
    num_samples: int,
    time_budget_s: float | None,
    stop: StopRequest,
) -> int:
    """One Tune run of `recorder.searcher`'s proposals; returns the number of trials recorded."""
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    recorder.total = num_samples
    batching = BatchingSearcher(recorder.searcher, experiment.resources.batch, budget=num_samples)
    results_dir = tempfile.mkdtemp(prefix="solversearch-tune-")
    try:
        os.environ.setdefault(
            "RAY_AIR_NEW_OUTPUT", "0"
        )  # the legacy reporter honours verbose=0: our display is the progress
        resources = {
            "cpu": experiment.resources.cpu,
            "gpu": experiment.resources.gpu,
            **dict(experiment.resources.custom),
        }
        # with_parameters puts the prepared reference and teacher in Ray's object store once: every
        # worker, on any node, reads them from there and builds nothing.
        trainable = tune.with_resources(
            tune.with_parameters(evaluate_trial, context=context, prepared=prepared), resources
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(batching, max_concurrent=experiment.resources.concurrent),
                num_samples=batching.trials_needed(),
                time_budget_s=time_budget_s,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=experiment.study_name,
                storage_path=results_dir,
                callbacks=[_Record(recorder)],
                # A trial whose worker dies is not re-run by Tune, which would repeat the members already
                # scored and recorded: the batching searcher hands out its unscored members again.
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=0,
            ),
        )
        with tuning(stop):
            tuner.fit()
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)
    return recorder.recorded


class _Record(Callback):
    """Tune callback: each scored member of a trial goes to the study, from the driver, as it is reported."""

    def __init__(self, recorder: StudyRecorder | None):
        self.recorder = recorder
        self.recorded: set[tuple[str, int]] = set()  # (trial id, member): Tune may deliver a result twice

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record(trial, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.last_result:
            self._record(trial, trial.last_result)

    def _record(self, trial, result) -> None:
        member = member_config(trial.config, result)
        if self.recorder is None or member is None or not TrialRecord.in_report(result):
            return
        if (trial.trial_id, result[MEMBER]) not in self.recorded:
            self.recorded.add((trial.trial_id, result[MEMBER]))
            self.recorder.record(member, result)

    def __reduce__(self):
        # Tune pickles its callbacks for its own restore files; a search resumes from the study instead,
        # so the pickled copy carries no recorder (which holds a database connection).
        return (_Record, (None,))


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None:
        # A private local Ray for this command: token authentication protects clusters, not a
        # single-process run on localhost (see README "Run on a cluster" for shared clusters).
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise SolversearchError(
                f"cannot connect to the Ray cluster at {address!r}: {first} "
                "(is `ray start --head` running there, and is this machine a Ray node — `ray start --address=...`? "
                "for a cluster with token authentication set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)"
            ) from None


def check_cluster_storage(url: str) -> None:
    """On a cluster of several nodes the study must live in a database every node reaches: the search
    may be driven, resumed or inspected from any of them. SQLite is a file on one machine."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and backend_of(url) == "sqlite":
        raise SolversearchError(
            f"the Ray cluster has {len(nodes)} nodes but the storage is SQLite ({redact_url(url)}); use a shared "
            "database, e.g. --storage postgresql+psycopg2://user@db-host:5432/solversearch (password in PGPASSWORD)"
        )
