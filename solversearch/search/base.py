"""The searcher contract: a Ray Tune Searcher that proposes schedules and learns from trial records.

Every searcher proposes one schedule per trial (`suggest` → `Proposal.to_config()`), learns from
`on_trial_complete` (the trial's `TrialRecord`, as Tune carries it), never proposes a schedule whose
canonical key it has seen, and can be rebuilt from stored evaluations (`history=`) — that is how a
search resumes from its study. `save`/`restore` pickle the whole state, RNGs included, so a restored
searcher continues identically. They are plain Python objects: `drive()` runs one without Ray.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from ..outputs import atomic_output
from ..schedule import SolverSchedule
from .operators import LambdaOperators, ScheduleOperators
from .record import TrialRecord
from .space import SearchSpace

REFINEMENT_PREFIX = "refine:"


@dataclass(frozen=True)
class Observation:
    """One evaluated schedule as a searcher sees it: its value of the searcher's metric (inf for
    diverged or failed) and, for several objectives, every objective's value."""

    schedule: SolverSchedule
    key: str
    value: float
    stage: int
    algorithm: str = ""  # who proposed it; "" (unknown) counts as this searcher's own
    values: tuple[float, ...] = ()  # every objective's stored value, when the study has several

    @classmethod
    def from_record(cls, record: TrialRecord, metric: str) -> Observation:
        return cls(record.schedule, record.key, record.value(metric), record.stage, record.algorithm, record.values)


@dataclass(frozen=True)
class Proposal:
    """A schedule a searcher hands out for evaluation, with its canonical key and its stage. A
    refinement proposal (`refine`) asks the worker to refine the schedule (refine.py) and evaluate the
    result; its key names the parent (`refinement_key`), since the refined times are not known yet."""

    schedule: SolverSchedule
    key: str
    stage: int
    refine: bool = False

    def to_config(self, algorithm: str, refine_settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The trial's Ray Tune config: plain data a worker on any node reads."""
        config = {"schedule": self.schedule.to_dict(), "key": self.key, "stage": self.stage, "algorithm": algorithm}
        if self.refine:
            config["refine"] = dict(refine_settings or {})
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Proposal:
        return cls(
            SolverSchedule.from_dict(config["schedule"]),
            str(config["key"]),
            int(config["stage"]),
            refine=config.get("refine") is not None,
        )

    def record(self, report: Mapping[str, Any], algorithm: str) -> TrialRecord:
        """What a trial of this proposal reported, as a record."""
        return TrialRecord.from_report(report, self.schedule, key=self.key, stage=self.stage, algorithm=algorithm)


def refinement_key(parent_key: str) -> str:
    """The key of the trial that refines the schedule with canonical key `parent_key`: each schedule
    is refined at most once, and a resumed search knows which were."""
    return f"{REFINEMENT_PREFIX}{parent_key}"


def is_refinement(key: str) -> bool:
    return key.startswith(REFINEMENT_PREFIX)


def canonical_order(observations: Iterable[Observation]) -> list[Observation]:
    """Observations in an order that does not depend on when their trials finished."""
    return sorted(
        observations, key=lambda o: (o.stage, o.key, o.algorithm, math.inf if math.isnan(o.value) else o.value)
    )


def best_of(observations: Iterable[Observation], k: int) -> list[Observation]:
    """The k best finite results, ties broken by key."""
    return sorted((o for o in observations if math.isfinite(o.value)), key=lambda o: (o.value, o.key))[:k]


class ScheduleSearcher(Searcher):
    """Shared machinery: proposals, de-duplication, history, the trial config, save/restore.

    A subclass implements `_propose` (a Proposal, None to wait for running trials, or
    `Searcher.FINISHED`) and may replace `self.ops` with other `ScheduleOperators`."""

    algorithm = "base"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        metric: str = "fid",
        mode: str = "min",
        seed: int = 0,
        history: Iterable[Observation] = (),
    ):
        super().__init__(metric=metric, mode=mode)
        if mode != "min":
            raise SolversearchError("solversearch metrics are minimised; mode must be 'min'")
        self.ops: ScheduleOperators = LambdaOperators(space, nfe, noise)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.observations: list[Observation] = []
        self.known: set[str] = set()
        self.pending: dict[str, Proposal] = {}
        self.stage = 0
        self.n_units: int | None = None  # the model's prunable units, when the space skips blocks
        self.timings: dict[str, float] = {"predictor_seconds": 0.0}
        self.refine_settings: dict[str, Any] = {}  # what refinement trials run with (refine.RefineSettings)
        for observation in history:
            self.observations.append(observation)
            self.known.add(observation.key)

    # --- Ray Tune Searcher API ----------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        proposal = self._propose()
        if proposal is None or proposal == Searcher.FINISHED:
            return proposal
        self.pending[trial_id] = proposal
        self.known.add(proposal.key)
        return proposal.to_config(self.algorithm, self.refine_settings)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        proposal = self.pending.pop(trial_id, None)
        if proposal is None:
            return
        if error or not result:
            # The evaluation was lost (a worker died): forget the key so it can be proposed again.
            self.known.discard(proposal.key)
            return
        self.observations.append(Observation.from_record(proposal.record(result, self.algorithm), self.metric))

    def save(self, checkpoint_path: str) -> None:
        with atomic_output(checkpoint_path) as tmp, open(tmp, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))

    def use_units(self, units: Sequence[str]) -> None:
        """The model's prunable units: operators may then skip them (spaces with `skip:`)."""
        self.ops = LambdaOperators(self.ops.space, self.ops.nfe, self.ops.noise, units)
        self.n_units = len(units)

    def best_observations(self, k: int) -> list[Observation]:
        return best_of(self.observations, k)

    # --- for subclasses -----------------------------------------------------------------------

    def _propose(self) -> Proposal | str | None:
        raise NotImplementedError

    def _new(self, schedule: SolverSchedule, stage: int) -> Proposal | None:
        """A proposal unless its key is known. Only for plans that draw nothing at random (the baseline
        pool's): a random plan must de-duplicate with `_take`, or a resumed search would draw differently."""
        key = self.ops.canonical_key(schedule)
        if key in self.known:
            return None
        return Proposal(schedule, key, stage)

    def _unique_variant(
        self, make: Callable[[], SolverSchedule], stage: int, taken: set[str], attempts: int = 50
    ) -> Proposal | None:
        for _ in range(attempts):
            proposal = self._take(make(), stage, taken)
            if proposal is not None:
                return proposal
        return None

    def _own(self, observation: Observation) -> bool:
        """Proposed by this algorithm (or of unknown origin). Others' results — the baseline pool, a
        study started with another algorithm — are known results to learn from, not generations."""
        return observation.algorithm in ("", self.algorithm)

    def _generation_rng(self, generation: int) -> np.random.Generator:
        """A generation's own generator: planning it depends on (seed, generation, earlier results) only,
        not on how many draws earlier generations made, nor on when their trials finished."""
        return np.random.default_rng([self.seed, generation])

    def _take(self, schedule: SolverSchedule, stage: int, taken: set[str]) -> Proposal | None:
        """A planned proposal, unless its key is in `taken` (the keys the plan may not repeat), which it joins.
        Plans de-duplicate against the results they were planned from, not against `known`: that grows
        with the generation being planned, and a resumed searcher must re-plan it identically."""
        key = self.ops.canonical_key(schedule)
        if key in taken:
            return None
        taken.add(key)
        return Proposal(schedule, key, stage)

    def _next_unknown(self, queue: list[Proposal]) -> Proposal | None:
        """Pop the queue's first proposal not yet evaluated nor pending (a resumed plan skips those)."""
        while queue:
            proposal = queue.pop(0)
            if proposal.key not in self.known:
                return proposal
        return None


def drive(
    searcher: ScheduleSearcher,
    evaluate: Callable[[SolverSchedule], Mapping[str, Any]],
    budget: int,
    on_result: Callable[[dict[str, Any], Mapping[str, Any]], None] | None = None,
    refine: Callable[[SolverSchedule, dict[str, Any]], Mapping[str, Any]] | None = None,
) -> int:
    """Run a searcher in-process, one evaluation at a time; returns the number of evaluations.
    `evaluate(schedule)` and `refine(schedule, settings)` return what a trial reports (a
    `TrialRecord.to_report()` dict, or any dict with the searcher's metric); `on_result(config, report)`
    sees each trial's config and report."""
    done = 0
    while done < budget:
        trial_id = f"local-{done}"
        config = searcher.suggest(trial_id)
        if config == Searcher.FINISHED:
            break
        if config is None:
            raise RuntimeError(f"{type(searcher).__name__} waited although every result is in")
        schedule = SolverSchedule.from_dict(config["schedule"])
        if config.get("refine") is not None:
            if refine is None:
                raise RuntimeError(f"{type(searcher).__name__} proposed a refinement, but drive() was given no refine")
            result = refine(schedule, config["refine"])
        else:
            result = evaluate(schedule)
        searcher.on_trial_complete(trial_id, dict(result))
        if on_result is not None:
            on_result(config, result)
        done += 1
    return done
