"""Batched trials, without Ray: the batching searcher packs an inner searcher's proposals into trials,
passes each member's result to the inner searcher exactly once, hands out the unscored members of a
failed trial again (each at most `retries` times, then reports it lost), and stops at the budget."""

from __future__ import annotations

import pytest
from ray.tune.search import Searcher

from solversearch.search.batching import MEMBER, MEMBERS, BatchingSearcher, member_config


class Countdown(Searcher):
    """Proposes `n` configs "p0", "p1", …, then FINISHED; `wait_after` makes it wait (None) for results."""

    def __init__(self, n: int, wait_after: int | None = None):
        super().__init__(metric="fid", mode="min")
        self.n, self.wait_after = n, wait_after
        self.proposed: list[str] = []
        self.by_trial: dict[str, str] = {}
        self.completed: list[tuple[str, float | None, bool]] = []

    def suggest(self, trial_id):
        if len(self.proposed) == self.n:
            return Searcher.FINISHED
        if self.wait_after is not None and len(self.proposed) - len(self.completed) >= self.wait_after:
            return None
        key = f"p{len(self.proposed)}"
        self.proposed.append(key)
        self.by_trial[trial_id] = key
        return {"key": key}

    def on_trial_complete(self, trial_id, result=None, error=False):
        self.completed.append((self.by_trial[trial_id], result["fid"] if result else None, error))


def keys(config):
    return [member["key"] for member in config[MEMBERS]]


def score(batching, trial_id, config, indices):
    for index in indices:
        batching.on_trial_result(trial_id, {"fid": float(index), MEMBER: index, "key": config[MEMBERS][index]["key"]})


def test_trials_hold_up_to_size_proposals_and_stop_at_the_budget():
    inner = Countdown(100)
    batching = BatchingSearcher(inner, size=4, budget=10)
    configs = [batching.suggest(f"t{i}") for i in range(3)]
    assert [keys(c) for c in configs] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "p6", "p7"], ["p8", "p9"]]
    assert batching.suggest("t3") is None  # the budget is handed out; results are still to come
    for i, config in enumerate(configs):
        score(batching, f"t{i}", config, range(len(config[MEMBERS])))
        batching.on_trial_complete(f"t{i}", None)
    assert batching.suggest("t4") == Searcher.FINISHED
    assert [key for key, _, _ in inner.completed] == [f"p{i}" for i in range(10)]


def test_each_member_reaches_the_inner_searcher_once_in_its_own_trial_id():
    inner = Countdown(3)
    batching = BatchingSearcher(inner, size=3, budget=3)
    config = batching.suggest("t0")
    score(batching, "t0", config, [1, 0, 1])  # Tune may deliver the last result again at completion
    batching.on_trial_complete("t0", {"fid": 2.0, MEMBER: 2, "key": "p2"})
    batching.on_trial_complete("t0", {"fid": 2.0, MEMBER: 2, "key": "p2"})
    assert inner.completed == [("p1", 1.0, False), ("p0", 0.0, False), ("p2", 2.0, False)]
    assert set(inner.by_trial) == {"t0.0", "t0.1", "t0.2"}


def test_a_failed_trial_loses_only_its_unscored_members_which_are_handed_out_again():
    inner = Countdown(4)
    batching = BatchingSearcher(inner, size=4, budget=4)
    config = batching.suggest("t0")
    score(batching, "t0", config, [0, 1])
    batching.on_trial_complete("t0", None, error=True)  # the worker died while scoring member 2
    retried = batching.suggest("t1")
    assert keys(retried) == ["p2", "p3"] and inner.proposed == ["p0", "p1", "p2", "p3"]
    score(batching, "t1", retried, [0, 1])
    batching.on_trial_complete("t1", None)
    assert [(k, e) for k, _, e in inner.completed] == [("p0", False), ("p1", False), ("p2", False), ("p3", False)]
    assert batching.suggest("t2") == Searcher.FINISHED


def test_a_member_lost_more_often_than_the_retries_allow_is_reported_lost():
    inner = Countdown(1)
    batching = BatchingSearcher(inner, size=2, budget=1, retries=2)
    for attempt in range(3):
        assert keys(batching.suggest(f"t{attempt}")) == ["p0"]
        batching.on_trial_complete(f"t{attempt}", None, error=True)
    assert inner.completed == [("p0", None, True)]
    assert batching.suggest("t3") == Searcher.FINISHED


def test_a_waiting_inner_searcher_gives_smaller_batches_and_the_wrapper_waits_with_it():
    inner = Countdown(4, wait_after=2)  # a generation of two: the next waits for their results
    batching = BatchingSearcher(inner, size=4, budget=4)
    first = batching.suggest("t0")
    assert keys(first) == ["p0", "p1"] and batching.suggest("t1") is None
    score(batching, "t0", first, [0, 1])
    batching.on_trial_complete("t0", None)
    assert keys(batching.suggest("t2")) == ["p2", "p3"]


def test_a_reported_result_names_its_member_config():
    config = {MEMBERS: [{"key": "a"}, {"key": "b"}]}
    assert member_config(config, {MEMBER: 1}) == {"key": "b"}
    assert member_config(config, {"fid": 1.0}) is None


def test_a_batch_holds_at_least_one_proposal():
    with pytest.raises(ValueError, match="at least one"):
        BatchingSearcher(Countdown(1), size=0, budget=1)
