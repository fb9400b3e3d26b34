"""Batched trials: one Ray Tune trial evaluates several proposals on one resident model.

Ray's cost per trial (scheduling, a result round trip, bookkeeping: 1–2 s on a 2-core machine, more on a
cluster) is comparable to one evaluation of a small model on a CPU and several times one on a GPU. A
`BatchingSearcher` wraps any Tune searcher that proposes one schedule per `suggest` (every
`ScheduleSearcher`) and hands Tune trials of up to `size` proposals. The worker reports each proposal's
result the moment it is scored (`tune.report`, with the member's index), so each schedule is written to
the study as its own complete trial at once, and the inner searcher sees the same per-proposal
observations as without batching.

A trial that fails (its worker died) loses only the members it had not reported: they are handed out
again in a later trial, up to `retries` times each, and only then reported lost to the inner searcher.
Tune itself must not retry a batched trial (`max_failures=0`): it would re-run the members already
scored. The wrapper also counts the budget, in proposals: Tune's `num_samples` counts trials.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

MEMBERS = "batch"  # the trial config's list of member configs
MEMBER = "member"  # a reported result's index into that list


@dataclass
class _Member:
    """One proposal of a batch: the inner searcher's trial id for it, its config, how often it was lost."""

    inner_id: str
    config: dict[str, Any]
    failures: int = 0


@dataclass
class _Batch:
    members: list[_Member]
    scored: set[int] = field(default_factory=set)


class BatchingSearcher(Searcher):
    """Tune searcher: trials of up to `size` proposals of `inner`, at most `budget` proposals in all."""

    def __init__(self, inner: Searcher, size: int, budget: int, retries: int = 2):
        if size < 1:
            raise ValueError(f"a batch holds at least one proposal, not {size}")
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.size, self.budget, self.retries = inner, size, budget, retries
        self.handed_out = 0  # proposals drawn from the inner searcher (a retried one counts once)
        self.inner_finished = False
        self.batches: dict[str, _Batch] = {}  # running trials
        self.retry: list[_Member] = []  # members of failed trials, to hand out again

    def trials_needed(self) -> int:
        """An upper bound on the trials this search can start: Tune's `num_samples`."""
        return self.budget * (self.retries + 1)

    # --- Ray Tune Searcher API ----------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        members = [self.retry.pop(0) for _ in range(min(self.size, len(self.retry)))]
        while len(members) < self.size and not self.inner_finished and self.handed_out < self.budget:
            inner_id = f"{trial_id}.{len(members)}"
            config = self.inner.suggest(inner_id)
            if config == Searcher.FINISHED:
                self.inner_finished = True
            if config is None or config == Searcher.FINISHED:
                break
            members.append(_Member(inner_id, config))
            self.handed_out += 1
        if members:
            self.batches[trial_id] = _Batch(members)
            return {MEMBERS: [m.config for m in members]}
        if self.batches:  # results still to come may lead to more proposals, or to retries
            return None
        return Searcher.FINISHED if self.inner_finished or self.handed_out >= self.budget else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._scored(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result:
            self._scored(trial_id, result)
        batch = self.batches.pop(trial_id, None)
        if batch is None:
            return
        for index, member in enumerate(batch.members):
            if index in batch.scored:
                continue
            member.failures += 1
            if member.failures <= self.retries:
                self.retry.append(member)
            else:
                self.inner.on_trial_complete(member.inner_id, None, error=True)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self.__dict__, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            self.__dict__.update(pickle.load(handle))

    # --- the members ----------------------------------------------------------------------------

    def _scored(self, trial_id: str, result: Mapping[str, Any]) -> None:
        """A member's result reaches the inner searcher once, however often Tune repeats it."""
        batch = self.batches.get(trial_id)
        if batch is None or MEMBER not in result or result[MEMBER] in batch.scored:
            return
        index = int(result[MEMBER])
        batch.scored.add(index)
        self.inner.on_trial_complete(batch.members[index].inner_id, dict(result))


def member_config(trial_config: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config of the member a reported result belongs to, or None for a result that is not a member's."""
    if MEMBER not in result or MEMBERS not in trial_config:
        return None
    return trial_config[MEMBERS][int(result[MEMBER])]
