"""Refinement as a search algorithm: each trial refines one schedule against the teacher, then scores it.

The learning itself is `solversearch.refine` (on the worker); this module only says which schedules are
refined (`RefineSearcher`: given ones or the study's best) and checks the settings the trials run with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from ..errors import SolversearchError
from ..noise import NoiseSchedule
from ..presets import build
from ..refine import RefineSettings
from ..schedule import SolverSchedule, load_schedule
from .base import Proposal, ScheduleSearcher, best_of, is_refinement, refinement_key
from .space import SearchSpace


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
        super().__init__(space, nfe, noise, **kwargs)
        self.refine_settings = refinement_settings(refine, space)
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
        return Proposal(parent, refinement_key(self.ops.canonical_key(parent)), 1, refine=True)

    def _propose(self):
        if not self.planned:  # by default the best already in the study: the baseline pool runs before any search
            best = best_of((o for o in self.observations if not is_refinement(o.key)), self.top)
            if not best:
                raise SolversearchError(
                    "algorithm 'refine' has nothing to refine: give settings schedules or presets, "
                    "or a study with evaluations"
                )
            self.queue, self.planned = [self._proposal(o.schedule) for o in best], True
        return self._next_unknown(self.queue) or Searcher.FINISHED


def refinement_settings(refine: Mapping[str, Any] | None, space: SearchSpace) -> dict[str, Any]:
    """Refinement settings as plain data for the trial config, checked by building them once. The end
    time moves within the space's range of positive end times unless `end_range` says otherwise."""
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
