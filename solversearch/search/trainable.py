"""The worker side of a search: evaluate one schedule per Ray Tune trial, independent of the algorithm.

A worker process builds its Evaluator (model, features, reference statistics) once and reuses it for
every trial it runs (`_EVALUATORS` is that per-process cache); the reference statistics also persist
in the on-disk cache shared by the workers of one machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..evaluator import EvaluationSettings, Evaluator
from ..metrics.reference import ArrayCache
from ..schedule import SolverSchedule


@dataclass(frozen=True)
class EvaluationContext:
    """Everything a worker needs to build its evaluator: small, hashable, no secrets."""

    model: str
    settings: EvaluationSettings
    cache_dir: str | None = None
    threads: int = 1


_EVALUATORS: dict[EvaluationContext, Evaluator] = {}


def evaluator_for(context: EvaluationContext) -> Evaluator:
    """This process's evaluator for `context`, built on first use (on the GPU Ray assigned, if any)."""
    if context not in _EVALUATORS:
        from ..models.spec import load_model

        torch.set_num_threads(max(1, context.threads))
        settings = context.settings
        if _assigned_gpus():
            settings = replace(settings, device="cuda")
        model = load_model(context.model, settings.device)
        cache = ArrayCache(context.cache_dir) if context.cache_dir else ArrayCache()
        _EVALUATORS[context] = Evaluator(model, settings, cache)
    return _EVALUATORS[context]


def evaluate_trial(config: dict[str, Any], context: EvaluationContext) -> dict[str, Any]:
    """Score the trial's schedule and report the metrics and costs to Tune (also returned)."""
    from ray import tune

    schedule = SolverSchedule.from_dict(config["schedule"])
    built = context not in _EVALUATORS
    evaluator = evaluator_for(context)
    result = evaluator.evaluate(schedule)
    report = {
        "fid": result.fid,
        "kid": result.kid,
        "kid_std": result.kid_std,
        "error_to_reference": result.error_to_reference if result.error_to_reference is not None else float("nan"),
        "diverged": result.diverged,
        "nfe": result.nfe,
        "macs": result.macs if result.macs is not None else float("nan"),
        "seconds": result.seconds,
        "sampling_seconds": result.sampling_seconds,
        "metric_seconds": result.metric_seconds,
        "samples_per_second": result.samples_per_second,
        "n": result.n,
        "seed": result.seed,
        "key": config["key"],
        "node": _node_id(),
        "pid": os.getpid(),
        "device": torch.cuda.get_device_name(evaluator.device) if evaluator.device.type == "cuda" else "cpu",
        "built_evaluator": built,  # True only for a worker's first trial: model and statistics load once
    }
    tune.report(report)
    return report


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
