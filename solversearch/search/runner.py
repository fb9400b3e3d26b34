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
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from ..errors import SearchInterrupted, SolversearchError
from ..evaluator import METRIC_NAMES, Evaluator, Prepared
from ..models.spec import ModelHandle, load_model
from ..refine import RefineSettings, prepare_teachers
from ..schedule import SolverSchedule
from .baseline_pool import ALGORITHM as BASELINE_POOL
from .baseline_pool import BaselinePool
from .encoding import ScheduleEncoding
from .experiment import Experiment, evaluation_settings
from .interruption import StopRequest, stop_on_signals, tuning
from .operators import Operators
from .report import BEST_BASELINE, SEARCHED, Report, final_report
from .searchers import REFINING, Observation, ScheduleSearcher, drive, make_searcher
from .storage import StoredEvaluation, StudyStore, redact_url, storage_url
from .trainable import EvaluationContext, evaluate_trial, trial_result


@dataclass(frozen=True)
class SearchOutcome:
    study: str
    evaluations: int  # in the study: the baseline pool and the searched schedules
    baseline_evaluations: int
    new_evaluations: int
    best: StoredEvaluation | None
    best_baseline: StoredEvaluation | None
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


def observations_from(history: list[StoredEvaluation], metric: str) -> list[Observation]:
    return [
        Observation(
            e.schedule, e.key, math.inf if e.diverged else float(e.metrics.get(metric, math.inf)), e.stage, e.algorithm
        )
        for e in history
    ]


def build_searcher(experiment: Experiment, model: ModelHandle, history: list[StoredEvaluation]) -> ScheduleSearcher:
    metric = list(objectives(experiment)) if len(objectives(experiment)) > 1 else experiment.metric.name
    nfe = experiment.nfe
    if not isinstance(nfe, int) and experiment.algorithm != "nsga2":
        raise SolversearchError(
            f"nfe: a list of budgets ({list(nfe)}) needs algorithm nsga2 with objectives [metric, nfe]"
        )
    values = {e.key: list(e.values) for e in history} if len(objectives(experiment)) > 1 else None
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
        nfe,
        model.noise_schedule,
        settings=settings,
        seed=experiment.algorithm_seed,  # the same seed on resume: the searcher re-plans its generation and skips what is done
        metric=metric,
        history=observations_from(history, experiment.metric.name),
        history_values=values,
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

    def record(self, config: dict[str, Any], result: dict[str, Any]) -> None:
        refined = "refined_schedule" in result  # a refinement trial: what was evaluated is the refined schedule
        schedule = (
            SolverSchedule.from_json(result["refined_schedule"])
            if refined
            else SolverSchedule.from_dict(config["schedule"])
        )
        schedule = schedule.with_metadata(
            name=schedule.name or f"{self.experiment.study_name}/{config['key']}",
            noise_schedule=self.noise.to_dict(),
        )
        encoding = self.encodings.setdefault(
            schedule.nfe, ScheduleEncoding(Operators(self.experiment.space, schedule.nfe, self.noise))
        )
        params, distributions = encoding.from_schedule(schedule)
        diverged = bool(result.get("diverged"))
        metrics = {k: float(result[k]) for k in METRIC_NAMES if _number(result.get(k))}
        values = [math.inf if diverged else float(result[o]) for o in objectives(self.experiment)]
        cost = {
            k: float(result[k])
            for k in ("nfe", "seconds", "sampling_seconds", "metric_seconds", "macs", "refine_seconds")
            if _number(result.get(k))
        }
        self.store.record(
            schedule,
            config["key"],
            values,
            metrics,
            params=params,
            distributions=distributions,
            diverged=diverged,
            stage=int(config["stage"]),
            algorithm=str(config["algorithm"]),
            cost=cost,
            n=int(result["n"]),
            seed=int(result["seed"]),
            worker={k: result[k] for k in ("node", "pid", "device", "built_evaluator", "prepared") if k in result},
            refinement=json.loads(result["refinement"]) if refined else None,
        )
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
        with _ray(address):  # a cluster: refuse a storage its nodes cannot share before anything is built
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
    build_searcher(experiment, model, [])  # the algorithm and its settings (a warm start's file) fail before any work
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
        with _ray(address):
            context = EvaluationContext(
                model=experiment.model, settings=settings, threads=max(1, int(experiment.resources.cpu))
            )
            searcher = build_searcher(experiment, model, history)
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
        with _ray(address) if validate else contextlib.nullcontext():
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
        winner = best.stored.schedule.with_metadata(
            metrics={
                **best.stored.metrics,
                **{
                    f"validation_{m}": best.mean(m)
                    for m in METRIC_NAMES
                    if best.validation and math.isfinite(best.mean(m))
                },
            },
            model_fingerprint=model.fingerprint,
            provenance={
                "study": experiment.study_name,
                "trial": best.stored.number,
                "algorithm": best.stored.algorithm,
                "storage": redact_url(storage_url(experiment.storage_url)),
                "experiment": experiment.name,
                "model": experiment.model,
                "prediction_type": model.denoiser.prediction_type,
                "objective": experiment.metric.name,
                **({"refinement": best.stored.refinement} if best.stored.refinement else {}),
                **({"comparison": report.comparison_record()} if report.comparisons else {}),
            },
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
def _ray(address: str | None) -> Iterator[None]:
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
                search_alg=ConcurrencyLimiter(recorder.searcher, max_concurrent=experiment.resources.concurrent),
                num_samples=num_samples,
                time_budget_s=time_budget_s,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=experiment.study_name,
                storage_path=results_dir,
                callbacks=[_Record(recorder)],
                # A trial whose worker dies is retried; nothing reaches the study until a trial finishes.
                failure_config=tune.FailureConfig(max_failures=2),
                verbose=0,
            ),
        )
        with tuning(stop):
            tuner.fit()
    finally:
        shutil.rmtree(results_dir, ignore_errors=True)
    return recorder.recorded


class _Record(Callback):
    """Tune callback: each finished trial goes to the study, from the driver, as it finishes."""

    def __init__(self, recorder: StudyRecorder | None):
        self.recorder = recorder

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.recorder is not None and trial.last_result and "fid" in trial.last_result:
            self.recorder.record(trial.config, trial.last_result)

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
    from sqlalchemy.engine import make_url

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and make_url(url).get_backend_name() == "sqlite":
        raise SolversearchError(
            f"the Ray cluster has {len(nodes)} nodes but the storage is SQLite ({redact_url(url)}); use a shared "
            "database, e.g. --storage postgresql+psycopg2://user@db-host:5432/solversearch (password in PGPASSWORD)"
        )


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
