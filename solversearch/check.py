"""Checkpoint drift: does a schedule searched on one checkpoint still beat the hand-designed ones on another?

`check_schedule` finds the model's best hand-designed schedule at the schedule's NFE (every preset on every
grid of the model's path, the best picked on a selection seed, as a search's report picks its winners), scores
both on K fresh validation seeds from the same x_T and compares them paired, with the converged solution as
the floor. The verdict keeps the schedule unless it is significantly worse than that baseline on the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from . import presets
from .errors import SolversearchError
from .evaluator import EvaluationResult, EvaluationSettings, Evaluator
from .inference import check_family
from .models.spec import ModelHandle
from .schedule import SolverSchedule
from .search.baseline_pool import preset_grid_pairs
from .search.experiment import METRICS, SELECTION_SEED_OFFSET
from .search.report import REPORT_METRICS, paired_comparisons, selected
from .statistics import BETTER, WORSE, PairedDifference

KEEP, RESEARCH = "keep", "re-search"

# (what, done, total): the selection of the baseline, then the validation seeds
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CheckSettings:
    """What the schedule is compared on: the objective, the seeds and the baseline candidates."""

    metric: str = "teacher_distance"
    selection_seed: int = SELECTION_SEED_OFFSET  # a search's selection seed (search seed 0 + offset)
    validation_seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    presets: Sequence[str] | str = "all"
    grids: Sequence[str] | str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "validation_seeds", tuple(self.validation_seeds))
        if self.metric not in METRICS:
            raise SolversearchError(f"unknown metric {self.metric!r}; expected one of {list(METRICS)}")
        if not self.validation_seeds:
            raise SolversearchError("the check needs at least one validation seed")
        if len(set(self.validation_seeds)) != len(self.validation_seeds):
            raise SolversearchError(f"the validation seeds {list(self.validation_seeds)} repeat a seed")
        if self.selection_seed in self.validation_seeds:
            raise SolversearchError(
                f"the selection seed {self.selection_seed} is one of the validation seeds "
                f"{list(self.validation_seeds)}: the baseline must be picked on noise it is not judged on"
            )


@dataclass(frozen=True)
class CheckResult:
    """The schedule and the model's best baseline on the same validation seeds, and their paired differences
    (schedule − baseline) per metric."""

    schedule: SolverSchedule
    baseline: SolverSchedule
    candidates: int  # baselines scored on the selection seed
    baseline_selection: EvaluationResult  # the winning baseline on the selection seed
    schedule_results: tuple[EvaluationResult, ...]
    baseline_results: tuple[EvaluationResult, ...]
    floor: tuple[EvaluationResult, ...]  # the converged solution on each validation seed
    comparisons: Mapping[str, PairedDifference]
    settings: CheckSettings
    n: int
    reference: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def objective(self) -> PairedDifference:
        return self.comparisons[self.settings.metric]

    @property
    def verdict(self) -> str:
        """KEEP unless the schedule is significantly worse than the best baseline on the objective."""
        return RESEARCH if self.objective.verdict == WORSE else KEEP

    @property
    def significantly_better(self) -> bool:
        return self.objective.verdict == BETTER

    def floor_mean(self, metric: str) -> float:
        values = [r.metrics().get(metric, math.nan) for r in self.floor]
        return sum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The numbers as plain JSON data (infinite or undefined values as null)."""
        return {
            "schedule": {
                "name": self.schedule.name,
                "nfe": self.schedule.nfe,
                "model_fingerprint": self.schedule.model_fingerprint,
            },
            "baseline": {
                "name": self.baseline.name,
                "candidates": self.candidates,
                "selection": self.baseline_selection.to_dict(),
            },
            "objective": self.settings.metric,
            "selection_seed": self.settings.selection_seed,
            "validation_seeds": list(self.settings.validation_seeds),
            "n": self.n,
            "reference": self.reference,
            "metrics": {m: {**d.to_dict(), "floor": _plain(self.floor_mean(m))} for m, d in self.comparisons.items()},
            "verdict": self.verdict,
            "significantly_better": self.significantly_better,
            "notes": list(self.notes),
        }


def compatibility_notes(schedule: SolverSchedule, model: ModelHandle) -> tuple[str, ...]:
    """Refuse a schedule of another path family (or one whose family is unknown), or one that skips blocks
    the model lacks; otherwise say how the schedule's origin differs from this model: other noise
    parameters, parameterisation or weights."""
    own = check_family(schedule, model.noise_schedule)
    skipped = sorted({unit for step in schedule.steps for unit in step.skip})
    unknown = [unit for unit in skipped if unit not in getattr(model.denoiser, "units", ())]
    if unknown:
        raise SolversearchError(f"the schedule skips network blocks this model does not have: {unknown}")
    notes = []
    if own != model.noise_schedule:
        notes.append(
            f"the schedule was made on the noise schedule {own.to_dict()}, this model uses "
            f"{model.noise_schedule.to_dict()} (same family): its times are used as they are"
        )
    made_for = schedule.provenance.get("prediction_type")
    predicts = getattr(model.denoiser, "prediction_type", None)
    if made_for and predicts and made_for != predicts:
        notes.append(f"the schedule was searched on a {made_for} model, this one predicts {predicts}")
    if schedule.model_fingerprint is None:
        notes.append("the schedule does not say which checkpoint it was searched on")
    elif schedule.model_fingerprint == model.fingerprint:
        notes.append(f"the schedule was searched on this very checkpoint ({model.fingerprint})")
    else:
        notes.append(
            f"the schedule was searched on checkpoint {schedule.model_fingerprint}, this is {model.fingerprint}"
        )
    return tuple(notes)


def baseline_candidates(model: ModelHandle, nfe: int, settings: CheckSettings) -> list[SolverSchedule]:
    """Every chosen preset on every chosen grid of the model's path at `nfe`, as the baseline pool's first
    generation builds them (two grids that coincide give one candidate)."""
    noise, candidates, seen = model.noise_schedule, [], set()
    for preset, grid in preset_grid_pairs(noise, settings.presets, settings.grids):
        schedule = presets.build(preset, noise, nfe, grid)
        if schedule.decisions_key() not in seen:
            seen.add(schedule.decisions_key())
            candidates.append(schedule)
    if not candidates:
        raise SolversearchError(f"none of the grids {settings.grids} exists on this model's path; choose others")
    return candidates


def check_schedule(
    model: ModelHandle,
    schedule: SolverSchedule,
    settings: CheckSettings | None = None,
    evaluation: EvaluationSettings | None = None,
    on_progress: Progress | None = None,
) -> CheckResult:
    """Compare `schedule` with `model`'s best baseline at its NFE, paired over the validation seeds.

    `evaluation` gives n, the device, the features and the reference (its seed is replaced by each seed
    of `settings`; the teacher distances are always measured). A schedule of another path family, or of
    an unknown one, is refused before anything is evaluated."""
    settings = settings or CheckSettings()
    evaluation = replace(evaluation or EvaluationSettings(n=500), error_to_reference=True)
    notes = compatibility_notes(schedule, model)
    progress = on_progress or (lambda what, done, total: None)

    candidates = baseline_candidates(model, schedule.nfe, settings)
    select = _evaluator(model, evaluation, settings.selection_seed, progress, "selection")
    scored = []
    progress("selection", 0, len(candidates))
    for i, candidate in enumerate(candidates):
        scored.append((select.evaluate(candidate), candidate))
        progress("selection", i + 1, len(candidates))
    selection, baseline = selected(scored, settings.metric, lambda s: s.name)
    if not math.isfinite(selection.metrics().get(settings.metric, math.inf)):
        raise SolversearchError(f"no preset gives a finite {settings.metric} on this model at NFE {schedule.nfe}")

    ours, theirs, floor = [], [], []
    seeds = settings.validation_seeds
    progress("validation", 0, len(seeds))
    for i, seed in enumerate(seeds):
        check = _evaluator(model, evaluation, seed, progress, f"validation seed {seed}")
        ours.append(check.evaluate(schedule))
        theirs.append(check.evaluate(baseline))
        floor.append(check.floor())
        progress("validation", i + 1, len(seeds))
    comparisons = paired_comparisons(ours, theirs, REPORT_METRICS)
    if settings.metric not in comparisons:
        raise SolversearchError(
            f"{settings.metric} cannot be measured against {select.reference().description}; choose another --metric"
        )
    return CheckResult(
        schedule,
        baseline,
        len(candidates),
        selection,
        tuple(ours),
        tuple(theirs),
        tuple(floor),
        comparisons,
        settings,
        evaluation.n,
        select.reference().description,
        notes,
    )


def _evaluator(
    model: ModelHandle, evaluation: EvaluationSettings, seed: int, progress: Progress, what: str
) -> Evaluator:
    """A fresh-noise evaluator with its reference and teacher built (with progress) before it scores."""
    evaluator = Evaluator(model, replace(evaluation, seed=seed))
    evaluator.prepare(lambda built, done, total: progress(f"{what}: {built}", done, total))
    return evaluator


def _plain(value: float) -> float | None:
    return value if math.isfinite(value) else None
