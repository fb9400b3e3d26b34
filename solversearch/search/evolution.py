"""Evolution and S³ over continuous schedules: one breeding routine, with or without a predictor.

Generation 0 (stage 0) is the warm-start schedules and the presets at the search's NFE, then mutants of
the best of them. Each later generation is bred by `breed` — a crossover of two picks or a mutation of
one — from tournament picks among the true results (evolution), or screened by a performance predictor
from a larger predictor-scored evolution (S³), whose hybrid also refines each generation's best.

The same seed gives the same study whatever the concurrency and the order in which trials finish: a
whole generation is planned at once, at a barrier (no trial of the previous generation pending), from
the *set* of results (canonical order, ties broken by key), with a generator derived from (seed,
generation). A searcher rebuilt from history re-plans the current generation identically and skips
what was already evaluated.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..grids import grid_applies, scheduler_grid
from ..inference import check_family
from ..noise import NoiseSchedule
from ..predictor import GradientBoostingPredictor, RankingPredictor, kendall_tau
from ..presets import PRESETS, build
from ..schedule import SolverSchedule, load_schedule
from .base import (
    Observation,
    Proposal,
    ScheduleSearcher,
    best_of,
    canonical_order,
    is_refinement,
    refinement_key,
)
from .operators import ScheduleOperators
from .refine import refinement_settings
from .space import SearchSpace

DEFAULT_STAGE0_PRESETS = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_2_bh1", "unipc_2_bh2", "unipc_3_bh2", "deis_3")


def breed(
    ops: ScheduleOperators,
    rng: np.random.Generator,
    pick: Callable[[], SolverSchedule],
    crossover_rate: float,
) -> SolverSchedule:
    """One child: with probability `crossover_rate` the crossover of two picks, else a mutation (one or
    two edits) of one. `pick` chooses a parent (a tournament, or a draw from the predicted best); the
    draws come from `rng` in a fixed order, so a generation re-planned from the same results is the same."""
    a = pick()
    if rng.random() < crossover_rate:
        return ops.crossover(a, pick(), rng)
    return ops.mutate(a, rng, strength=int(rng.integers(1, 3)))


def load_warm_start(paths: str | Sequence[str] | None, nfe: int, noise: NoiseSchedule) -> tuple[SolverSchedule, ...]:
    """The schedules of `algorithm.settings.warm_start` (a schedule JSON file or a list of them), which join
    stage 0 beside the presets. Each must parse, be made for the search's family of noise paths and have
    its NFE; its metrics and provenance belong to the checkpoint it was searched on and are left behind."""
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


class EvolutionSearcher(ScheduleSearcher):
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

    def _stage0_queue(
        self, presets: Sequence[str], grids: Sequence[str], warm_start: Sequence[SolverSchedule] = ()
    ) -> tuple[list[Proposal], set[str]]:
        """Stage 0: proposals for the warm starts and the presets at this NFE not yet evaluated (the warm
        starts first), and the keys of all of them."""
        noise, nfe = self.ops.noise, self.ops.nfe
        schedules = list(warm_start)
        schedules += [build(name, noise, nfe, grid) for grid in grids if grid_applies(grid, noise) for name in presets]
        queue, keys = [], set()
        for schedule in schedules:
            key = self.ops.canonical_key(schedule)
            if key not in keys and key not in self.known:
                queue.append(Proposal(schedule, key, 0))
            keys.add(key)
        return queue, keys

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
        known = canonical_order(
            o for o in self.observations if not self._own(o) or (o.stage == 0 and o.key in self.preset_keys)
        )
        self.rng = self._generation_rng(0)
        taken = {o.key for o in known} | self.preset_keys
        parents = best_of(known, 3) or known[:3]
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
        return canonical_order(o for o in self.observations if not self._own(o) or o.stage < stage)

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
        return breed(self.ops, self.rng, lambda: self._select(pool), self.crossover_rate)

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
            if self.ops.canonical_key(schedule) not in taken and self._diverse(schedule, chosen):
                chosen.append(self._take(schedule, self.stage, taken))
        # A few plain mutations of the true best keep the search honest where the predictor is wrong.
        parents = best_of(known, max(3, self.k))
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
        seeds = [self._into_space(o.schedule) for o in best_of(known, self.population // 2)]
        population = seeds + [self.ops.random(self.rng) for _ in range(self.population - len(seeds))]
        scores = list(model.predict(population))
        seen = {self.ops.canonical_key(s) for s in population}
        generations = max(1, self.pool // self.population)
        for _ in range(generations):
            order = np.argsort(scores, kind="stable")
            parents = [population[i] for i in order[: max(2, self.population // 2)]]
            children = []
            for _ in range(self.population):
                child = breed(
                    self.ops,
                    self.rng,
                    lambda parents=parents: parents[int(self.rng.integers(len(parents)))],
                    self.crossover_rate,
                )
                key = self.ops.canonical_key(child)
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
        self.refine_settings = refinement_settings(refine, space)

    def _plan_stage(self) -> list[Proposal]:
        known = self._planning_set(self.stage)
        refined = {o.key for o in known if is_refinement(o.key)}
        parents = [
            o
            for o in best_of([o for o in known if not is_refinement(o.key)], len(known))
            if refinement_key(o.key) not in refined
        ]
        refinements = [
            Proposal(o.schedule, refinement_key(o.key), self.stage, refine=True) for o in parents[: self.refine_top]
        ]
        return refinements + super()._plan_stage()


def _finite_or_large(values: Sequence[float]) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    ceiling = (max(finite) * 10 + 1) if finite else 1.0
    return [v if math.isfinite(v) else ceiling for v in values]
