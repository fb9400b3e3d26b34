"""What an exported schedule says about where it came from, built in one place for every exporter.

A schedule file outlives its study: its metrics, the model it was searched on and its provenance
(study, trial, algorithm, whether it is the search's winner or the k-th best, its refinement and its
paired comparison with the best baseline) travel with it. The search writes its winner with this, and
`solversearch export` writes any stored trial with it, so both files read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..schedule import SolverSchedule
from .record import TrialRecord


def exported_schedule(
    record: TrialRecord,
    study: str,
    description: Mapping[str, Any],
    *,
    rank: int | None = None,
    comparison: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    **details: Any,
) -> SolverSchedule:
    """The stored schedule with its metrics (the stored ones, updated by `metrics`, e.g. validation means),
    the fingerprint of the model it was searched on and its provenance. `description` is the study's
    (model, model_fingerprint, prediction_type); `rank` None marks the search's winner, else its rank by
    search-seed value; `details` adds what only the caller knows (storage, experiment, objective)."""
    return record.schedule.with_metadata(
        metrics={**record.metrics, **(metrics or {})},
        model_fingerprint=description.get("model_fingerprint"),
        provenance={
            "study": study,
            "trial": record.number,
            "algorithm": record.algorithm,
            **({"winner": True} if rank is None else {"rank": rank}),
            "model": description.get("model"),
            "prediction_type": description.get("prediction_type"),
            **details,
            **({"refinement": dict(record.refinement)} if record.refinement else {}),
            **({"comparison": dict(comparison)} if comparison else {}),
        },
    )
