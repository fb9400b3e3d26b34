"""AutoDiffusion's two-stage evolution over integer timesteps and per-step skipped network blocks.

Stage 1 searches the timesteps only; stage 2 ramps the allowed share of skipped units per step up to
the space's maximum, so pruning can buy extra steps within a MAC budget (that of the NFE budget
unpruned). Unlike the public code: mutations of times are local moves as well as resets, a skip
mutation always changes the set, crossover never creates duplicate timesteps, every candidate is
scored on the same noise, and the result is a schedule file.

Each generation is bred whole, once the previous one is scored, from the set of results of the earlier
generations (canonical order) with a generator derived from (seed, generation): the study does not
depend on concurrency nor on the order trials finish, and a resumed search replays the planning of its
generations from history (cheap: no model is trained) and skips the schedules already evaluated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..grids import make_grid
from ..noise import DiscreteVP, NoiseSchedule
from ..presets import PRESETS
from ..schedule import SolverSchedule
from .searchers import Observation, Proposal, ScheduleSearcher, _best, _canonical
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
        self.units = units
        self.costs = costs
        self.mac_budget = int(nfe * costs.full)  # the NFE budget, unpruned
        self.max_ratio = space.skip.max_ratio if space.skip else 0.0
        self.population, self.elites = population, elites
        self.mutants, self.crossovers = mutants, crossovers
        self.generations = tuple(generations)
        self.n_train = noise.num_train_timesteps
        self.min_first = int(min_first_step * self.n_train)
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
            parents = _canonical(o for o in self.observations if not self._own(o) or o.key in self.bred)
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
        ratio = self.allowed_ratio()
        out: list[Proposal] = []
        taken = {o.key for o in parents}

        def add(schedule: SolverSchedule) -> None:
            proposal = self._take(schedule, self.stage, taken)
            if proposal is not None:
                out.append(proposal)

        elites = [o.schedule for o in _best(parents, self.elites)]
        if self.generation == 0 or not elites:  # the initial population: grids of the space plus random timesteps
            for grid in self.ops.space.timesteps.init_grids:
                add(self._from_grid(grid))
            for _ in range(10 * self.population):
                if len(out) >= self.population:
                    break
                add(self._random(self.ops.nfe))
            return out
        for _ in range(20 * (self.mutants + self.crossovers)):
            if len(out) >= self.mutants + self.crossovers:
                break
            if len(out) < self.mutants:
                add(self.mutate(elites[int(self.rng.integers(len(elites)))], ratio))
            else:
                i, j = self.rng.choice(len(elites), size=2, replace=len(elites) < 2)
                add(self.crossover(elites[int(i)], elites[int(j)], ratio))
        return out

    # --- operators on (integer timesteps, skip sets) -------------------------------------------

    def timesteps_of(self, schedule: SolverSchedule) -> list[int]:
        return [round(t * self.n_train - 1) for t in schedule.timesteps if t > 0]

    def build(self, steps: Sequence[int], skips: Sequence[Sequence[str]]) -> SolverSchedule:
        """The fixed solver on integer timesteps (largest first), ending with the denoising step."""
        times = [(n + 1) / self.n_train for n in steps] + [0.0]
        base = PRESETS[self.ops.space.solver].build(times)
        # A searched schedule is no longer the preset: it must not carry the preset's name.
        return replace(base, name="", steps=tuple(replace(s, skip=tuple(k)) for s, k in zip(base.steps, skips)))

    def mutate(self, schedule: SolverSchedule, ratio: float) -> SolverSchedule:
        steps, skips = self.timesteps_of(schedule), [list(s.skip) for s in schedule.steps]
        moves = ["local", "local", "reset"]
        if ratio > 0:
            moves += ["skip", "skip", "add_step", "remove_step"]
        move = moves[int(self.rng.integers(len(moves)))]
        if move in ("local", "reset"):
            steps = self._move(steps, local=move == "local")
        elif move == "skip":
            i = int(self.rng.integers(len(skips)))
            skips[i] = self._toggle(skips[i], ratio)
        elif move == "add_step":
            steps, skips = self._add_step(steps, skips)
        elif len(steps) > 2:
            j = int(self.rng.integers(1, len(steps)))
            del steps[j], skips[j]
        return self.repair(steps, skips, ratio)

    def crossover(self, a: SolverSchedule, b: SolverSchedule, ratio: float) -> SolverSchedule:
        """a's number of steps; timesteps drawn without replacement from both parents' (so no
        duplicates), each step's skip set from the parent that has that timestep."""
        pool: dict[int, list[str]] = {}
        for parent in (b, a):  # a's skip sets win where both parents share a timestep
            for n, step in zip(self.timesteps_of(parent), parent.steps):
                pool[n] = list(step.skip)
        k = a.n_steps
        chosen = sorted(self.rng.choice(sorted(pool), size=min(k, len(pool)), replace=False).tolist(), reverse=True)
        return self.repair(chosen, [pool[n] for n in chosen], ratio)

    def repair(self, steps: list[int], skips: list[list[str]], ratio: float) -> SolverSchedule:
        """Distinct decreasing timesteps in range, skip sets within the ratio, cost within budget."""
        order = sorted(range(len(steps)), key=lambda i: -steps[i])
        steps, skips = [steps[i] for i in order], [list(dict.fromkeys(skips[i])) for i in order]
        steps[0] = int(np.clip(steps[0], self.min_first, self.n_train - 1))
        for i in range(1, len(steps)):
            steps[i] = min(steps[i], steps[i - 1] - 1)
        while steps and steps[-1] < 0:
            del steps[-1], skips[-1]
        cap = int(ratio * len(self.units))
        skips = [[u for u in self.units if u in set(s)][:cap] for s in skips]
        schedule = self.build(steps, skips)
        while self.costs.schedule_cost(schedule) > self.mac_budget:
            # Over budget: at a random step with room under the cap, skip the most expensive unit it
            # still runs (greedy, so pruning can pay for an extra step); else drop a step.
            room = [i for i, s in enumerate(skips) if len(s) < cap]
            if room:
                i = room[int(self.rng.integers(len(room)))]
                running = [u for u in self.units if u not in skips[i]]
                skips[i] = [*skips[i], max(running, key=lambda u: self.costs.units[u])]
            else:
                j = int(self.rng.integers(1, len(steps))) if len(steps) > 1 else 0
                del steps[j], skips[j]
            schedule = self.build(steps, skips)
        return schedule

    def _random(self, k: int) -> SolverSchedule:
        first = int(self.rng.integers(self.min_first, self.n_train))
        rest = self.rng.choice(first, size=k - 1, replace=False) if k > 1 else []
        steps = sorted([first, *map(int, rest)], reverse=True)
        return self.repair(steps, [[] for _ in steps], 0.0)

    def _from_grid(self, grid: str) -> SolverSchedule:
        times = make_grid(grid, self.ops.noise, self.ops.nfe)
        steps = [round(t * self.n_train - 1) for t in times[:-1]]
        return self.repair(steps, [[] for _ in steps], 0.0)

    def _move(self, steps: list[int], local: bool) -> list[int]:
        j = int(self.rng.integers(len(steps)))
        high = self.n_train - 1 if j == 0 else steps[j - 1] - 1
        low = self.min_first if j == 0 else (steps[j + 1] + 1 if j + 1 < len(steps) else 0)
        if high <= low:
            return steps
        if local:
            scale = max(1.0, 0.3 * min(high - steps[j], steps[j] - low, (high - low) / 2))
            value = steps[j] + round(self.rng.normal(0.0, scale)) or steps[j] + 1
        else:
            value = int(self.rng.integers(low, high + 1))
        steps = list(steps)
        steps[j] = int(np.clip(value, low, high))
        return steps

    def _toggle(self, skip: list[str], ratio: float) -> list[str]:
        cap = int(ratio * len(self.units))
        if cap == 0:
            return []
        unit = self.units[int(self.rng.integers(len(self.units)))]
        if unit in skip:
            return [u for u in skip if u != unit]
        if len(skip) >= cap:
            skip = [u for u in skip if u != skip[int(self.rng.integers(len(skip)))]]
        return [*skip, unit]

    def _add_step(self, steps: list[int], skips: list[list[str]]) -> tuple[list[int], list[list[str]]]:
        """A new timestep in the widest gap (between the last timestep and 0 counts too)."""
        bounds = [*steps, -1]
        gaps = [bounds[i] - bounds[i + 1] for i in range(len(steps))]
        i = int(np.argmax(gaps))
        if gaps[i] < 2:
            return steps, skips
        new = (bounds[i] + bounds[i + 1]) // 2 if bounds[i + 1] >= 0 else bounds[i] // 2
        return [*steps[: i + 1], new, *steps[i + 1 :]], [*skips[: i + 1], [], *skips[i + 1 :]]
