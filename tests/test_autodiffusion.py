"""The AutoDiffusion searcher: budget, distinct integer timesteps, two stages, save/restore."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solversearch import DiscreteVP, SolverSchedule
from solversearch.models.pruning import UnitCosts
from solversearch.search import AutoDiffusionSearcher, TimestepOperators, drive, load_space
from tests.test_searchers import drive_concurrently, triples

NOISE = DiscreteVP.from_diffusers_config({})
SPACE = load_space("search_spaces/autodiffusion.yaml")
UNITS = {f"u{i}": 100 * (i + 1) for i in range(12)}  # 12 units holding 7,800 of 10,000 MACs
COSTS = UnitCosts(full=10_000, units=UNITS)


def searcher(seed=0, **settings):
    defaults = {"population": 12, "elites": 4, "mutants": 6, "crossovers": 3, "generations": (2, 3)}
    return AutoDiffusionSearcher(SPACE, 5, NOISE, costs=COSTS, seed=seed, **{**defaults, **settings})


def operators(ratio: float = 0.0) -> TimestepOperators:
    """The searcher's operators on integer timesteps and skip sets, allowing `ratio` of the units per step."""
    return TimestepOperators(SPACE, 5, NOISE, COSTS, tuple(UNITS)).with_skip_ratio(ratio)


def metric(schedule: SolverSchedule) -> dict:
    """Cheap and deterministic: prefers λ-uniform times, more steps, and skipping the cheap units."""
    lam = NOISE.lambda_(np.array([t for t in schedule.timesteps if t > 0]))
    smooth = float(np.var(np.diff(lam))) if len(lam) > 2 else 1.0
    skipped_cost = sum(UNITS[u] for s in schedule.steps for u in s.skip) / 10_000
    return {"fid": 1.0 + smooth + 1.0 / schedule.nfe + skipped_cost, "diverged": False}


def check(schedule: SolverSchedule, ratio: float) -> None:
    positive = [t for t in schedule.timesteps if t > 0]
    steps = [round(t * 1000 - 1) for t in positive]
    assert all(abs((n + 1) / 1000 - t) < 1e-12 for n, t in zip(steps, positive))  # integer timesteps
    assert steps == sorted(set(steps), reverse=True)  # distinct, decreasing
    assert schedule.timesteps[-1] == 0.0
    assert COSTS.schedule_cost(schedule) <= 5 * COSTS.full
    for step in schedule.steps:
        assert len(step.skip) <= int(ratio * len(UNITS)) and set(step.skip) <= set(UNITS)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_operators_never_exceed_the_budget_nor_repeat_a_timestep(seed):
    assert searcher(seed).ops.units == tuple(UNITS)  # the searcher breeds with these operators
    rng = np.random.default_rng(seed)
    population = [operators().random(rng) for _ in range(4)] + [operators().from_grid("logsnr", rng)]
    for _ in range(60):
        ratio = float(rng.choice([0.0, 0.1, 0.25]))
        ops = operators(ratio)
        a, b = (population[int(i)] for i in rng.integers(len(population), size=2))
        child = ops.mutate(a, rng) if rng.random() < 0.6 else ops.crossover(a, b, rng)
        check(child, ratio)
        population.append(child)


def test_pruning_buys_extra_steps_in_stage_two_only():
    s = searcher()
    stages = []
    drive(s, metric, 200, on_result=lambda config, result: stages.append(config["stage"]))
    by_stage = {1: [], 2: []}
    for o in s.observations:
        by_stage[o.stage].append(o.schedule)
    assert by_stage[1] and by_stage[2]
    assert all(not step.skip for sch in by_stage[1] for step in sch.steps)
    assert all(sch.nfe == 5 for sch in by_stage[1])
    assert any(step.skip for sch in by_stage[2] for step in sch.steps)
    assert any(sch.nfe > 5 for sch in by_stage[2])  # skipped units paid for a sixth evaluation
    first_steps = {round(sch.timesteps[0] * 1000 - 1) for sch in by_stage[1]}
    assert len(first_steps) > 1  # the first step is searched, not pinned to 999


def test_over_budget_repair_skips_the_most_expensive_units_first():
    """Six unpruned steps cost 6 forwards against a budget of 5. With three skips allowed per step, the
    three largest units (1,200 + 1,100 + 1,000 MACs) at each step bring six steps to 6 × 6,700 = 40,200
    ≤ 50,000: the repair must keep the sixth step rather than drop it."""
    rng = np.random.default_rng(0)
    repaired = operators(0.25).repair([900, 700, 500, 300, 150, 50], [[] for _ in range(6)], rng)
    check(repaired, 0.25)
    assert repaired.nfe == 6
    assert all(set(step.skip) <= {"u11", "u10", "u9"} for step in repaired.steps)


def test_searched_schedules_do_not_carry_the_preset_name():
    ops, rng = operators(), np.random.default_rng(0)
    assert ops.random(rng).name == "" and ops.repair([800, 400, 100], [[], [], []], rng).name == ""


def test_save_and_restore_continue_identically(tmp_path):
    original = searcher(seed=5)
    drive(original, metric, 20)
    original.save(str(tmp_path / "ad.pkl"))
    restored = searcher(seed=5)
    restored.restore(str(tmp_path / "ad.pkl"))
    keys = {0: [], 1: []}
    for index, s in enumerate((original, restored)):
        drive(s, metric, 15, on_result=lambda config, result, index=index: keys[index].append(config["key"]))
    assert keys[0] == keys[1]


def test_no_candidate_is_evaluated_twice():
    s = searcher(seed=2)
    keys = []
    drive(s, metric, 120, on_result=lambda config, result: keys.append(config["key"]))
    assert len(keys) == len(set(keys))


# Generation 0 is the initial population (12), each later one 9 children: 5 generations make 48.
@pytest.mark.parametrize("budget", [40, 100], ids=["cut-mid-generation", "to-the-end"])
def test_the_study_does_not_depend_on_concurrency_nor_on_the_order_trials_finish(budget):
    reference = drive_concurrently(searcher(seed=4), metric, budget, 1, 0)
    assert {stage for stage, _, _ in reference} == {1, 2}
    assert len({key for _, key, _ in reference}) == len(reference) == min(budget, 48)
    for concurrency, order_seed in [(2, 0), (2, 1), (4, 2), (4, 3)]:
        assert drive_concurrently(searcher(seed=4), metric, budget, concurrency, order_seed) == reference, concurrency


@pytest.mark.parametrize("stop", [5, 17, 33])
def test_a_search_stopped_mid_generation_resumes_to_the_same_study(stop):
    uninterrupted = drive_concurrently(searcher(seed=4), metric, 100, 3, 0)
    first = searcher(seed=4)
    drive_concurrently(first, metric, stop, 2, 1)
    history = list(first.observations)
    continued = drive_concurrently(searcher(seed=4, history=history), metric, 100, 4, 2)
    assert sorted(triples(history) + continued) == uninterrupted
