"""Searchers without Ray: suggest / complete / save / restore / resume, on a cheap synthetic metric."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
from ray.tune.search import Searcher

from solversearch import DiscreteVP, RectifiedFlow, SolverSchedule
from solversearch.search import ALGORITHMS, REFINING, Observation, drive, load_space, make_searcher

NOISE = DiscreteVP.from_diffusers_config({})
USF = load_space("search_spaces/usf.yaml")
# nsga2 and autodiffusion have their own tests; refinement needs a model (tests/test_refine_search.py)
GENERIC = [a for a in ALGORITHMS if a not in ("nsga2", "autodiffusion", *REFINING)]
# A 5-step λ grid no preset grid matches: dense at high noise, sparse at low noise.
TARGET = NOISE.lambda_(1.0) + (NOISE.lambda_(1e-3) - NOISE.lambda_(1.0)) * np.linspace(0, 1, 6) ** 1.7


def synthetic_metric(schedule: SolverSchedule) -> dict[str, float]:
    """Deterministic and cheap: distance of the λ grid to a target, plus penalties for low orders and
    noise prediction; schedules of other lengths pay for it."""
    lam = NOISE.lambda_(np.array([t for t in schedule.timesteps if t > 0]))
    grid = np.interp(np.linspace(0, 1, 6), np.linspace(0, 1, len(lam)), lam)
    value = float(np.mean((grid - TARGET) ** 2))
    value += sum(0.05 * (3 - s.order) + 0.1 * (s.prediction == "noise") for s in schedule.steps)
    return {"fid": 1.0 + value, "nfe": float(schedule.nfe), "diverged": False}


def searcher(algorithm, **kwargs):
    settings = {"k": 6, "pool": 300, "population": 24, "stage0_mutants": 4} if algorithm == "s3" else None
    if algorithm == "evolution":
        settings = {"k": 6, "stage0_mutants": 4}
    return make_searcher(algorithm, USF, 5, NOISE, settings=settings, seed=3, **kwargs)


@pytest.mark.parametrize("algorithm", GENERIC)
def test_searchers_never_propose_a_schedule_twice(algorithm):
    s = searcher(algorithm)
    keys = []
    done = drive(s, synthetic_metric, 40, on_result=lambda config, result: keys.append(config["key"]))
    assert done == 40 and len(set(keys)) == 40
    assert all(SolverSchedule.from_dict(o.schedule.to_dict()).nfe == 5 for o in s.observations)


@pytest.mark.parametrize("algorithm", ["s3", "evolution"])
def test_stage_zero_evaluates_the_presets_first(algorithm):
    s = searcher(algorithm)
    names = []
    drive(s, synthetic_metric, 10, on_result=lambda config, result: names.append(config["schedule"]["name"]))
    assert all(name.endswith("/nfe5") for name in names[:10])
    assert {n.split("/")[0] for n in names} >= {"ddim", "dpmpp_2m"}


@pytest.mark.parametrize("algorithm", GENERIC)
def test_save_and_restore_mid_search_continues_identically(algorithm, tmp_path):
    original = searcher(algorithm)
    drive(original, synthetic_metric, 18)
    path = tmp_path / "searcher.pkl"
    original.save(str(path))
    restored = searcher(algorithm)
    restored.restore(str(path))
    a_keys, b_keys = [], []
    for s, keys in ((original, a_keys), (restored, b_keys)):
        for i in range(12):
            config = s.suggest(f"next-{i}")
            keys.append(config["key"])
            s.on_trial_complete(f"next-{i}", synthetic_metric(SolverSchedule.from_dict(config["schedule"])))
    assert a_keys == b_keys


@pytest.mark.parametrize("algorithm", GENERIC)
def test_a_searcher_rebuilt_from_history_never_repeats_an_evaluation(algorithm):
    first = searcher(algorithm)
    drive(first, synthetic_metric, 20)
    history = list(first.observations)
    resumed = searcher(algorithm, history=history)
    keys = []
    drive(resumed, synthetic_metric, 15, on_result=lambda config, result: keys.append(config["key"]))
    assert not set(keys) & {o.key for o in history}
    assert len(set(keys)) == 15


def test_a_lost_trial_can_be_proposed_again():
    s = searcher("random")
    config = s.suggest("t1")
    s.on_trial_complete("t1", None, error=True)
    assert config["key"] not in s.known and not s.observations


def test_s3_trains_its_predictor_and_records_kendall_tau_per_stage():
    s = searcher("s3")
    drive(s, synthetic_metric, 60)
    assert s.stage >= 3
    assert set(s.kendall_taus) and all(-1.0 <= tau <= 1.0 for tau in s.kendall_taus.values())
    assert np.mean(list(s.kendall_taus.values())) > 0.2, s.kendall_taus
    assert s.timings["predictor_seconds"] > 0


def test_s3_improves_on_its_stage_zero():
    s = searcher("s3")
    drive(s, synthetic_metric, 60)
    stage0 = min(o.value for o in s.observations if o.stage == 0)
    later = min(o.value for o in s.observations if o.stage > 0)
    assert later < stage0


def test_nsga2_searches_several_budgets_for_two_objectives():
    s = make_searcher("nsga2", USF, (4, 6, 8), NOISE, metric=["fid", "nfe"], seed=0)
    seen = []
    drive(
        s,
        synthetic_metric,
        24,
        on_result=lambda config, result: seen.append(SolverSchedule.from_dict(config["schedule"]).nfe),
    )
    assert set(seen) <= {4, 6, 8} and len(set(seen)) > 1


def test_optuna_searchers_warm_start_from_history():
    first = searcher("tpe")
    drive(first, synthetic_metric, 12)
    resumed = searcher("tpe", history=list(first.observations))
    assert len(resumed.study.trials) == 12
    keys = []
    drive(resumed, synthetic_metric, 8, on_result=lambda config, result: keys.append(config["key"]))
    assert not set(keys) & {o.key for o in first.observations}


def test_unknown_algorithms_and_settings_are_user_errors():
    from solversearch.errors import SolversearchError

    with pytest.raises(SolversearchError, match="unknown algorithm"):
        make_searcher("annealing", USF, 5, NOISE)
    with pytest.raises(SolversearchError, match="bad settings"):
        make_searcher("s3", USF, 5, NOISE, settings={"temperature": 3})
    with pytest.raises(SolversearchError, match="takes no settings"):
        make_searcher("tpe", USF, 5, NOISE, settings={"k": 3})


def test_observations_are_plain_data():
    s = searcher("random")
    drive(s, synthetic_metric, 3)
    assert isinstance(s.observations[0], Observation)
    assert copy.deepcopy(s.observations) == s.observations


# --- determinism: the same seed gives the same study whatever the concurrency and completion order ---


def drive_concurrently(searcher, evaluate, budget, concurrency, order_seed):
    """Ray Tune's pattern without Ray: keep suggesting until the searcher waits (None), finishes or
    `concurrency` trials are running, then complete a random number of the running trials in a random
    order (both drawn from `order_seed`), and again, until `budget` trials have been suggested and all
    completed. Returns the sorted (stage, key, value) of the completed trials."""
    order = np.random.default_rng(order_seed)
    running, results, suggested, finished = {}, [], 0, False
    while True:
        while not finished and suggested < budget and len(running) < concurrency:
            config = searcher.suggest(f"trial-{suggested}")
            if config is None:
                break
            if config == Searcher.FINISHED:
                finished = True
                break
            running[f"trial-{suggested}"] = config
            suggested += 1
        if not running:
            assert finished or suggested == budget, "the searcher waits although no trial is running"
            return sorted(results)
        ids = list(running)
        order.shuffle(ids)
        for trial_id in ids[: int(order.integers(1, len(ids) + 1))]:
            config = running.pop(trial_id)
            result = evaluate(SolverSchedule.from_dict(config["schedule"]))
            searcher.on_trial_complete(trial_id, result)
            results.append((config["stage"], config["key"], result["fid"]))


def triples(observations):
    return sorted((o.stage, o.key, o.value) for o in observations)


# Cheap settings with several generations in a few dozen evaluations: stage 0 is 7 presets on one grid
# and 4 mutants. s3's boosted-trees predictor ("gbr") plans a stage in about a second; the ranking
# predictor is planned from the same canonical data and seeds, only slower.
DETERMINISM = {
    "s3": (
        {"k": 6, "pool": 120, "population": 24, "stage0_mutants": 4, "stage0_grids": ["logsnr"], "predictor": "gbr"},
        34,
    ),
    "evolution": ({"k": 6, "stage0_mutants": 4, "stage0_grids": ["logsnr"]}, 40),
    "random": (None, 70),
}
CONCURRENCY_AND_ORDER = [(2, 0), (2, 1), (4, 2), (4, 3)]


def determinism_searcher(algorithm, **kwargs):
    return make_searcher(algorithm, USF, 5, NOISE, settings=DETERMINISM[algorithm][0], seed=11, **kwargs)


@pytest.mark.parametrize("algorithm", list(DETERMINISM))
def test_the_study_does_not_depend_on_concurrency_nor_on_the_order_trials_finish(algorithm):
    budget = DETERMINISM[algorithm][1]
    reference = drive_concurrently(determinism_searcher(algorithm), synthetic_metric, budget, 1, 0)
    assert len(reference) == budget and len({key for _, key, _ in reference}) == budget
    if algorithm != "random":
        assert {stage for stage, _, _ in reference} >= {0, 1, 2}  # several generations, the last one cut
    for concurrency, order_seed in CONCURRENCY_AND_ORDER:
        got = drive_concurrently(determinism_searcher(algorithm), synthetic_metric, budget, concurrency, order_seed)
        assert got == reference, (concurrency, order_seed)


@pytest.mark.parametrize(
    ("algorithm", "stop"),
    [("s3", 4), ("s3", 9), ("s3", 14), ("evolution", 9), ("evolution", 20), ("random", 60)],
    ids=["s3-presets", "s3-mutants", "s3-stage1", "evolution-mutants", "evolution-stage2", "random"],
)
def test_a_search_stopped_mid_generation_resumes_to_the_same_study(algorithm, stop):
    budget = DETERMINISM[algorithm][1]
    uninterrupted = drive_concurrently(determinism_searcher(algorithm), synthetic_metric, budget, 2, 0)
    first = determinism_searcher(algorithm)
    drive_concurrently(first, synthetic_metric, stop, 3, 1)
    history = list(first.observations)
    resumed = determinism_searcher(algorithm, history=history)
    continued = drive_concurrently(resumed, synthetic_metric, budget - stop, 2, 2)
    assert sorted(triples(history) + continued) == uninterrupted


@pytest.mark.parametrize("algorithm", ["s3", "evolution"])
def test_the_baseline_pool_is_learnt_from_but_is_neither_re_proposed_nor_a_generation(algorithm):
    """Baselines (stage 0, algorithm "baselines") evaluated before the search: two of its presets and
    three random schedules. The search skips those presets, still makes all its stage-0 mutants, and its
    study does not depend on concurrency."""
    presets = determinism_searcher(algorithm)
    drive(presets, synthetic_metric, 2)
    others = make_searcher("random", USF, 5, NOISE, seed=5)
    drive(others, synthetic_metric, 3)
    pool = [replace(o, algorithm="baselines") for o in presets.observations + others.observations]
    budget = DETERMINISM[algorithm][1]
    reference = drive_concurrently(determinism_searcher(algorithm, history=pool), synthetic_metric, budget, 1, 0)
    assert not {key for _, key, _ in reference} & {o.key for o in pool}
    assert sum(1 for stage, _, _ in reference if stage == 0) == 5 + 4  # the 5 presets left, then 4 mutants
    assert {stage for stage, _, _ in reference} >= {0, 1, 2}
    for concurrency, order_seed in CONCURRENCY_AND_ORDER[::2]:
        got = drive_concurrently(
            determinism_searcher(algorithm, history=pool), synthetic_metric, budget, concurrency, order_seed
        )
        assert got == reference, (concurrency, order_seed)


# --- warm start: a schedule searched on another checkpoint joins stage 0 beside the presets ---


def warm_start_file(path, nfe=5, noise=NOISE, name="searched-elsewhere"):
    """A schedule as a search on another checkpoint exports it: the synthetic metric's target grid with
    third-order multistep steps, carrying that checkpoint's fingerprint, metrics and provenance."""
    from solversearch.presets import PRESETS

    times = [float(t) for t in NOISE.t_of_lambda(TARGET)]
    if nfe != 5:
        times = [float(t) for t in np.linspace(1.0, 1e-3, nfe + 1)]
    schedule = (
        PRESETS["dpmpp_3m"]
        .build(times)
        .with_metadata(
            name=name,
            noise_schedule=noise.to_dict(),
            model_fingerprint="0123456789abcdef",
            metrics={"fid": 0.5},
            provenance={"study": "elsewhere-nfe5"},
        )
    )
    return schedule.save(path)


@pytest.mark.parametrize("algorithm", ["s3", "evolution", "s3_refine"])
def test_a_warm_start_schedule_is_evaluated_first_in_stage_zero_beside_the_presets(algorithm, tmp_path):
    path = warm_start_file(tmp_path / "elsewhere.json")
    settings = {**DETERMINISM["evolution"][0], "stage0_mutants": 0}
    plain = make_searcher(algorithm, USF, 5, NOISE, settings=settings, seed=11)
    warm = make_searcher(algorithm, USF, 5, NOISE, settings={**settings, "warm_start": str(path)}, seed=11)
    configs = []
    drive(warm, synthetic_metric, len(plain.queue) + 1, on_result=lambda config, result: configs.append(config))
    first = configs[0]
    assert first["key"] == warm.ops.canonical_key(SolverSchedule.from_dict(first["schedule"])) and first["stage"] == 0
    assert first["schedule"]["name"] == "warm_start/searched-elsewhere"
    assert first["schedule"]["timesteps"] == json.loads(path.read_text())["timesteps"]
    # what it measured on its own checkpoint is left behind; where it came from is kept
    assert first["schedule"]["metrics"] == {} and first["schedule"]["model_fingerprint"] is None
    assert first["schedule"]["provenance"] == {"warm_start": str(path), "searched_on": "0123456789abcdef"}
    assert {c["key"] for c in configs[1:]} == {p.key for p in plain.queue}  # beside the presets, not instead
    assert all(c["stage"] == 0 for c in configs)


def test_a_warm_started_search_stopped_in_stage_zero_resumes_to_the_same_study(tmp_path):
    path = warm_start_file(tmp_path / "elsewhere.json")
    settings, budget = {**DETERMINISM["evolution"][0], "warm_start": str(path)}, DETERMINISM["evolution"][1]

    def warm(**kwargs):
        return make_searcher("evolution", USF, 5, NOISE, settings=settings, seed=11, **kwargs)

    uninterrupted = drive_concurrently(warm(), synthetic_metric, budget, 2, 0)
    first = warm()
    drive_concurrently(first, synthetic_metric, 3, 2, 1)
    continued = drive_concurrently(warm(history=list(first.observations)), synthetic_metric, budget - 3, 2, 2)
    assert sorted(triples(first.observations) + continued) == uninterrupted


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda path: path, "warm_start: cannot read schedule file"),
        (lambda path: path.write_text('{"format": "solversearch.schedule/v1", "nfe": 5') and path, "not valid JSON"),
        (lambda path: warm_start_file(path, nfe=4), "has NFE 4, the search NFE 5"),
        (lambda path: warm_start_file(path, noise=RectifiedFlow()), "rectified-flow path"),
        (
            lambda path: (
                path.write_text(json.dumps({**json.loads(warm_start_file(path).read_text()), "noise_schedule": None}))
                and path
            ),
            "no noise_schedule metadata",
        ),
    ],
    ids=["missing", "malformed", "other-nfe", "other-family", "no-noise-metadata"],
)
def test_a_bad_warm_start_is_refused_when_the_searcher_is_built(make, words, tmp_path):
    from solversearch.errors import SolversearchError

    path = make(tmp_path / "warm.json")
    for algorithm in ("s3", "evolution"):
        with pytest.raises(SolversearchError, match=words):
            make_searcher(algorithm, USF, 5, NOISE, settings={"warm_start": str(path)})
    with pytest.raises(SolversearchError, match="a schedule JSON file or a list of them"):
        make_searcher("s3", USF, 5, NOISE, settings={"warm_start": 5})
