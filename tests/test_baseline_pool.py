"""The baseline pool: every preset on every grid, then the best of them in every form the space allows."""

from __future__ import annotations

import numpy as np

from solversearch import DiscreteVP, LinearVP, RectifiedFlow, SolverSchedule
from solversearch.grids import FAMILY_GRIDS, GRIDS
from solversearch.predictor import encode_schedule
from solversearch.presets import PRESETS
from solversearch.search import BaselinePool, LambdaOperators, Observation, ScheduleEncoding, drive, load_space
from solversearch.search.baseline_pool import preset_grid_pairs

NOISE = DiscreteVP.from_diffusers_config({})
USF = load_space("search_spaces/usf.yaml")


def score(schedule: SolverSchedule) -> dict[str, float]:
    """Cheap and deterministic: prefers DDIM-like first-order steps and a particular end time."""
    return {
        "fid": 1.0 + sum(s.order for s in schedule.steps) / 10 + abs(schedule.timesteps[-1] - 0.002),
        "diverged": False,
    }


def run(pool: BaselinePool) -> list[dict]:
    configs = []
    drive(pool, score, pool.size, on_result=lambda config, result: configs.append(config))
    return configs


def test_generation_zero_is_every_preset_on_every_grid():
    pairs = preset_grid_pairs(NOISE)
    on_every_path = [g for g in GRIDS if not any(g in own for own in FAMILY_GRIDS.values())]
    assert len(pairs) == len(PRESETS) * (len(on_every_path) + len(FAMILY_GRIDS["vp"]))
    assert len(preset_grid_pairs(LinearVP())) == len(PRESETS) * len(on_every_path)  # diffusers' grids are discrete
    pool = BaselinePool(USF, 5, NOISE, variants_of=0)
    names = [config["schedule"]["name"] for config in run(pool)]
    assert len(names) == len(set(names)) == len(pairs)
    assert {name.rsplit("/", 1)[0] for name in names} == {f"{p}/{g}" for p, g in pairs}


def test_the_best_presets_get_every_start_end_and_first_step_of_the_space_one_at_a_time():
    pool = BaselinePool(USF, 5, NOISE, presets=["ddim", "dpmpp_2m"], grids=["logsnr", "leading"], variants_of=2)
    configs = run(pool)
    first, variants = configs[:4], configs[4:]
    assert all(c["schedule"]["name"].count("/") == 2 for c in first)
    best = sorted(first, key=lambda c: (score(SolverSchedule.from_dict(c["schedule"]))["fid"], c["key"]))[:2]
    ts = USF.timesteps
    forms = len(ts.t_start) + len(ts.t_end) * len(USF.first_steps)
    assert 2 * forms - 4 <= len(variants) <= 2 * forms  # a variant may equal the preset itself
    for config in variants:
        schedule = SolverSchedule.from_dict(config["schedule"])
        assert config["algorithm"] == "baselines" and schedule.nfe == 5
        parent = next(c for c in best if config["schedule"]["name"].startswith(c["schedule"]["name"]))
        own = SolverSchedule.from_dict(parent["schedule"]).timesteps
        if schedule.timesteps[0] == own[0]:  # the preset's own start: any end time and first step of the space
            assert schedule.timesteps[-1] in ts.t_end and schedule.first_step in USF.first_steps
        else:  # another start of the space: the preset's own end, model first step
            assert schedule.timesteps[0] in ts.t_start and schedule.timesteps[-1] == own[-1]
            assert schedule.first_step == "model"


def test_a_resumed_pool_proposes_only_what_is_missing():
    complete = BaselinePool(
        USF, 4, NOISE, presets=["ddim", "unipc_2_bh2"], grids=["logsnr", "time_uniform"], variants_of=1
    )
    configs = run(complete)
    history = [
        Observation(
            SolverSchedule.from_dict(c["schedule"]),
            c["key"],
            score(SolverSchedule.from_dict(c["schedule"]))["fid"],
            c["stage"],
        )
        for c in configs[:3]
    ]
    resumed = BaselinePool(
        USF, 4, NOISE, presets=["ddim", "unipc_2_bh2"], grids=["logsnr", "time_uniform"], variants_of=1, history=history
    )
    rest = run(resumed)
    assert [c["key"] for c in rest] == [c["key"] for c in configs[3:]]


def test_the_pool_is_the_same_whatever_the_completion_order():
    """The variants are planned from the set of generation-0 results: order never matters."""

    def keys(order_seed: int) -> list[str]:
        pool = BaselinePool(
            USF, 5, NOISE, presets=["ddim", "dpmpp_2m", "unipc_2_bh1"], grids=["logsnr", "trailing"], variants_of=2
        )
        rng, pending, serial = np.random.default_rng(order_seed), {}, 0
        while True:
            serial += 1
            config = pool.suggest(f"trial-{serial}")
            if isinstance(config, dict):
                pending[f"trial-{serial}"] = config
                continue
            if not pending:  # FINISHED
                return sorted(o.key for o in pool.observations)
            for trial in rng.permutation(sorted(pending)):  # finish the waiting trials in a random order
                pool.on_trial_complete(str(trial), score(SolverSchedule.from_dict(pending.pop(str(trial))["schedule"])))

    assert keys(0) == keys(1) == keys(2)


def test_on_a_flow_path_the_euler_grid_from_pure_noise_has_variants_inside_the_space():
    """diffusers' flow Euler grid starts at σ = 1 (λ = −∞) and its last positive σ is t_min: its variants
    start at the space's starts or the path's t_start, with strictly decreasing times and a finite encoding."""
    flow = RectifiedFlow()
    space = load_space("search_spaces/usf_flow.yaml")
    pool = BaselinePool(space, 5, flow, presets=["ddim", "unipc_1_bh1_noise"], grids=["shifted"], variants_of=2)
    configs = run(pool)
    schedules = [SolverSchedule.from_dict(c["schedule"]) for c in configs]
    assert [s.timesteps[0] for s in schedules[:2]] == [1.0, 1.0]  # the presets as diffusers runs them
    variants = schedules[2:]
    assert variants and {s.timesteps[0] for s in variants} <= set(space.timesteps.t_start)
    encoding = ScheduleEncoding(LambdaOperators(space, 5, flow))
    for schedule in schedules:
        assert all(a > b for a, b in zip(schedule.timesteps, schedule.timesteps[1:]))
        params, _ = encoding.from_schedule(schedule)
        assert all(np.isfinite(v) for v in params.values() if isinstance(v, float))
        assert np.isfinite(encode_schedule(schedule, flow)).all()
