"""The worker side of a search: evaluate the schedules of a Ray Tune trial, independent of the algorithm.

A worker process builds its Evaluator (model and features) once and reuses it for every trial it runs
(`_EVALUATORS` is that per-process cache). The reference statistics and the teacher come prepared by
the driver through Ray's object store: a worker never builds them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..evaluator import EvaluationSettings, Evaluator, Prepared
from ..metrics.reference import ArrayCache
from ..models.spec import load_model
from ..refine import RefineSettings, refine
from ..schedule import SolverSchedule
from .batching import MEMBER, MEMBERS
from .record import TrialRecord


@dataclass(frozen=True)
class EvaluationContext:
    """Everything a worker needs to build its evaluator: small, hashable, no secrets."""

    model: str
    settings: EvaluationSettings
    cache_dir: str | None = None
    threads: int = 1


_EVALUATORS: dict[EvaluationContext, Evaluator] = {}


def evaluator_for(context: EvaluationContext, prepared: Prepared | None = None) -> Evaluator:
    """This process's evaluator for `context`, built on first use (on the GPU Ray assigned, if any).
    With `prepared` (the driver's reference statistics and teacher) it builds neither."""
    if context not in _EVALUATORS:
        torch.set_num_threads(max(1, context.threads))
        settings = context.settings
        if _assigned_gpus():
            settings = replace(settings, device="cuda")
        model = load_model(context.model, settings.device)
        cache = ArrayCache(context.cache_dir) if context.cache_dir else ArrayCache()
        _EVALUATORS[context] = Evaluator(model, settings, cache, prepared)
    return _EVALUATORS[context]


def evaluate_trial(
    config: dict[str, Any], context: EvaluationContext, prepared: Prepared | None = None
) -> dict[str, Any]:
    """Score each member of the trial's batch (batching.BatchingSearcher) on this worker's resident
    evaluator and report each result to Tune the moment it is scored, with its member index; returns
    the last report. A refinement member (config "refine") first refines its schedule, then scores the
    refined one."""
    from ray import tune

    report: dict[str, Any] = {}
    for index, member in enumerate(config[MEMBERS]):
        built = context not in _EVALUATORS
        report = {**member_result(evaluator_for(context, prepared), member, built_evaluator=built), MEMBER: index}
        tune.report(report)
    return report


def member_result(evaluator: Evaluator, member: dict[str, Any], built_evaluator: bool = False) -> dict[str, Any]:
    """The result of one proposal's config: its schedule scored, or refined and then scored."""
    schedule = SolverSchedule.from_dict(member["schedule"])
    if member.get("refine") is not None:
        result = refinement_result(evaluator, schedule, member["refine"], built_evaluator=built_evaluator)
    else:
        result = trial_result(evaluator, schedule, built_evaluator=built_evaluator)
    return {**result, "key": member["key"]}


def refinement_result(
    evaluator: Evaluator, parent: SolverSchedule, settings: dict[str, Any], built_evaluator: bool = False
) -> dict[str, Any]:
    """Refine `parent` on the evaluator's model (on its device), then score the refined schedule: its
    report carries the refined schedule and the refinement's summary and cost (`TrialRecord.to_report`)."""
    refinement = refine(
        evaluator.model, parent, RefineSettings(**settings, device=str(evaluator.device)), cache=evaluator.cache
    )
    record = TrialRecord.from_result(
        evaluator.evaluate(refinement.schedule),
        refinement.schedule,
        worker=_worker(evaluator, built_evaluator),
        refinement=refinement.summary(),
        refine_seconds=refinement.seconds,
    )
    return record.to_report()


def trial_result(evaluator: Evaluator, schedule: SolverSchedule, built_evaluator: bool = False) -> dict[str, Any]:
    """Evaluate the schedule: what the trial reports (`TrialRecord.to_report`: metrics, cost, where it
    ran). The driver evaluates the baseline pool with this too, so both kinds of trial are recorded alike."""
    record = TrialRecord.from_result(evaluator.evaluate(schedule), schedule, worker=_worker(evaluator, built_evaluator))
    return record.to_report()


def _worker(evaluator: Evaluator, built_evaluator: bool) -> dict[str, Any]:
    """Where a trial ran, as its record keeps it."""
    return {
        "node": _node_id(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(evaluator.device) if evaluator.device.type == "cuda" else "cpu",
        "built_evaluator": built_evaluator,  # True only for a worker's first trial: model and statistics load once
        "prepared": evaluator.prepared,  # reference and teacher came from the driver, never built here
    }


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else os.uname().nodename
    except Exception:  # noqa: BLE001 - outside Ray: the host name
        return os.uname().nodename


def _assigned_gpus() -> list:
    try:
        import ray

        return ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a Ray worker there simply is no GPU assignment
        return []
