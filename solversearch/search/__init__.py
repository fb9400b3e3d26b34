"""Searching solver schedules: the public API of `solversearch.search`.

One contract, in the spirit of Optuna's samplers: a searcher (`ScheduleSearcher`) proposes schedules
(`Proposal`) and learns from what their trials measured (`TrialRecord`, seen as `Observation`s); the
registry (`make_searcher`, `ALGORITHMS`) builds the one an experiment names; `run_search` runs it on Ray
Tune with every trial persisted in an Optuna study (`StudyStore`). Modules not re-exported here are the
parts those are built from.

The names load on first use (PEP 562), so `import solversearch.search.storage` (export, show) does not
pay for Ray Tune and every searcher.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .autodiffusion import AutoDiffusionSearcher
    from .base import (
        Observation,
        Proposal,
        ScheduleSearcher,
        best_of,
        canonical_order,
        drive,
        is_refinement,
        refinement_key,
    )
    from .baseline_pool import BaselinePool
    from .batching import BatchingSearcher
    from .database import redact_url, storage_url
    from .encoding import ScheduleEncoding
    from .evolution import EvolutionSearcher, HybridS3Searcher, S3Searcher, breed, load_warm_start
    from .experiment import Experiment, ExperimentError, evaluation_settings, experiment_from_dict, load_experiment
    from .operators import LambdaOperators, ScheduleOperators, TimestepOperators, canonical_key
    from .optuna_samplers import OptunaScheduleSearcher
    from .provenance import exported_schedule
    from .random_search import RandomSearcher
    from .record import TrialRecord
    from .refine import RefineSearcher
    from .registry import ALGORITHMS, REFINING, REGISTRY, check_algorithm, make_searcher
    from .report import Report, final_report
    from .runner import SearchOutcome, run_search
    from .space import SearchSpace, SpaceError, load_space, space_from_dict
    from .storage import StudyStore, list_studies, open_existing

_EXPORTS = {
    "AutoDiffusionSearcher": "autodiffusion",
    "Observation": "base",
    "Proposal": "base",
    "ScheduleSearcher": "base",
    "best_of": "base",
    "canonical_order": "base",
    "drive": "base",
    "is_refinement": "base",
    "refinement_key": "base",
    "BaselinePool": "baseline_pool",
    "BatchingSearcher": "batching",
    "redact_url": "database",
    "storage_url": "database",
    "ScheduleEncoding": "encoding",
    "EvolutionSearcher": "evolution",
    "HybridS3Searcher": "evolution",
    "S3Searcher": "evolution",
    "breed": "evolution",
    "load_warm_start": "evolution",
    "Experiment": "experiment",
    "ExperimentError": "experiment",
    "evaluation_settings": "experiment",
    "experiment_from_dict": "experiment",
    "load_experiment": "experiment",
    "LambdaOperators": "operators",
    "ScheduleOperators": "operators",
    "TimestepOperators": "operators",
    "canonical_key": "operators",
    "OptunaScheduleSearcher": "optuna_samplers",
    "exported_schedule": "provenance",
    "RandomSearcher": "random_search",
    "TrialRecord": "record",
    "RefineSearcher": "refine",
    "ALGORITHMS": "registry",
    "REFINING": "registry",
    "REGISTRY": "registry",
    "check_algorithm": "registry",
    "make_searcher": "registry",
    "Report": "report",
    "final_report": "report",
    "SearchOutcome": "runner",
    "run_search": "runner",
    "SearchSpace": "space",
    "SpaceError": "space",
    "load_space": "space",
    "space_from_dict": "space",
    "StudyStore": "storage",
    "list_studies": "storage",
    "open_existing": "storage",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


__all__ = [
    "ALGORITHMS",
    "REFINING",
    "REGISTRY",
    "AutoDiffusionSearcher",
    "BaselinePool",
    "BatchingSearcher",
    "EvolutionSearcher",
    "Experiment",
    "ExperimentError",
    "HybridS3Searcher",
    "LambdaOperators",
    "Observation",
    "OptunaScheduleSearcher",
    "Proposal",
    "RandomSearcher",
    "RefineSearcher",
    "Report",
    "S3Searcher",
    "ScheduleEncoding",
    "ScheduleOperators",
    "ScheduleSearcher",
    "SearchOutcome",
    "SearchSpace",
    "SpaceError",
    "StudyStore",
    "TimestepOperators",
    "TrialRecord",
    "best_of",
    "breed",
    "canonical_key",
    "canonical_order",
    "check_algorithm",
    "drive",
    "evaluation_settings",
    "experiment_from_dict",
    "exported_schedule",
    "final_report",
    "is_refinement",
    "list_studies",
    "load_experiment",
    "load_space",
    "load_warm_start",
    "make_searcher",
    "open_existing",
    "redact_url",
    "refinement_key",
    "run_search",
    "space_from_dict",
    "storage_url",
]
