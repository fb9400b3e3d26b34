"""Refinement inside a search, without Ray: the hybrid S³ (`s3_refine`) refines each generation's best
not-yet-refined schedule once, as a trial of its own whose result is the refined schedule; a searcher
rebuilt from the results continues with exactly the proposals an uninterrupted one makes; the `refine`
algorithm refines what it is given, or the best the study holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from solversearch.errors import SolversearchError
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.metrics.reference import ArrayCache
from solversearch.models.spec import load_model
from solversearch.search import (
    Observation,
    drive,
    is_refinement,
    load_experiment,
    load_space,
    make_searcher,
    refinement_key,
)
from solversearch.search.trainable import refinement_result, trial_result

REPO = Path(__file__).resolve().parents[1]
USF = load_space(REPO / "search_spaces" / "usf.yaml")
REFINE = {"n": 32, "heldout_n": 32, "iterations": 8, "patience": 8}
HYBRID = {
    "k": 3,
    "pool": 64,
    "population": 8,
    "stage0_presets": ["ddim", "dpmpp_2m"],
    "stage0_grids": ["logsnr"],
    "stage0_mutants": 1,
    "refine_top": 1,
    "refine": REFINE,
}


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    model = load_model("gmm:digits")
    return Evaluator(model, EvaluationSettings(n=200, seed=0), ArrayCache(tmp_path_factory.mktemp("cache")))


def run(evaluator, budget, history=(), settings=HYBRID, algorithm="s3_refine"):
    searcher = make_searcher(
        algorithm, USF, 5, evaluator.model.noise_schedule, settings=settings, seed=0, history=history
    )
    trials = []
    drive(
        searcher,
        lambda schedule: trial_result(evaluator, schedule),
        budget,
        on_result=lambda config, result: trials.append((config, result)),
        refine=lambda schedule, refine: refinement_result(evaluator, schedule, refine),
    )
    return searcher, trials


def test_the_hybrid_refines_each_generations_best_once(evaluator):
    searcher, trials = run(evaluator, 11)
    stages = [config["stage"] for config, _ in trials]
    refinements = [(config, result) for config, result in trials if config.get("refine")]
    assert stages == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [config["stage"] for config, _ in refinements] == [1, 2]  # the first proposal of every later generation
    keys = [config["key"] for config, _ in trials]
    assert len(set(keys)) == len(keys)
    # Stage 1 refines the best of stage 0; stage 2 the best that is not refined yet and not itself a refinement.
    stage0 = sorted((result["fid"], config["key"]) for config, result in trials if config["stage"] == 0)
    assert refinements[0][0]["key"] == refinement_key(stage0[0][1])
    for config, result in refinements:
        assert config["refine"]["n"] == REFINE["n"] and "refined_schedule" in result and result["refine_seconds"] > 0
    refined = [o for o in searcher.observations if is_refinement(o.key)]
    assert len(refined) == 2 and all("refinement" in o.schedule.provenance for o in refined)
    parent = next(o for o in searcher.observations if refinement_key(o.key) == refined[0].key)
    assert (
        refined[0].schedule.steps[0] == parent.schedule.steps[0]
        and refined[0].schedule.timesteps != parent.schedule.timesteps
    )
    assert refined[0].value < parent.value  # on the search's own noise: refinement learned on other noise


def test_a_hybrid_rebuilt_from_its_results_continues_like_an_uninterrupted_one(evaluator):
    _, whole = run(evaluator, 11)
    first, part = run(evaluator, 6)
    history = [Observation(o.schedule, o.key, o.value, o.stage, o.algorithm) for o in first.observations]
    _, rest = run(evaluator, 5, history=history)
    assert [c["key"] for c, _ in part + rest] == [c["key"] for c, _ in whole]
    assert all(math.isclose(a["fid"], b["fid"], rel_tol=1e-9) for (_, a), (_, b) in zip(part + rest, whole))


def test_the_refine_algorithm_refines_the_best_schedule_of_the_study_or_the_presets_it_is_given(evaluator):
    pool, _ = run(
        evaluator,
        2,
        settings={"stage0_presets": ["ddim", "dpmpp_2m"], "stage0_grids": ["logsnr"], "stage0_mutants": 0},
        algorithm="evolution",
    )
    best = min(pool.observations, key=lambda o: o.value)
    _, trials = run(evaluator, 5, history=pool.observations, settings={"refine": REFINE}, algorithm="refine")
    assert [c["key"] for c, _ in trials] == [refinement_key(best.key)]  # one trial, then finished
    _, trials = run(
        evaluator,
        5,
        settings={"presets": ["ddim/logsnr", "dpmpp_2m/time_uniform"], "refine": REFINE},
        algorithm="refine",
    )
    assert len(trials) == 2 and all(is_refinement(c["key"]) for c, _ in trials)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"refine": {"bogus": 1}}, "bad settings"),
        ({"refine": {"device": "cuda"}}, "device"),
        ({"refine": {"n": 0}}, "positive integer"),
        ({"refine_top": 0}, "refine_top"),
        ({"refine": [1, 2]}, "mapping"),
    ],
)
def test_bad_refinement_settings_are_user_errors(settings, message, evaluator):
    with pytest.raises(SolversearchError, match=message):
        make_searcher("s3_refine", USF, 5, evaluator.model.noise_schedule, settings=settings)


def test_the_refine_algorithm_needs_something_to_refine(evaluator):
    """Its default parents are the study's best, so it can be built (and checked) before the baseline pool runs."""
    searcher = make_searcher("refine", USF, 5, evaluator.model.noise_schedule, settings={})
    with pytest.raises(SolversearchError, match="nothing to refine"):
        searcher.suggest("trial-0")


def test_refinement_seeds_that_an_evaluation_uses_are_refused(tmp_path):
    text = (REPO / "experiments" / "gmm_digits.yaml").read_text().replace("../search_spaces/", f"{REPO}/search_spaces/")
    text = text.replace("name: s3", "name: s3_refine").replace("    k: 8\n", "    k: 8\n    refine: {seed: 1}\n")
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(SolversearchError, match="refine.seed"):
        load_experiment(path)
