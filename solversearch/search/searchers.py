"""Search algorithms as Ray Tune Searchers: s3 (predictor-guided), evolution, random, and Optuna's samplers.

Every searcher proposes one schedule per trial (`suggest` → {"schedule": …, "key": …, "stage": …}),
learns from `on_trial_complete`, never proposes a schedule whose canonical key it has seen, and can
be rebuilt from stored evaluations (`history=`) — that is how a search resumes from its study.
`save`/`restore` pickle the whole state, RNGs included, so a restored searcher continues identically.
They are plain Python objects: `drive()` runs one without Ray.
"""

from __future__ import annotations

import math
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..noise import DiscreteVP, NoiseSchedule
from ..presets import PRESETS, build
from ..schedule import SolverSchedule
from .encoding import ScheduleEncoding
from .operators import Operators
from .space import SearchSpace

DEFAULT_STAGE0_PRESETS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_2_bh1", "unipc_2_bh2", "unipc_3_bh2", "deis_3")


@dataclass(frozen=True)
class Observation:
    """One evaluated schedule as a searcher sees it."""

    schedule: SolverSchedule
    key: str
    value: float  # the metric; inf for diverged or failed
    stage: int


@dataclass
class _Proposal:
    schedule: SolverSchedule
    key: str
    stage: int


class ScheduleSearcher(Searcher):
    """Shared machinery: proposals, de-duplication, history, the trial config, save/restore."""

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
        self.ops = Operators(space, nfe, noise)
        self.encoding = ScheduleEncoding(self.ops)
        self.rng = np.random.default_rng(seed)
        self.observations: list[Observation] = []
        self.known: set[str] = set()
        self.pending: dict[str, _Proposal] = {}
        self.stage = 0
        self.n_units: int | None = None  # the model's prunable units, when the space skips blocks
        self.timings: dict[str, float] = {"predictor_seconds": 0.0}
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
        return {"schedule": proposal.schedule.to_dict(), "key": proposal.key, "stage": proposal.stage, "algorithm": self.algorithm}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        proposal = self.pending.pop(trial_id, None)
        if proposal is None:
            return
        if error or not result:
            # The evaluation was lost (a worker died): forget the key so it can be proposed again.
            self.known.discard(proposal.key)
            self._lost(proposal)
            return
        value = _value(result, self.metric)
        observation = Observation(proposal.schedule, proposal.key, value, proposal.stage)
        self.observations.append(observation)
        self._observed(observation, proposal)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))

    def use_units(self, units: Sequence[str]) -> None:
        """The model's prunable units: operators may then skip them (spaces with `skip:`)."""
        self.ops = Operators(self.ops.space, self.ops.nfe, self.ops.noise, units)
        self.encoding = ScheduleEncoding(self.ops)
        self.n_units = len(units)

    # --- hooks for subclasses -----------------------------------------------------------------

    def _propose(self) -> _Proposal | str | None:
        raise NotImplementedError

    def _observed(self, observation: Observation, proposal: _Proposal) -> None:
        pass

    def _lost(self, proposal: _Proposal) -> None:
        pass

    # --- helpers ------------------------------------------------------------------------------

    def _new(self, schedule: SolverSchedule, stage: int) -> _Proposal | None:
        key = self.ops.key(schedule)
        if key in self.known:
            return None
        return _Proposal(schedule, key, stage)

    def _unique_variant(self, make: Callable[[], SolverSchedule], stage: int, attempts: int = 50) -> _Proposal | None:
        for _ in range(attempts):
            proposal = self._new(make(), stage)
            if proposal is not None:
                return proposal
        return None

    def best_observations(self, k: int) -> list[Observation]:
        finite = [o for o in self.observations if math.isfinite(o.value)]
        return sorted(finite, key=lambda o: o.value)[:k]


class RandomSearcher(ScheduleSearcher):
    """Uniformly random schedules of the space (no presets, no learning): the reference point."""

    algorithm = "random"

    def _propose(self):
        proposal = self._unique_variant(lambda: self.ops.random(self.rng), stage=0)
        return proposal if proposal is not None else Searcher.FINISHED


class _Stage0Mixin:
    """Stage 0 of s3 and evolution: the preset baselines at this NFE, then mutations of the best ones."""

    def _stage0_queue(self, presets: Sequence[str], grids: Sequence[str]) -> tuple[list[_Proposal], set[str]]:
        """Proposals for the presets not yet evaluated, and the keys of all stage-0 presets."""
        noise, nfe = self.ops.noise, self.ops.nfe
        queue, keys = [], set()
        for grid in grids:
            if grid in ("linspace", "leading", "trailing") and not isinstance(noise, DiscreteVP):
                continue
            for name in presets:
                schedule = build(name, noise, nfe, grid)
                key = self.ops.key(schedule)
                if key not in keys and key not in self.known:
                    queue.append(_Proposal(schedule, key, 0))
                keys.add(key)
        return queue, keys


class EvolutionSearcher(_Stage0Mixin, ScheduleSearcher):
    """Evolution with the s3 operators but no predictor (the ablation): every child is truly evaluated.

    After stage 0, each generation of `k` children comes from tournament-selected parents among all
    evaluated schedules, by mutation (probability 1 − crossover) or crossover.
    """

    algorithm = "evolution"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        k: int = 8,
        stage0_presets: Sequence[str] = DEFAULT_STAGE0_PRESETS,
        stage0_grids: Sequence[str] | None = None,
        stage0_mutants: int = 8,
        crossover: float = 0.3,
        tournament: int = 3,
        **kwargs: Any,
    ):
        super().__init__(space, nfe, noise, **kwargs)
        self.k, self.crossover_rate, self.tournament = k, crossover, tournament
        self.stage0_mutants = stage0_mutants
        grids = stage0_grids or tuple(space.timesteps.init_grids) + ("trailing",)
        unknown = [p for p in stage0_presets if p not in PRESETS]
        if unknown:
            raise SolversearchError(f"stage0_presets: unknown presets {unknown}")
        # Resuming: presets already evaluated are skipped, and so are the stage-0 mutants already made.
        self.queue, preset_keys = self._stage0_queue(stage0_presets, grids)
        made = sum(1 for o in self.observations if o.stage == 0 and o.key not in preset_keys)
        self.mutants_left = max(0, stage0_mutants - made)
        self.stage = max((o.stage for o in self.observations), default=0)
        self.in_stage = sum(1 for o in self.observations if o.stage == self.stage) if self.stage > 0 else 0

    def _propose(self):
        if self.queue:
            return self.queue.pop(0)
        if self.mutants_left > 0:
            if self.pending:
                return None  # the mutants need the presets' results
            self.mutants_left -= 1
            parents = self.best_observations(3)
            proposal = self._unique_variant(lambda: self.ops.mutate(parents[int(self.rng.integers(len(parents)))].schedule, self.rng), 0)
            return proposal if proposal is not None else self._propose()
        if self.stage == 0:
            self.stage = 1
        if self.in_stage >= self.k:
            self.stage, self.in_stage = self.stage + 1, 0
        self.in_stage += 1
        proposal = self._unique_variant(self._child, self.stage)
        return proposal if proposal is not None else Searcher.FINISHED

    def _child(self) -> SolverSchedule:
        a = self._select()
        if self.rng.random() < self.crossover_rate:
            return self.ops.crossover(a, self._select(), self.rng)
        return self.ops.mutate(a, self.rng, strength=int(self.rng.integers(1, 3)))

    def _select(self) -> SolverSchedule:
        pool = [o for o in self.observations if math.isfinite(o.value)] or self.observations
        contenders = [pool[int(i)] for i in self.rng.integers(len(pool), size=min(self.tournament, len(pool)))]
        best = min(contenders, key=lambda o: o.value)
        return self._into_space(best.schedule)

    def _into_space(self, schedule: SolverSchedule) -> SolverSchedule:
        return self.ops.project(schedule)


class S3Searcher(EvolutionSearcher):
    """USF's S³ done properly: a performance predictor, retrained on every evaluated schedule at each
    stage, screens `pool` evolved candidates and sends the `k` best (diverse, de-duplicated) to true
    evaluation. Kendall τ between the predictor's scores and the true metric of each stage's
    candidates is recorded (held-out: the predictor never saw them)."""

    algorithm = "s3"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        pool: int = 2000,
        population: int = 64,
        predictor: str = "ranking",
        explore: float = 0.25,
        **kwargs: Any,
    ):
        super().__init__(space, nfe, noise, **kwargs)
        self.pool, self.population, self.predictor_kind, self.explore = pool, population, predictor, explore
        self.stage_queue: list[_Proposal] = []
        self.kendall_taus: dict[int, float] = {}  # stage → held-out τ of the predictor that planned it

    def _propose(self):
        if self.queue or self.mutants_left > 0:
            return super()._propose()
        if not self.stage_queue:
            if self.pending:
                return None  # stage barrier: the next stage trains on this stage's results
            self.stage = max(self.stage, 0) + 1
            self.stage_queue = self._plan_stage()
            if not self.stage_queue:
                return Searcher.FINISHED
        return self.stage_queue.pop(0)

    def _plan_stage(self) -> list[_Proposal]:
        from ..predictor import GradientBoostingPredictor, RankingPredictor, kendall_tau

        started = time.perf_counter()
        schedules = [o.schedule for o in self.observations]
        values = [o.value for o in self.observations]
        kind = RankingPredictor if self.predictor_kind == "ranking" else GradientBoostingPredictor

        def fit(indices):
            predictor = kind(self.ops.noise, n_units=self.n_units, seed=int(self.rng.integers(2**31)))
            return predictor.fit([schedules[i] for i in indices], [values[i] for i in indices])

        if len(schedules) >= 10:
            # Held-out quality of the predictor at this stage: fit on 80 % of the evaluated schedules,
            # rank the other 20 % (the candidates it then selects are no fair test: they are its favourites).
            order = self.rng.permutation(len(schedules))
            held_out, train = order[: len(order) // 5], order[len(order) // 5 :]
            predicted = fit(train).predict([schedules[i] for i in held_out])
            self.kendall_taus[self.stage] = kendall_tau(predicted, _finite_or_large([values[i] for i in held_out]))
        model = fit(range(len(schedules)))
        candidates = self._evolve(model)
        chosen: list[_Proposal] = []
        n_explore = int(round(self.explore * self.k))
        for schedule, _score in candidates:
            if len(chosen) >= self.k - n_explore:
                break
            proposal = self._new(schedule, self.stage)
            if proposal is not None and proposal.key not in {p.key for p in chosen} and self._diverse(schedule, chosen):
                chosen.append(proposal)
        # A few plain mutations of the true best keep the search honest where the predictor is wrong.
        parents = self.best_observations(max(3, self.k))
        while len(chosen) < self.k and parents:
            parent = parents[int(self.rng.integers(len(parents)))].schedule
            proposal = self._unique_variant(lambda parent=parent: self.ops.mutate(self._into_space(parent), self.rng), self.stage)
            if proposal is None:
                break
            if proposal.key not in {p.key for p in chosen}:
                chosen.append(proposal)
        self.timings["predictor_seconds"] += time.perf_counter() - started
        return chosen

    def _evolve(self, model) -> list[tuple[SolverSchedule, float]]:
        """Predictor-scored evolution from the best evaluated schedules; returns candidates best first."""
        seeds = [self._into_space(o.schedule) for o in self.best_observations(self.population // 2)]
        population = seeds + [self.ops.random(self.rng) for _ in range(self.population - len(seeds))]
        scores = list(model.predict(population))
        seen = {self.ops.key(s) for s in population}
        generations = max(1, self.pool // self.population)
        for _ in range(generations):
            order = np.argsort(scores)
            parents = [population[i] for i in order[: max(2, self.population // 2)]]
            children = []
            for _ in range(self.population):
                a = parents[int(self.rng.integers(len(parents)))]
                if self.rng.random() < self.crossover_rate:
                    child = self.ops.crossover(a, parents[int(self.rng.integers(len(parents)))], self.rng)
                else:
                    child = self.ops.mutate(a, self.rng, strength=int(self.rng.integers(1, 3)))
                key = self.ops.key(child)
                if key not in seen:
                    seen.add(key)
                    children.append(child)
            if not children:
                break
            child_scores = list(model.predict(children))
            merged = sorted(zip(scores + child_scores, population + children), key=lambda pair: pair[0])
            scores = [s for s, _ in merged[: self.population * 4]]
            population = [p for _, p in merged[: self.population * 4]]
        return [(p, s) for s, p in sorted(zip(scores, population), key=lambda pair: pair[0])]

    def _diverse(self, schedule: SolverSchedule, chosen: list[_Proposal], min_distance: float = 0.02) -> bool:
        """Reject a candidate whose decisions equal a chosen one's and whose λ grid is within min_distance."""
        lams = self.ops.noise.lambda_(np.array([t for t in schedule.timesteps if t > 0]))
        for other in chosen:
            o = other.schedule
            if o.steps != schedule.steps or o.first_step != schedule.first_step or o.timesteps[-1] != schedule.timesteps[-1]:
                continue
            other_lams = self.ops.noise.lambda_(np.array([t for t in o.timesteps if t > 0]))
            if len(other_lams) == len(lams) and float(np.max(np.abs(other_lams - lams))) < min_distance:
                return False
        return True


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
        history_values: Mapping[str, Sequence[float]] | None = None,
    ):
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.nfes = (nfe,) if isinstance(nfe, int) else tuple(nfe)
        super().__init__(space, self.nfes[0], noise, metric=self.metrics[0], seed=seed, history=history)
        self.algorithm = sampler
        self.encodings = {n: ScheduleEncoding(Operators(space, n, noise)) for n in self.nfes}
        samplers = {
            "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True),
            "gp": lambda: optuna.samplers.GPSampler(seed=seed),
            "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed, population_size=16),
        }
        if sampler not in samplers:
            raise SolversearchError(f"unknown Optuna sampler {sampler!r}; expected one of {sorted(samplers)}")
        # Values of every known schedule, by key: answers repeated proposals without re-evaluating.
        self.values_by_key: dict[str, list[float]] = {
            o.key: list((history_values or {}).get(o.key, [o.value] * len(self.metrics))) for o in self.observations
        }
        storage = optuna.storages.InMemoryStorage()
        with _quiet_optuna():
            study = optuna.create_study(storage=storage, study_name="search", directions=["minimize"] * len(self.metrics))
            for observation in self.observations:
                if observation.schedule.nfe not in self.encodings:
                    continue
                params, distributions = self._params_of(observation.schedule)
                values = [_capped(v) for v in self.values_by_key[observation.key]]
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=values))
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

    def _params_of(self, schedule: SolverSchedule):
        params, distributions = self.encodings[schedule.nfe].from_schedule(schedule)
        if len(self.nfes) > 1:
            from optuna.distributions import CategoricalDistribution

            params = {"nfe": schedule.nfe, **params}
            distributions = {"nfe": CategoricalDistribution(list(self.nfes)), **distributions}
        return params, distributions

    def suggest(self, trial_id: str):
        for _ in range(100):
            self.serial += 1
            inner_id = f"inner-{self.serial}"
            with _quiet_optuna(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Define-by-run function")  # GP/TPE fitting happens here
                params = self.inner.suggest(inner_id)
            schedule = self.encodings[params["nfe"]].to_schedule(params)
            key = self.ops.key(schedule)
            if key in self.values_by_key:
                self._tell(inner_id, self.values_by_key[key])  # known: the sampler learns it again, free
                continue
            if key in self.known:
                self._tell(inner_id, None)  # being evaluated by another trial right now
                continue
            self.inner_ids[trial_id] = inner_id
            self.pending[trial_id] = _Proposal(schedule, key, stage=0)
            self.known.add(key)
            return {"schedule": schedule.to_dict(), "key": key, "stage": 0, "algorithm": self.algorithm}
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        inner_id = self.inner_ids.pop(trial_id, None)
        key = self.pending[trial_id].key if trial_id in self.pending else None
        super().on_trial_complete(trial_id, result, error)
        if inner_id is None:
            return
        values = None if error or not result else [_value(result, m) for m in self.metrics]
        if values is not None:
            self.values_by_key[key] = values
        self._tell(inner_id, values)

    def _tell(self, inner_id: str, values: Sequence[float] | None) -> None:
        result = None if values is None else {m: _capped(v) for m, v in zip(self.metrics, values)}
        with _quiet_optuna():
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


SEARCHERS: dict[str, type[ScheduleSearcher]] = {"s3": S3Searcher, "evolution": EvolutionSearcher, "random": RandomSearcher}
OPTUNA_SAMPLERS = ("tpe", "gp", "nsga2")
ALGORITHMS = (*SEARCHERS, "autodiffusion", *OPTUNA_SAMPLERS)


def make_searcher(
    algorithm: str,
    space: SearchSpace,
    nfe: int,
    noise: NoiseSchedule,
    *,
    settings: Mapping[str, Any] | None = None,
    seed: int = 0,
    metric: str | Sequence[str] = "fid",
    history: Iterable[Observation] = (),
    history_values: Mapping[str, Sequence[float]] | None = None,
    units: Sequence[str] = (),
    costs: Any = None,
) -> ScheduleSearcher:
    """The searcher an experiment names, with its settings (unknown settings are user errors).

    `units` (the model's prunable blocks) and `costs` (their MACs) are needed by spaces that skip blocks."""
    settings = dict(settings or {})
    if space.skip is not None and not units and costs is None:
        raise SolversearchError(f"the space {space.name!r} skips network blocks, but the model has no prunable units")
    if algorithm in OPTUNA_SAMPLERS and space.skip is not None:
        raise SolversearchError(f"{algorithm} does not search skip sets; use s3, evolution, random or autodiffusion")
    if algorithm == "autodiffusion":
        from .autodiffusion import AutoDiffusionSearcher

        try:
            searcher = AutoDiffusionSearcher(space, nfe, noise, costs=costs, seed=seed, metric=metric, history=history, **settings)
        except TypeError as exc:
            raise SolversearchError(f"algorithm 'autodiffusion': bad settings ({exc})") from None
        return searcher
    if algorithm in OPTUNA_SAMPLERS:
        if settings:
            raise SolversearchError(f"algorithm {algorithm!r} takes no settings, got {sorted(settings)}")
        return OptunaScheduleSearcher(
            space, nfe, noise, sampler=algorithm, metric=metric, seed=seed, history=history, history_values=history_values
        )
    if algorithm not in SEARCHERS:
        raise SolversearchError(f"unknown algorithm {algorithm!r}; expected one of {list(ALGORITHMS)}")
    if not isinstance(metric, str):
        raise SolversearchError(f"algorithm {algorithm!r} optimises one metric; use nsga2 for several")
    try:
        searcher = SEARCHERS[algorithm](space, nfe, noise, seed=seed, metric=metric, history=history, **settings)
    except TypeError as exc:
        raise SolversearchError(f"algorithm {algorithm!r}: bad settings ({exc})") from None
    if units:
        searcher.use_units(units)
    return searcher


def drive(
    searcher: ScheduleSearcher,
    evaluate: Callable[[SolverSchedule], dict[str, float]],
    budget: int,
    on_result: Callable[[dict[str, Any], dict[str, float]], None] | None = None,
) -> int:
    """Run a searcher in-process, one evaluation at a time; returns the number of evaluations."""
    done = 0
    while done < budget:
        trial_id = f"local-{done}"
        config = searcher.suggest(trial_id)
        if config == Searcher.FINISHED:
            break
        if config is None:
            raise RuntimeError(f"{type(searcher).__name__} waited although every result is in")
        result = evaluate(SolverSchedule.from_dict(config["schedule"]))
        searcher.on_trial_complete(trial_id, result)
        if on_result is not None:
            on_result(config, result)
        done += 1
    return done


def _value(result: Mapping[str, Any], metric: str) -> float:
    value = result.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)) or result.get("diverged"):
        return math.inf
    return float(value)


def _finite_or_large(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    ceiling = (max(finite) * 10 + 1) if finite else 1.0
    return [v if math.isfinite(v) else ceiling for v in values]


class _quiet_optuna:
    """Silence Optuna's per-trial INFO logs, restoring the previous level afterwards."""

    def __enter__(self):
        import optuna

        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc):
        import optuna

        optuna.logging.set_verbosity(self.level)
