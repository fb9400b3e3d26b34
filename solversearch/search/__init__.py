"""Searching solver schedules: the public API of `solversearch.search`.

One contract, in the spirit of Optuna's samplers: a searcher (`ScheduleSearcher`) proposes schedules
(`Proposal`) and learns from what their trials measured (`TrialRecord`, seen as `Observation`s); the
registry (`make_searcher`, `ALGORITHMS`) builds the one an experiment names; `run_search` runs it on Ray
Tune with every trial persisted in an Optuna study (`StudyStore`). Modules not re-exported here are the
parts those are built from.
"""

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
