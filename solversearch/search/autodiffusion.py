"""AutoDiffusion's two-stage generational loop over integer timesteps and per-step skipped network blocks.

Stage 1 searches the timesteps only; stage 2 ramps the allowed share of skipped units per step up to
the space's maximum, so pruning can buy extra steps within a MAC budget (that of the NFE budget
unpruned). The moves themselves are `operators.TimestepOperators`; this module is the population,
elite archive, mutants and crossovers of each generation. Unlike the public code every candidate is
scored on the same noise, and the result is a schedule file.

Each generation is bred whole, once the previous one is scored, from the set of results of the earlier
generations (canonical order) with a generator derived from (seed, generation): the study does not
depend on concurrency nor on the order trials finish, and a resumed search replays the planning of its
generations from history (cheap: no model is trained) and skips the schedules already evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..noise import DiscreteVP, NoiseSchedule
from ..schedule import SolverSchedule
from .base import Observation, Proposal, ScheduleSearcher, best_of, canonical_order
from .operators import TimestepOperators
from .space import SearchSpace


class AutoDiffusionSearcher(ScheduleSearcher):
    """AutoDiffusion's evolution (population, elite archive, mutants, crossovers, two stages)."""

    algorithm = "autodiffusion"

    def __init__(
        self,
        space: SearchSpace,
        nfe: int,
        noise: NoiseSchedule,
        *,
        costs: Any = None,
        population: int = 50,
        elites: int = 10,
        mutants: int = 25,
        crossovers: int = 15,
        generations: Sequence[int] = (10, 10),
        min_first_step: float = 0.5,
        **kwargs: Any,
    ):
        if not isinstance(noise, DiscreteVP):
            raise SolversearchError(
                "autodiffusion searches integer training timesteps: it needs a discrete (diffusers) model"
            )
        if space.solver is None:
            raise SolversearchError(
                "autodiffusion needs a space with a fixed solver (e.g. search_spaces/autodiffusion.yaml)"
            )
        if costs is None:
            raise SolversearchError("autodiffusion needs the model's per-unit MACs (a diffusers UNet)")
        units = tuple(space.skip.units or costs.units) if space.skip else ()
        super().__init__(space, nfe, noise, **kwargs)
        self.ops: TimestepOperators = TimestepOperators(space, nfe, noise, costs, units, min_first_step)
        self.max_ratio = space.skip.max_ratio if space.skip else 0.0
        self.population, self.elites = population, elites
        self.mutants, self.crossovers = mutants, crossovers
        self.generations = tuple(generations)
        self.generation = 0  # generations bred so far; a rebuilt searcher re-breeds them from history
        self.batch: list[Proposal] = []
        self.bred: set[str] = set()  # keys of every generation bred so far: their results are the parents
        self.stage = 1

    # --- the generational loop -----------------------------------------------------------------

    def _propose(self):
        while True:
            proposal = self._next_unknown(self.batch)
            if proposal is not None:
                return proposal
            if self.pending:
                return None  # a generation is scored before the next is bred
            if self.generation >= sum(self.generations):
                return Searcher.FINISHED
            # Bred from the results of the earlier generations and others' (the baseline pool): not from
            # those of this generation a resumed search already has, so it breeds the same one again.
            parents = canonical_order(o for o in self.observations if not self._own(o) or o.key in self.bred)
            self.batch = self._breed(parents)
            self.bred.update(p.key for p in self.batch)
            self.generation += 1
            if not self.batch:
                return Searcher.FINISHED

    def allowed_ratio(self) -> float:
        """0 in stage 1; in stage 2 it ramps linearly to the maximum over its generations."""
        first, second = self.generations[0], max(1, self.generations[1])
        if self.generation < first:
            return 0.0
        return self.max_ratio * min(1.0, (self.generation - first + 1) / second)

    def _breed(self, parents: list[Observation]) -> list[Proposal]:
        self.stage = 1 if self.generation < self.generations[0] else 2
        self.rng = self._generation_rng(self.generation)
        rng, out = self.rng, []
        taken = {o.key for o in parents}

        def add(schedule: SolverSchedule) -> None:
            proposal = self._take(schedule, self.stage, taken)
            if proposal is not None:
                out.append(proposal)

        elites = [o.schedule for o in best_of(parents, self.elites)]
        if self.generation == 0 or not elites:  # the initial population: grids of the space plus random timesteps
            initial = self.ops.with_skip_ratio(0.0)
            for grid in self.ops.space.timesteps.init_grids:
                add(initial.from_grid(grid, rng))
            for _ in range(10 * self.population):
                if len(out) >= self.population:
                    break
                add(initial.random(rng))
            return out
        ops = self.ops.with_skip_ratio(self.allowed_ratio())
        for _ in range(20 * (self.mutants + self.crossovers)):
            if len(out) >= self.mutants + self.crossovers:
                break
            if len(out) < self.mutants:
                add(ops.mutate(elites[int(rng.integers(len(elites)))], rng))
            else:
                i, j = rng.choice(len(elites), size=2, replace=len(elites) < 2)
                add(ops.crossover(elites[int(i)], elites[int(j)], rng))
        return out
