"""The bridge to Optuna's samplers (tpe, gp, nsga2) through Ray Tune's OptunaSearch, over the flat encoding.

Optuna's samplers search `ScheduleEncoding`'s parameters; every schedule they propose is repaired into
the space, de-duplicated by canonical key (a repeated proposal is answered from history, not
re-evaluated) and evaluated like any other searcher's.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from ..schedule import SolverSchedule
from .base import Observation, Proposal, ScheduleSearcher
from .database import quiet_optuna
from .encoding import ScheduleEncoding
from .operators import LambdaOperators
from .space import SearchSpace

SAMPLERS = ("tpe", "gp", "nsga2")


class OptunaScheduleSearcher(ScheduleSearcher):
    """Optuna's samplers (tpe, gp, nsga2) through Ray Tune's OptunaSearch over the flat encoding.

    History is replayed into the in-memory Optuna study before the first suggestion; proposals that
    repeat a known schedule are answered from history (the sampler learns, nothing is re-evaluated).
    Several objectives (nsga2): `metric` is a list such as ["fid", "nfe"], and `nfe` may be a tuple of
    budgets to choose from.
    """

    def __init__(
        self,
        space: SearchSpace,
        nfe: int | Sequence[int],
        noise: NoiseSchedule,
        *,
        sampler: str = "tpe",
        metric: str | Sequence[str] = "fid",
        seed: int = 0,
        history: Iterable[Observation] = (),
    ):
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.nfes = (nfe,) if isinstance(nfe, int) else tuple(nfe)
        super().__init__(space, self.nfes[0], noise, metric=self.metrics[0], seed=seed, history=history)
        self.algorithm = sampler
        self.encodings = {n: ScheduleEncoding(LambdaOperators(space, n, noise)) for n in self.nfes}
        samplers: dict[str, Callable[[], optuna.samplers.BaseSampler]] = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=16),
        }
        if sampler not in samplers:
            raise SolversearchError(f"unknown Optuna sampler {sampler!r}; expected one of {sorted(samplers)}")
        # Values of every known schedule, by key: answers repeated proposals without re-evaluating.
        self.values_by_key: dict[str, list[float]] = {o.key: self._known_values(o) for o in self.observations}
        storage = optuna.storages.InMemoryStorage()
        with quiet_optuna():
            study = optuna.create_study(
                storage=storage, study_name="search", directions=["minimize"] * len(self.metrics)
            )
            for observation in self.observations:
                if observation.schedule.nfe not in self.encodings:
                    continue
                params, distributions = self._params_of(observation.schedule)
                values = [_capped(v) for v in self.values_by_key[observation.key]]
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=values))
        self.study = study  # the sampler's study: the history replayed, then every trial told
        self.inner = OptunaSearch(
            space=_DefineByRun(self.encodings, self.nfes),
            metric=self.metrics[0] if len(self.metrics) == 1 else self.metrics,
            mode="min" if len(self.metrics) == 1 else ["min"] * len(self.metrics),
            sampler=samplers[sampler](),
            storage=storage,
            study_name="search",
        )
        self.inner_ids: dict[str, str] = {}
        self.serial = 0

    def _known_values(self, observation: Observation) -> list[float]:
        """Each objective's value of a known schedule (its stored values when the study has several)."""
        if len(self.metrics) > 1 and len(observation.values) == len(self.metrics):
            return list(observation.values)
        return [observation.value] * len(self.metrics)

    def _params_of(self, schedule: SolverSchedule):
        params, distributions = self.encodings[schedule.nfe].from_schedule(schedule)
        if len(self.nfes) > 1:
            params = {"nfe": schedule.nfe, **params}
            distributions = {"nfe": CategoricalDistribution(list(self.nfes)), **distributions}
        return params, distributions

    def suggest(self, trial_id: str):
        for _ in range(100):
            self.serial += 1
            inner_id = f"inner-{self.serial}"
            with quiet_optuna(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Define-by-run function")  # GP/TPE fitting happens here
                params = self.inner.suggest(inner_id)
            schedule = self.encodings[params["nfe"]].to_schedule(params)
            key = self.ops.canonical_key(schedule)
            if key in self.values_by_key:
                self._tell(inner_id, self.values_by_key[key])  # known: the sampler learns it again, free
                continue
            if key in self.known:
                self._tell(inner_id, None)  # being evaluated by another trial right now
                continue
            self.inner_ids[trial_id] = inner_id
            proposal = Proposal(schedule, key, stage=0)
            self.pending[trial_id] = proposal
            self.known.add(key)
            return proposal.to_config(self.algorithm)
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self.inner_ids.pop(trial_id, None)
        proposal = self.pending.get(trial_id)
        super().on_trial_complete(trial_id, result, error)
        if inner_id is None or proposal is None:
            return
        values = None
        if not error and result:
            record = proposal.record(result, self.algorithm)
            values = [record.value(m) for m in self.metrics]
            self.values_by_key[proposal.key] = values
        self._tell(inner_id, values)

    def _tell(self, inner_id: str, values: Sequence[float] | None) -> None:
        result = None if values is None else {m: _capped(v) for m, v in zip(self.metrics, values)}
        with quiet_optuna():
            self.inner.on_trial_complete(inner_id, result=result, error=values is None)


class _DefineByRun:
    """Optuna's define-by-run space: the NFE (when several) first, then that budget's encoding.
    A standalone object (not a bound method) so the searcher pickles without a reference cycle."""

    def __init__(self, encodings: Mapping[int, ScheduleEncoding], nfes: Sequence[int]):
        self.encodings, self.nfes = encodings, tuple(nfes)

    def __call__(self, trial) -> dict[str, Any]:
        nfe = trial.suggest_categorical("nfe", list(self.nfes)) if len(self.nfes) > 1 else self.nfes[0]
        return {"nfe": nfe, **self.encodings[nfe].suggest(trial)}


def _capped(value: float) -> float:
    """Optuna's samplers cannot learn from inf: a diverged schedule is told a huge finite value."""
    return value if math.isfinite(value) else 1e12
