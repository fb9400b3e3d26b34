"""One trial record: what evaluating one schedule measured, in the one shape every part of a search uses.

The worker builds it from the evaluator's result (`TrialRecord.from_result`), Ray Tune carries it as a
flat result dict (`to_report`; a searcher's metric must be a top-level key there), the driver rebuilds it
from that dict and the trial's proposal (`from_report`) and stores it as one Optuna trial, the storage
reads it back, and the searchers learn from `value(metric)`. Spelling it once keeps those in step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..evaluator import METRIC_NAMES, EvaluationResult
from ..schedule import SolverSchedule

# What a trial's cost holds, and where it ran (the worker): the names stored with every trial.
COST_NAMES = ("nfe", "seconds", "sampling_seconds", "metric_seconds", "macs", "refine_seconds")
WORKER_NAMES = ("node", "pid", "device", "built_evaluator", "prepared")
# A key every reported record carries, so the driver tells a trial record from other results Tune reports.
REPORT_MARK = "trial_record"


@dataclass(frozen=True)
class TrialRecord:
    """One evaluated schedule. `key` is the canonical key the search knows it by (operators.canonical_key,
    or `refinement_key(parent)` for a refinement trial); `schedule` is what was evaluated (the refined
    schedule for a refinement trial). Metrics and costs hold finite measurements only; a diverged
    schedule's value is inf whatever its metrics. `values` and `number` are set once it is stored."""

    schedule: SolverSchedule
    key: str = ""
    stage: int = 0
    algorithm: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)  # fid, kid, kid_std, teacher_distance, ...
    diverged: bool = False
    cost: Mapping[str, float] = field(default_factory=dict)  # COST_NAMES that were measured
    n: int = 0
    seed: int = 0
    worker: Mapping[str, Any] = field(default_factory=dict)  # where it ran: node, pid, device, ...
    refinement: Mapping[str, Any] = field(default_factory=dict)  # a refined schedule: its parent, losses, cost
    values: tuple[float, ...] = ()  # objective values as stored (inf for a diverged schedule)
    number: int | None = None  # the Optuna trial number, once stored

    @classmethod
    def from_result(
        cls,
        result: EvaluationResult,
        schedule: SolverSchedule,
        *,
        worker: Mapping[str, Any] | None = None,
        refinement: Mapping[str, Any] | None = None,
        refine_seconds: float | None = None,
    ) -> TrialRecord:
        """What the evaluator measured for `schedule`; key, stage and algorithm come from the proposal."""
        cost = {
            "nfe": result.nfe,
            "seconds": result.seconds,
            "sampling_seconds": result.sampling_seconds,
            "metric_seconds": result.metric_seconds,
            "macs": result.macs,
            "refine_seconds": refine_seconds,
        }
        return cls(
            schedule=schedule,
            metrics=_finite(result.metrics()),
            diverged=bool(result.diverged),
            cost=_finite(cost),
            n=int(result.n),
            seed=int(result.seed),
            worker=dict(worker or {}),
            refinement=dict(refinement or {}),
        )

    def value(self, name: str) -> float:
        """A metric or cost by name (an objective such as "fid" or "nfe"); inf when the schedule diverged
        or the value was not measured, so every searcher ranks such a trial last."""
        value = self.metrics.get(name, self.cost.get(name))
        if self.diverged or value is None or math.isnan(float(value)):
            return math.inf
        return float(value)

    def proposed(self, *, key: str, stage: int, algorithm: str) -> TrialRecord:
        """This record as the trial of a proposal."""
        return replace(self, key=str(key), stage=int(stage), algorithm=str(algorithm))

    # --- the Ray Tune result dict -------------------------------------------------------------

    def to_report(self) -> dict[str, Any]:
        """The flat dict a trial reports to Tune: every metric name (NaN when not measured), the cost,
        where it ran and, for a refinement, the refined schedule (JSON) and its summary (JSON text)."""
        report: dict[str, Any] = {name: float(self.metrics.get(name, math.nan)) for name in METRIC_NAMES}
        report.update({k: v for k, v in self.metrics.items() if k not in report})
        report.update({name: float(self.cost.get(name, math.nan)) for name in COST_NAMES if name != "refine_seconds"})
        report.update(diverged=self.diverged, n=self.n, seed=self.seed, key=self.key, **self.worker)
        if self.refinement:
            report["refined_schedule"] = self.schedule.to_json(indent=None)
            report["refinement"] = json.dumps(dict(self.refinement))
            report["refine_seconds"] = float(self.cost.get("refine_seconds", math.nan))
        report[REPORT_MARK] = True
        return report

    @classmethod
    def from_report(
        cls, report: Mapping[str, Any], schedule: SolverSchedule, *, key: str, stage: int, algorithm: str
    ) -> TrialRecord:
        """The record a trial of the proposal (`schedule`, `key`, `stage`, `algorithm`) reported. A
        refinement trial's record holds the refined schedule it reported. Missing entries (a synthetic
        metric in tests, Tune's own keys) are simply absent."""
        if "refined_schedule" in report:
            schedule = SolverSchedule.from_json(report["refined_schedule"])
        refinement = report.get("refinement")
        return cls(
            schedule=schedule,
            key=str(key),
            stage=int(stage),
            algorithm=str(algorithm),
            metrics=_finite({name: report.get(name) for name in METRIC_NAMES}),
            diverged=bool(report.get("diverged", False)),
            cost=_finite({name: report.get(name) for name in COST_NAMES}),
            n=int(report.get("n", 0)),
            seed=int(report.get("seed", 0)),
            worker={name: report[name] for name in WORKER_NAMES if name in report},
            refinement=json.loads(refinement) if isinstance(refinement, str) else dict(refinement or {}),
        )

    @staticmethod
    def in_report(result: Mapping[str, Any] | None) -> bool:
        """Whether a Tune result carries a trial record (Tune also reports results of its own)."""
        return bool(result) and bool(result.get(REPORT_MARK))


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of `values` as floats (booleans, None, NaN and ±inf are left out)."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    }
