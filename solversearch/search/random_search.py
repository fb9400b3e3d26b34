"""Random search: uniformly random schedules of the space, the reference point every other algorithm must beat."""

from __future__ import annotations

from typing import Any

from ray.tune.search import Searcher

from .base import ScheduleSearcher


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
