"""Search spaces and operators: every operator yields a valid schedule inside the space."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solversearch import DiscreteVP, LinearVP, RectifiedFlow, presets
from solversearch.plan import MIN_LAMBDA_GAP, compile_plan
from solversearch.search.encoding import ScheduleEncoding
from solversearch.search.operators import LambdaOperators
from solversearch.search.space import SpaceError, load_space, space_from_dict

NOISE = DiscreteVP.from_diffusers_config({})
USF = load_space("search_spaces/usf.yaml")
TIMESTEPS = load_space("search_spaces/timesteps.yaml")


def assert_in_space(schedule, space, nfe, noise=NOISE):
    assert schedule.nfe == nfe
    ts = schedule.timesteps
    assert ts[0] in space.timesteps.t_start and ts[-1] in space.timesteps.t_end
    assert schedule.first_step in space.first_steps
    lam = noise.lambda_(np.array(ts))
    assert np.all(np.diff(lam) > MIN_LAMBDA_GAP)
    assert min(t for t in ts if t > 0) >= space.timesteps.t_min * (1 - 1e-9)
    if space.fixed_solver:
        return
    for step in schedule.steps:
        assert step.prediction in space.predictions
        assert step.order in space.orders or step.order == 1
        assert step.scaling in space.scalings or step.scaling == "none"
        assert step.corrector in space.correctors
        if step.scaling == "linear":
            assert space.linear_range[0] <= step.linear_coefficient <= space.linear_range[1]


def test_the_committed_spaces_load():
    assert USF.orders == (1, 2, 3) and "analytic" in USF.first_steps and 0.0 in USF.timesteps.t_end
    assert TIMESTEPS.fixed_solver and TIMESTEPS.solver == "unipc_2_bh2"


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"orders": [1, 5]}, "orders"),
        ({"orders": [2, 3]}, "orders: must include 1"),
        ({"predictions": ["velocity"]}, "predictions"),
        ({"timesteps": {"t_end": [1.5]}}, "timesteps.t_end"),
        ({"timesteps": {"init_grids": ["cosine"]}}, "timesteps.init_grids"),
        ({"timesteps": {"speed": 3}}, "timesteps.speed"),
        ({"solver": "euler"}, "solver"),
        ({"colour": "red"}, "colour"),
        ({"linear_range": [1, -1]}, "linear_range"),
    ],
)
def test_invalid_spaces_name_the_key(doc, words):
    with pytest.raises(SpaceError, match=words.replace("[", r"\[")):
        space_from_dict(doc)


def test_unreadable_space_file_is_a_user_error(tmp_path):
    (tmp_path / "s.yaml").write_text("orders: [1, 2\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(tmp_path / "s.yaml")


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nfe=st.integers(3, 10), space=st.sampled_from([USF, TIMESTEPS]))
def test_random_mutation_and_crossover_always_stay_valid_and_in_space(seed, nfe, space):
    ops = LambdaOperators(space, nfe, NOISE)
    rng = np.random.default_rng(seed)
    population = [ops.random(rng) for _ in range(4)] + [
        ops.from_grid("logsnr", rng),
        ops.project(presets.build("dpmpp_3m", NOISE, nfe, "trailing")),
    ]
    for _ in range(40):
        a, b = (population[int(i)] for i in rng.integers(len(population), size=2))
        child = ops.mutate(a, rng, strength=int(rng.integers(1, 4))) if rng.random() < 0.6 else ops.crossover(a, b, rng)
        assert_in_space(child, space, nfe)
        population.append(child)


def test_a_local_move_shifts_one_time_a_little():
    ops = LambdaOperators(load_space("search_spaces/timesteps.yaml"), 6, NOISE)
    rng = np.random.default_rng(0)
    parent = ops.from_grid("logsnr")
    lam = NOISE.lambda_(np.array([t for t in parent.timesteps if t > 0]))
    step = np.diff(lam).min()
    moved = 0
    for _ in range(50):
        child = ops.move_time(list(parent.timesteps), rng, local=True)
        new = NOISE.lambda_(np.array([t for t in child if t > 0]))
        changed = np.flatnonzero(np.abs(new - lam) > 1e-9)
        assert len(changed) <= 1
        if len(changed):
            moved += 1
            assert abs(new - lam)[changed[0]] < step
    assert moved > 40


def test_relaying_a_grid_keeps_its_lambda_profile():
    ops = LambdaOperators(USF, 10, NOISE)
    grid = presets.build("ddim", NOISE, 10, "logsnr").timesteps
    relaid = ops.relay_times(grid, 20, 1.0, 1e-3)
    lam = NOISE.lambda_(np.array(relaid))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)  # still λ-uniform
    assert len(relaid) == 21


def test_crossover_blends_parents_in_lambda():
    ops = LambdaOperators(TIMESTEPS, 5, NOISE)
    a, b = ops.from_grid("logsnr"), ops.from_grid("time_uniform")
    rng = np.random.default_rng(1)
    lam = lambda s: NOISE.lambda_(np.array(s.timesteps))
    for _ in range(20):
        child = ops.crossover(a, b, rng)
        inner = slice(1, -1)
        low, high = np.minimum(lam(a), lam(b))[inner], np.maximum(lam(a), lam(b))[inner]
        assert np.all(lam(child)[inner] >= low - 1e-6) and np.all(lam(child)[inner] <= high + 1e-6)


def test_the_key_identifies_sampler_behaviour():
    ops = LambdaOperators(USF, 5, NOISE)
    s = presets.build("unipc_2_bh2", NOISE, 5, "logsnr")
    assert ops.canonical_key(s) == ops.canonical_key(s.with_metadata(name="renamed", metrics={"fid": 1.0}))
    assert ops.canonical_key(s) != ops.canonical_key(presets.build("unipc_2_bh1", NOISE, 5, "logsnr"))


def test_repair_caps_orders_and_drops_the_last_corrector():
    from solversearch.schedule import Step

    ops = LambdaOperators(USF, 4, NOISE)
    times = ops.from_grid("logsnr").timesteps
    wild = [
        Step.multistep(1),
        Step.multistep(2, corrector="unic"),
        Step.multistep(3, corrector="unic"),
        Step.multistep(1, corrector="unic", scaling="bh2"),
    ]
    repaired = ops.repair(times, wild, "model")
    assert [s.order for s in repaired.steps] == [1, 2, 3, 1]
    assert repaired.steps[-1].corrector == "none" and repaired.steps[-1].scaling == "none"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nfe=st.integers(3, 8))
def test_encoding_suggestions_are_valid_and_round_trip(seed, nfe):
    import optuna

    ops = LambdaOperators(USF, nfe, NOISE)
    encoding = ScheduleEncoding(ops)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    trial = study.ask()
    schedule = encoding.to_schedule(encoding.suggest(trial))
    assert_in_space(schedule, USF, nfe)
    params, distributions = encoding.from_schedule(schedule)
    assert set(params) == set(distributions)
    for name, value in params.items():
        assert distributions[name]._contains(distributions[name].to_internal_repr(value))
    again = encoding.to_schedule(params)
    lam = lambda s: NOISE.lambda_(np.array([t for t in s.timesteps if t > 0]))
    assert again.steps == schedule.steps and again.first_step == schedule.first_step
    np.testing.assert_allclose(lam(again), lam(schedule), atol=0.05 * (lam(schedule)[-1] - lam(schedule)[0]))


def test_operators_work_on_a_continuous_noise_schedule():
    ops = LambdaOperators(USF, 6, LinearVP())
    rng = np.random.default_rng(0)
    for _ in range(30):
        assert_in_space(ops.mutate(ops.random(rng), rng), USF, 6, LinearVP())


USF_FLOW = load_space("search_spaces/usf_flow.yaml")


@pytest.mark.parametrize("space", [USF, TIMESTEPS], ids=["usf", "timesteps"])
def test_a_start_at_pure_noise_on_a_flow_path_is_a_space_error_that_says_where_to_start(space):
    """On a flow path t = 1 is α = 0: λ = −∞, where no time can be placed in λ."""
    flow = RectifiedFlow()
    assert flow.lambda_(1.0) == -np.inf
    with pytest.raises(SpaceError, match=r"t_start: \[1\.0\].*at or below the path's t_start 0\.999"):
        LambdaOperators(space, 5, flow)


def test_a_start_at_t_1_is_fine_on_a_vp_path_where_its_lambda_is_finite():
    assert np.isfinite(NOISE.lambda_(1.0))
    LambdaOperators(USF, 5, NOISE)


@pytest.mark.parametrize("path", ["search_spaces/usf_flow.yaml", "search_spaces/timesteps_flow.yaml"])
def test_the_flow_spaces_start_below_pure_noise_and_their_operators_stay_inside(path):
    space, flow = load_space(path), RectifiedFlow()
    assert max(space.timesteps.t_start) == flow.t_start
    ops, rng = LambdaOperators(space, 5, flow), np.random.default_rng(0)
    for _ in range(30):
        schedule = ops.mutate(ops.random(rng), rng)
        assert_in_space(schedule, space, 5, flow)
        assert_in_space(ops.crossover(schedule, ops.random(rng), rng), space, 5, flow)
    assert_in_space(ops.project(presets.build("dpmpp_2m", flow, 5, "flow_sigmas")), space, 5, flow)


def test_children_of_a_parent_from_pure_noise_start_inside_the_flow_space_and_compile():
    """FlowMatchEuler's grid starts at σ = 1, where only a first-order step is defined: mutations and
    crossovers of that baseline (it reaches searches through the baseline pool) start at the space's
    nearest start instead, so every child is a valid schedule in the space."""
    space, flow = load_space("search_spaces/usf_flow.yaml"), RectifiedFlow(shift=3.0)
    ops, rng = LambdaOperators(space, 5, flow), np.random.default_rng(0)
    euler = presets.build("ddim", flow, 5, "shifted")
    assert euler.timesteps[0] == 1.0
    for _ in range(50):
        child = ops.mutate(euler, rng, strength=2)
        for schedule in (child, ops.crossover(euler, child, rng)):
            assert_in_space(schedule, space, 5, flow)
            compile_plan(schedule, flow)
