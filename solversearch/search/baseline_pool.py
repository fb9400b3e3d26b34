"""The baseline pool: every hand-designed solver at the study's NFE, in every form the space allows.

A searched schedule only counts if it beats the best of these, scored on the same seeds. Generation 0
is every preset on every grid (diffusers' integer grids only for discrete models) as the preset
defines it; generation 1 gives the best `variants_of` of those the start times, end times and first
steps (model or analytic) the search space offers — the freedoms a searched schedule has. The pool is
evaluated before the search, as trials of the study (algorithm "baselines"), so the search learns from
it and never re-proposes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

from ray.tune.search import Searcher

from ..grids import GRIDS, grid_applies, make_grid
from ..noise import NoiseSchedule
from ..presets import PRESETS, build
from ..schedule import SolverSchedule
from .base import Observation, Proposal, ScheduleSearcher
from .operators import LambdaOperators
from .space import SearchSpace

ALGORITHM = "baselines"


def preset_grid_pairs(
    noise: NoiseSchedule, presets: Sequence[str] | str = "all", grids: Sequence[str] | str = "all"
) -> list[tuple[str, str]]:
    """Every chosen (preset, grid) that exists on this noise schedule ("all": every one there is)."""
    presets = list(PRESETS) if presets == "all" else list(presets)
    grids = [g for g in (GRIDS if grids == "all" else grids) if grid_applies(g, noise)]
    return [(preset, grid) for grid in grids for preset in presets]


def variant_schedule(
    ops: LambdaOperators, preset: str, grid: str, t_start: float, t_end: float, first_step: str
) -> SolverSchedule:
    """The preset with the grid's λ profile re-laid between other end points, and optionally the
    analytic first step (one more step for the same NFE)."""
    steps = ops.n_steps(first_step)
    times = ops.relay_times(make_grid(grid, ops.noise, steps), steps, t_start, t_end)
    schedule = replace(PRESETS[preset].build(times), first_step=first_step)
    name = f"{preset}/{grid}/nfe{ops.nfe}/t{t_start:g}-{t_end:g}" + ("/analytic" if first_step == "analytic" else "")
    return schedule.with_metadata(name=name, noise_schedule=ops.noise.to_dict())


class BaselinePool(ScheduleSearcher):
    """Proposes the baseline pool in two generations (variants wait for generation 0's results)."""

    algorithm = ALGORITHM

    def __init__(
        self,
        space: SearchSpace,
        nfe: int | Sequence[int],
        noise: NoiseSchedule,
        *,
        presets: Sequence[str] | str = "all",
        grids: Sequence[str] | str = "all",
        variants_of: int = 8,
        metric: str = "fid",
        history: Iterable[Observation] = (),
    ):
        self.nfes = (nfe,) if isinstance(nfe, int) else tuple(nfe)
        super().__init__(space, self.nfes[0], noise, metric=metric, history=history)
        self.variants_of = variants_of
        self.generation_zero: dict[str, tuple[int, str, str]] = {}  # key → (nfe, preset, grid)
        queue = []
        for nfe_ in self.nfes:
            for preset, grid in preset_grid_pairs(noise, presets, grids):
                schedule = build(preset, noise, nfe_, grid)  # as the preset defines it
                key = self.ops.canonical_key(schedule)
                if key in self.generation_zero:
                    continue  # two grids that coincide at this NFE
                self.generation_zero[key] = (nfe_, preset, grid)
                if key not in self.known:
                    queue.append(Proposal(schedule, key, 0))
        self.queue = queue
        self.planned_variants = False
        if not queue:  # generation 0 is complete (a resumed study): the variants can be planned now
            self.planned_variants = True
            self.queue = self._variants()

    @property
    def size(self) -> int:
        """An upper bound on the pool's evaluations (generation 0 plus every variant)."""
        ts = self.ops.space.timesteps
        forms = len(ts.t_start) + len(ts.t_end) * len(self.ops.space.first_steps)
        return len(self.generation_zero) + self.variants_of * len(self.nfes) * forms

    def _propose(self):
        if not self.queue and not self.planned_variants:
            if self.pending:
                return None  # the variants need generation 0's results
            self.planned_variants = True
            self.queue = self._variants()
        return self.queue.pop(0) if self.queue else Searcher.FINISHED

    def _variants(self) -> list[Proposal]:
        """For each of the best presets: every start time of the space (the preset's end and first step),
        and every end time × first step (the preset's start) — one factor at a time, since the full
        product grows as the space's choices multiply."""
        ts, space, proposals, keys = self.ops.space.timesteps, self.ops.space, [], set()
        for nfe in self.nfes:
            ops = LambdaOperators(space, nfe, self.ops.noise)
            scored = [
                (o.value, o.key)
                for o in self.observations
                if o.key in self.generation_zero and self.generation_zero[o.key][0] == nfe and math.isfinite(o.value)
            ]
            for _, key in sorted(scored)[: self.variants_of]:
                _, preset, grid = self.generation_zero[key]
                own = make_grid(grid, self.ops.noise, nfe)
                # A grid from pure noise (flow σ = 1, λ = −∞) varies from the path's t_start, where times
                # can move in λ; on VP and EDM paths no grid starts above it.
                start, end = min(float(own[0]), self.ops.noise.t_start), float(own[-1])
                forms = [(t_start, end, "model") for t_start in ts.t_start]
                forms += [(start, t_end, first) for t_end in ts.t_end for first in space.first_steps]
                for t_start, t_end, first_step in forms:
                    proposal = self._new(variant_schedule(ops, preset, grid, t_start, t_end, first_step), 0)
                    if proposal is not None and proposal.key not in keys:
                        keys.add(proposal.key)
                        proposals.append(proposal)
        return proposals
