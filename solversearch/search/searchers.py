"""Search algorithms as Ray Tune Searchers: s3 (predictor-guided), evolution, random, and Optuna's samplers.

Every searcher proposes one schedule per trial (`suggest` → {"schedule": …, "key": …, "stage": …}),
learns from `on_trial_complete`, never proposes a schedule whose canonical key it has seen, and can
be rebuilt from stored evaluations (`history=`) — that is how a search resumes from its study.
`save`/`restore` pickle the whole state, RNGs included, so a restored searcher continues identically.
They are plain Python objects: `drive()` runs one without Ray.

The same seed gives the same study whatever the concurrency and the order in which trials finish:
s3, evolution and autodiffusion plan a whole generation at once, at a barrier (no trial of the previous
generation pending), from the *set* of results (sorted canonically, ties broken by key), with a
generator derived from (seed, generation). A searcher rebuilt from history re-plans the current
generation identically and skips what was already evaluated. Random search draws one fixed stream.
"""

from __future__ import annotations

import math
import pickle
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..grids import grid_applies, scheduler_grid
from ..noise import NoiseSchedule
from ..outputs import atomic_output
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
    algorithm: str = ""  # who proposed it; "" (unknown) counts as this searcher's own


@dataclass
class Proposal:
    """A schedule a searcher hands out for evaluation, with its canonical key and its stage. A
    refinement proposal (`refine`) asks the worker to refine the schedule (refine.py) and evaluate the
    result; its key names the parent (`refinement_key`), since the refined times are not known yet."""

    schedule: SolverSchedule
    key: str
    stage: int
    refine: bool = False


def refinement_key(parent_key: str) -> str:
    """The key of the trial that refines the schedule with canonical key `parent_key`: each schedule
    is refined at most once, and a resumed search knows which were."""
    return f"refine:{parent_key}"


def is_refinement(key: str) -> bool:
    return key.startswith("refine:")


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
        config = {
            "schedule": proposal.schedule.to_dict(),
            "key": proposal.key,
            "stage": proposal.stage,
            "algorithm": self.algorithm,
        }
        if proposal.refine:
            config["refine"] = dict(self.refine_settings)
        return config

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
        schedule = SolverSchedule.from_json(result["refined_schedule"]) if proposal.refine else proposal.schedule
        observation = Observation(schedule, proposal.key, value, proposal.stage, self.algorithm)
        self.observations.append(observation)
        self._observed(observation, proposal)

    def save(self, checkpoint_path: str) -> None:
        with atomic_output(checkpoint_path) as tmp, open(tmp, "wb") as handle:
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

    def _propose(self) -> Proposal | str | None:
        raise NotImplementedError

    def _observed(self, observation: Observation, proposal: Proposal) -> None:
        pass

    def _lost(self, proposal: Proposal) -> None:
        pass

    # --- helpers ------------------------------------------------------------------------------

    def _new(self, schedule: SolverSchedule, stage: int) -> Proposal | None:
        """A proposal unless its key is known. Only for plans that draw nothing at random (the baseline
        pool's): a random plan must de-duplicate with `_take`, or a resumed search would draw differently."""
        key = self.ops.key(schedule)
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

    def best_observations(self, k: int) -> list[Observation]:
        return _best(self.observations, k)

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
        key = self.ops.key(schedule)
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


class RandomSearcher(ScheduleSearcher):
    """Uniformly random schedules of the space (no presets, no learning): the reference point.

    The proposals are one fixed stream of distinct schedules drawn from the seed, minus those already
    known: they depend neither on timing nor on history, and a resumed search continues the stream."""

    algorithm = "random"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.drawn: set[str] = set()  # keys the stream has produced (its own de-duplication)

    def _propose(self):
        while True:
            proposal = None
            for _ in range(50):
                proposal = self._take(self.ops.random(self.rng), 0, self.drawn)
                if proposal is not None:
                    break
            if proposal is None:
                return Searcher.FINISHED  # the stream keeps repeating itself: the space is exhausted
            if proposal.key not in self.known:
                return proposal


class _Stage0Mixin:
    """Stage 0 of s3 and evolution: the warm-start schedules and the preset baselines at this NFE, then
    mutations of the best ones."""

    def _stage0_queue(
        self, presets: Sequence[str], grids: Sequence[str], warm_start: Sequence[SolverSchedule] = ()
    ) -> tuple[list[Proposal], set[str]]:
        """Proposals for the stage-0 schedules not yet evaluated (the warm starts first), and the keys of
        all of them."""
        noise, nfe = self.ops.noise, self.ops.nfe
        schedules = list(warm_start)
        schedules += [build(name, noise, nfe, grid) for grid in grids if grid_applies(grid, noise) for name in presets]
        queue, keys = [], set()
        for schedule in schedules:
            key = self.ops.key(schedule)
            if key not in keys and key not in self.known:
                queue.append(Proposal(schedule, key, 0))
            keys.add(key)
        return queue, keys


def load_warm_start(paths: str | Sequence[str] | None, nfe: int, noise: NoiseSchedule) -> tuple[SolverSchedule, ...]:
    """The schedules of `algorithm.settings.warm_start` (a schedule JSON file or a list of them), which join
    stage 0 beside the presets. Each must parse, be made for the search's family of noise paths and have
    its NFE; its metrics and provenance belong to the checkpoint it was searched on and are left behind."""
    from ..inference import check_family
    from ..schedule import load_schedule

    if paths is None:
        return ()
    listed = [paths] if isinstance(paths, str) else paths
    if not isinstance(listed, (list, tuple)) or not listed or not all(isinstance(p, str) for p in listed):
        raise SolversearchError(f"warm_start: expected a schedule JSON file or a list of them, got {paths!r}")
    schedules = []
    for path in listed:
        try:
            schedule = load_schedule(path)
        except SolversearchError as exc:
            raise SolversearchError(f"warm_start: {exc}") from None
        check_family(schedule, noise, f"warm_start {path}")
        if schedule.nfe != nfe:
            raise SolversearchError(
                f"warm_start {path}: the schedule has NFE {schedule.nfe}, the search NFE {nfe}; warm-start from "
                f"a schedule of NFE {nfe} (or search at --nfe {schedule.nfe})"
            )
        name = schedule.name or Path(path).stem
        schedules.append(
            schedule.with_metadata(
                name=f"warm_start/{name}",
                noise_schedule=noise.to_dict(),
                metrics={},
                provenance={"warm_start": str(path), "searched_on": schedule.model_fingerprint},
                model_fingerprint=None,
            )
        )
    return tuple(schedules)


class EvolutionSearcher(_Stage0Mixin, ScheduleSearcher):
    """Evolution with the s3 operators but no predictor (the ablation): every child is truly evaluated.

    Generation 0 is stage 0: the warm-start schedules (`warm_start`: schedule files, e.g. the winner of a
    search on another checkpoint) and the presets, then `stage0_mutants` mutations of the best results. Each later
    generation (stage) of `k` children comes from tournament-selected parents among all results of the
    earlier generations, by mutation (probability 1 − crossover) or crossover. A generation is planned
    whole once every trial of the previous one has finished.
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
        warm_start: str | Sequence[str] | None = None,
        **kwargs: Any,
    ):
        super().__init__(space, nfe, noise, **kwargs)
        self.k, self.crossover_rate, self.tournament = k, crossover, tournament
        self.stage0_mutants = stage0_mutants
        grids = stage0_grids or tuple(space.timesteps.init_grids) + (scheduler_grid(noise),)
        unknown = [p for p in stage0_presets if p not in PRESETS]
        if unknown:
            raise SolversearchError(f"stage0_presets: unknown presets {unknown}")
        # Warm starts are stage-0 schedules like the presets: the mutants are bred from the best of them all.
        self.warm_start = load_warm_start(warm_start, nfe, noise)
        self.queue, self.preset_keys = self._stage0_queue(stage0_presets, grids, self.warm_start)
        # Resuming: the presets already evaluated are skipped, and the search re-plans its last stage
        # (from the results of the stages before it, so identically) and skips what was evaluated.
        last = max((o.stage for o in self.observations if self._own(o)), default=0)
        self.stage = max(0, last - 1)  # the stage planned last: the next plan is `last`
        self.mutants_planned = last > 0
        self.finished = False

    def _propose(self):
        while not self.finished:
            proposal = self._next_unknown(self.queue)
            if proposal is not None:
                return proposal
            if self.pending:
                return None  # generation barrier: the next plan needs every result of this one
            plan = self._plan_next()
            if plan is None:
                self.finished = True
            else:
                self.queue = plan
        return Searcher.FINISHED

    def _plan_next(self) -> list[Proposal] | None:
        """The next generation's proposals; None when no new schedule can be found."""
        if not self.mutants_planned:
            self.mutants_planned = True
            return self._plan_mutants()
        self.stage += 1
        return self._plan_stage() or None

    def _plan_mutants(self) -> list[Proposal]:
        """Stage 0's mutants of the best presets and known results. Earlier mutants are left out of the
        parents: a search resumed among them must breed the same ones."""
        known = _canonical(
            o for o in self.observations if not self._own(o) or (o.stage == 0 and o.key in self.preset_keys)
        )
        self.rng = self._generation_rng(0)
        taken = {o.key for o in known} | self.preset_keys
        parents = _best(known, 3) or known[:3]
        plan = []
        for _ in range(self.stage0_mutants if parents else 0):
            proposal = self._unique_variant(
                lambda: self.ops.mutate(parents[int(self.rng.integers(len(parents)))].schedule, self.rng), 0, taken
            )
            if proposal is not None:
                plan.append(proposal)
        return plan

    def _planning_set(self, stage: int) -> list[Observation]:
        """What generation `stage` is planned from, in canonical order: every result of the earlier
        stages and every known result not this searcher's (the baseline pool)."""
        return _canonical(o for o in self.observations if not self._own(o) or o.stage < stage)

    def _plan_stage(self) -> list[Proposal]:
        self.rng = self._generation_rng(self.stage)
        known = self._planning_set(self.stage)
        pool = [o for o in known if math.isfinite(o.value)] or known
        taken = {o.key for o in known} | self.preset_keys
        plan: list[Proposal] = []
        while pool and len(plan) < self.k:
            proposal = self._unique_variant(lambda: self._child(pool), self.stage, taken)
            if proposal is None:
                break
            plan.append(proposal)
        return plan

    def _child(self, pool: list[Observation]) -> SolverSchedule:
        a = self._select(pool)
        if self.rng.random() < self.crossover_rate:
            return self.ops.crossover(a, self._select(pool), self.rng)
        return self.ops.mutate(a, self.rng, strength=int(self.rng.integers(1, 3)))

    def _select(self, pool: list[Observation]) -> SolverSchedule:
        contenders = [pool[int(i)] for i in self.rng.integers(len(pool), size=min(self.tournament, len(pool)))]
        best = min(contenders, key=lambda o: (o.value, o.key))
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
        self.kendall_taus: dict[int, float] = {}  # stage → held-out τ of the predictor that planned it

    def _plan_stage(self) -> list[Proposal]:
        from ..predictor import GradientBoostingPredictor, RankingPredictor, kendall_tau

        started = time.perf_counter()
        self.rng = self._generation_rng(self.stage)
        known = self._planning_set(self.stage)  # canonical order: the split and the fits do not depend on arrival
        taken = {o.key for o in known} | self.preset_keys
        schedules = [o.schedule for o in known]
        values = [o.value for o in known]
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
        candidates = self._evolve(model, known)
        chosen: list[Proposal] = []
        n_explore = round(self.explore * self.k)
        for schedule, _score in candidates:
            if len(chosen) >= self.k - n_explore:
                break
            if self.ops.key(schedule) not in taken and self._diverse(schedule, chosen):
                chosen.append(self._take(schedule, self.stage, taken))
        # A few plain mutations of the true best keep the search honest where the predictor is wrong.
        parents = _best(known, max(3, self.k))
        while len(chosen) < self.k and parents:
            parent = parents[int(self.rng.integers(len(parents)))].schedule
            proposal = self._unique_variant(
                lambda parent=parent: self.ops.mutate(self._into_space(parent), self.rng), self.stage, taken
            )
            if proposal is None:
                break
            chosen.append(proposal)
        self.timings["predictor_seconds"] += time.perf_counter() - started
        return chosen

    def _evolve(self, model, known: list[Observation]) -> list[tuple[SolverSchedule, float]]:
        """Predictor-scored evolution from the best evaluated schedules; returns candidates best first."""
        seeds = [self._into_space(o.schedule) for o in _best(known, self.population // 2)]
        population = seeds + [self.ops.random(self.rng) for _ in range(self.population - len(seeds))]
        scores = list(model.predict(population))
        seen = {self.ops.key(s) for s in population}
        generations = max(1, self.pool // self.population)
        for _ in range(generations):
            order = np.argsort(scores, kind="stable")
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

    def _diverse(self, schedule: SolverSchedule, chosen: list[Proposal], min_distance: float = 0.02) -> bool:
        """Reject a candidate whose decisions equal a chosen one's and whose λ grid is within min_distance."""
        lams = self.ops.noise.lambda_(np.array([t for t in schedule.timesteps if t > 0]))
        for other in chosen:
            o = other.schedule
            if (
                o.steps != schedule.steps
                or o.first_step != schedule.first_step
                or o.timesteps[-1] != schedule.timesteps[-1]
            ):
                continue
            other_lams = self.ops.noise.lambda_(np.array([t for t in o.timesteps if t > 0]))
            if len(other_lams) == len(lams) and float(np.max(np.abs(other_lams - lams))) < min_distance:
                return False
        return True


class HybridS3Searcher(S3Searcher):
    """S³ with gradient refinement: every generation after stage 0 also refines the `refine_top` best
    schedules evaluated so far that were not refined yet (the baseline pool's best included; refined
    results are not refined again). Each refinement is one trial: a worker learns the parent's times
    and step factors against the teacher (refine.py) and truly evaluates the result, which is stored as
    its own trial with its parent's key and its refinement's cost and loss curve. S³ then breeds from
    refined schedules like any other: the discrete decisions are searched, the continuous ones learned."""

    algorithm = "s3_refine"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        refine_top: int = 2,
        refine: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        if isinstance(refine_top, bool) or not isinstance(refine_top, int) or refine_top < 1:
            raise SolversearchError(f"algorithm 's3_refine': refine_top must be a positive integer, got {refine_top!r}")
        super().__init__(space, nfe, noise, **kwargs)
        self.refine_top = refine_top
        self.refine_settings = _refine_settings(refine, space)

    def _plan_stage(self) -> list[Proposal]:
        known = self._planning_set(self.stage)
        refined = {o.key for o in known if is_refinement(o.key)}
        parents = [
            o
            for o in _best([o for o in known if not is_refinement(o.key)], len(known))
            if refinement_key(o.key) not in refined
        ]
        refinements = [
            Proposal(o.schedule, refinement_key(o.key), self.stage, refine=True) for o in parents[: self.refine_top]
        ]
        return refinements + super()._plan_stage()


class RefineSearcher(ScheduleSearcher):
    """Refine given schedules, the LD3 setting: one trial per schedule, no search. The schedules are
    `schedules` (JSON files) and `presets` ("name/grid" at the search's NFE), or by default the `top`
    best schedules already in the study (the baseline pool's best: the best hand-designed solver)."""

    algorithm = "refine"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        schedules: Sequence[str] = (),
        presets: Sequence[str] = (),
        top: int = 1,
        refine: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ):
        from ..schedule import load_schedule

        super().__init__(space, nfe, noise, **kwargs)
        self.refine_settings = _refine_settings(refine, space)
        parents = [load_schedule(path) for path in schedules]
        for text in presets:
            name, _, grid = str(text).partition("/")
            parents.append(build(name, noise, nfe, grid or "logsnr"))
        wrong = [p.name or "(unnamed)" for p in parents if p.nfe != nfe]
        if wrong:
            raise SolversearchError(f"algorithm 'refine': {wrong} do not have NFE {nfe}")
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise SolversearchError(f"algorithm 'refine': top must be a positive integer, got {top!r}")
        self.top = top
        self.queue = [self._proposal(p) for p in parents]
        self.planned = bool(parents)  # if not, the parents are the study's best, once the search starts

    def _proposal(self, parent: SolverSchedule) -> Proposal:
        return Proposal(parent, refinement_key(self.ops.key(parent)), 1, refine=True)

    def _propose(self):
        if not self.planned:  # by default the best already in the study: the baseline pool runs before any search
            best = _best((o for o in self.observations if not is_refinement(o.key)), self.top)
            if not best:
                raise SolversearchError(
                    "algorithm 'refine' has nothing to refine: give settings schedules or presets, "
                    "or a study with evaluations"
                )
            self.queue, self.planned = [self._proposal(o.schedule) for o in best], True
        return self._next_unknown(self.queue) or Searcher.FINISHED


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
            study = optuna.create_study(
                storage=storage, study_name="search", directions=["minimize"] * len(self.metrics)
            )
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
            self.pending[trial_id] = Proposal(schedule, key, stage=0)
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


SEARCHERS: dict[str, type[ScheduleSearcher]] = {
    "s3": S3Searcher,
    "s3_refine": HybridS3Searcher,
    "evolution": EvolutionSearcher,
    "random": RandomSearcher,
    "refine": RefineSearcher,
}
REFINING = ("s3_refine", "refine")
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
            searcher = AutoDiffusionSearcher(
                space, nfe, noise, costs=costs, seed=seed, metric=metric, history=history, **settings
            )
        except TypeError as exc:
            raise SolversearchError(f"algorithm 'autodiffusion': bad settings ({exc})") from None
        return searcher
    if algorithm in OPTUNA_SAMPLERS:
        if settings:
            raise SolversearchError(f"algorithm {algorithm!r} takes no settings, got {sorted(settings)}")
        return OptunaScheduleSearcher(
            space,
            nfe,
            noise,
            sampler=algorithm,
            metric=metric,
            seed=seed,
            history=history,
            history_values=history_values,
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
    refine: Callable[[SolverSchedule, dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """Run a searcher in-process, one evaluation at a time; returns the number of evaluations.
    `refine(schedule, settings)` runs refinement trials (trainable.refinement_result)."""
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
        searcher.on_trial_complete(trial_id, result)
        if on_result is not None:
            on_result(config, result)
        done += 1
    return done


def _refine_settings(refine: Mapping[str, Any] | None, space: SearchSpace) -> dict[str, Any]:
    """Refinement settings as plain data for the trial config, checked by building them once. The end
    time moves within the space's range of positive end times unless `end_range` says otherwise."""
    from ..refine import RefineSettings

    if refine is not None and not isinstance(refine, Mapping):
        raise SolversearchError(f"refine: expected a mapping of refinement settings, got {refine!r}")
    settings = dict(refine or {})
    if "device" in settings:
        raise SolversearchError("refine.device: a worker refines on the device it evaluates on")
    ends = [t for t in space.timesteps.t_end if t > 0]
    if "end_range" in settings:
        settings["end_range"] = tuple(settings["end_range"])
    elif ends:
        low = min(min(ends), space.timesteps.t_min)
        settings["end_range"] = (low, max(ends)) if max(ends) > low else None
    try:
        RefineSettings(**settings)
    except TypeError as exc:
        raise SolversearchError(f"refine: bad settings ({exc})") from None
    return settings


def _value(result: Mapping[str, Any], metric: str) -> float:
    value = result.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)) or result.get("diverged"):
        return math.inf
    return float(value)


def _canonical(observations: Iterable[Observation]) -> list[Observation]:
    """Observations in an order that does not depend on when their trials finished."""
    return sorted(
        observations, key=lambda o: (o.stage, o.key, o.algorithm, math.inf if math.isnan(o.value) else o.value)
    )


def _best(observations: Iterable[Observation], k: int) -> list[Observation]:
    """The k best finite results, ties broken by key."""
    return sorted((o for o in observations if math.isfinite(o.value)), key=lambda o: (o.value, o.key))[:k]


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
