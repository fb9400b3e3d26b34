"""Real Ray Tune runs: every trial lands in the study (SQLite and PostgreSQL), a killed search resumes
without losing or repeating an evaluation, and export → load → evaluate gives the stored metric.

One local Ray instance is shared by the module (start-up costs ~5 s, each trial ~2 s).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from solversearch.errors import SolversearchError
from solversearch.evaluator import Evaluator
from solversearch.schedule import load_schedule
from solversearch.search.experiment import evaluation_settings, load_experiment
from solversearch.search.runner import run_search
from solversearch.search.storage import StudyStore, open_existing

POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def small_experiment(storage_url: str, study: str, budget: int = 6):
    base = load_experiment(REPO / "experiments" / "gmm_digits.yaml")
    return replace(
        base.override(budget=budget, storage_url=storage_url, study=study, algorithm="evolution"),
        metric=replace(base.metric, n=200, batch_size=200),
        algorithm_settings={
            "k": 3,
            "stage0_presets": ["ddim", "dpmpp_2m", "unipc_2_bh2"],
            "stage0_grids": ["logsnr"],
            "stage0_mutants": 1,
        },
        baselines=SMALL_POOL,
    )


SMALL_POOL = {"presets": ["ddim", "dpmpp_2m"], "grids": ["logsnr"], "variants_of": 0}  # 2 baselines, in the driver


def check_study(url: str, study: str, expected: int):
    """`expected` searched trials besides the 2 baselines, none twice, each scored by a worker that read the
    driver's prepared reference and teacher."""
    store = open_existing(url, study)
    history = [e for e in store.history() if e.algorithm != "baselines"]
    assert len(history) == expected and len(store.history()) == expected + 2
    assert len({e.key for e in store.history()}) == expected + 2  # no evaluation twice
    for e in history:
        assert e.metrics["fid"] >= 0 and e.n == 200 and e.cost["nfe"] == 5 and e.metrics["teacher_distance"] > 0
        assert e.worker["device"] == "cpu"  # CPU trials: Ray assigned no GPU
        assert e.worker["prepared"] is True
    return store, history


def test_every_trial_lands_in_sqlite_and_resuming_adds_only_new_ones(ray_session, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    outcome = run_search(small_experiment(url, "gmm-ray", budget=5), validate=False, export_dir=tmp_path)
    assert outcome.new_evaluations == 5 + 2 and outcome.baseline_evaluations == 2
    _, first = check_study(url, "gmm-ray", 5)
    again = run_search(small_experiment(url, "gmm-ray", budget=8), validate=False, export_dir=tmp_path)
    assert again.new_evaluations == 3
    _, second = check_study(url, "gmm-ray", 8)
    assert [e.key for e in second[:5]] == [e.key for e in first]


def test_every_trial_lands_in_postgresql(ray_session, tmp_path):
    import optuna

    study = f"solversearch-test-{uuid.uuid4().hex[:8]}"
    try:
        StudyStore(POSTGRES, study)  # reachability check
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 not reachable: {exc}")
    try:
        outcome = run_search(small_experiment(POSTGRES, study, budget=4), validate=False, export_dir=tmp_path)
        assert outcome.new_evaluations == 4 + 2
        check_study(POSTGRES, study, 4)
    finally:
        optuna.delete_study(study_name=study, storage=POSTGRES)


def test_export_load_evaluate_gives_the_stored_metric(ray_session, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    experiment = small_experiment(url, "gmm-export", budget=4)
    outcome = run_search(experiment, validate=False, export_dir=tmp_path / "not" / "made" / "yet")
    assert outcome.exported.parent == tmp_path / "not" / "made" / "yet"  # the folder is made, the result kept
    schedule = load_schedule(outcome.exported)
    evaluator = Evaluator(outcome_model(experiment), evaluation_settings(experiment))
    # The worker ran with one thread, this process with more: float32 sums in another order move FID by ~1e-6.
    assert evaluator.evaluate(schedule).fid == pytest.approx(outcome.best.metrics["fid"], rel=1e-5)


def test_a_refinement_trial_stores_the_refined_schedule_with_its_parent_and_cost(ray_session, tmp_path):
    """The `refine` algorithm on Ray: one trial refines the best baseline (the driver built its
    teachers); the study stores the refined schedule under its parent's refinement key, with the
    refinement's losses and cost, and it scores better than its parent on the search's noise."""
    url = f"sqlite:///{tmp_path / 'refine.db'}"
    experiment = replace(
        small_experiment(url, "refined", budget=1),
        algorithm="refine",
        algorithm_settings={"refine": {"n": 32, "heldout_n": 32, "iterations": 10}},
    )
    outcome = run_search(experiment, validate=False, export_dir=tmp_path)
    history = open_existing(url, "refined").history()
    refined = [e for e in history if e.refinement]
    assert len(history) == 3 and len(refined) == 1
    parent = min((e for e in history if not e.refinement), key=lambda e: e.values[0])
    assert refined[0].key == f"refine:{parent.key}"
    assert refined[0].refinement["parent_key"] == parent.schedule.decisions_key()
    assert refined[0].cost["refine_seconds"] > 0 and len(refined[0].refinement["heldout_losses"]) >= 2
    assert refined[0].values[0] < parent.values[0]
    assert load_schedule(outcome.exported).provenance["refinement"]["parent_key"] == parent.schedule.decisions_key()


def outcome_model(experiment):
    from solversearch.models.spec import load_model

    return load_model(experiment.model)


@pytest.mark.parametrize(
    "stop",
    [
        "kill",
        pytest.param("ctrl-c", marks=pytest.mark.slow),
        pytest.param("term", marks=pytest.mark.slow),
    ],
)
def test_a_search_killed_between_trials_resumes_without_loss_or_repetition(stop, tmp_path):
    """A real `solversearch search` process is stopped once it has recorded three searched trials —
    SIGKILLed with its Ray processes (mid-trial or between trials), or Ctrl+C (SIGINT to its process
    group) or SIGTERM, which must end it at once with exit 130 / 143 and say how to resume, with no
    report and nothing of Ray's restore hints; running the same command again completes the budget:
    every recorded evaluation is kept and none is repeated."""
    db = tmp_path / "kill.db"
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        (REPO / "experiments" / "gmm_digits.yaml").read_text().replace("../search_spaces/", f"{REPO}/search_spaces/")
        + f"\nbaselines: {SMALL_POOL}\n"
    )
    command = [
        sys.executable,
        "-m",
        "solversearch.cli",
        "search",
        str(experiment),
        "--budget",
        "20",
        "--algorithm",
        "random",
        "--storage",
        f"sqlite:///{db}",
        "--study",
        "killed",
        "--no-validation",
        "--out",
        str(tmp_path),
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    log = tmp_path / "first-run.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.time() + 240
    recorded = 0
    while time.time() < deadline and process.poll() is None:
        time.sleep(1.0)
        if db.exists():
            try:
                recorded = len(searched(open_existing(f"sqlite:///{db}", "killed").history()))
            except Exception:  # noqa: BLE001 - the study may not exist yet
                recorded = 0
            if recorded >= 3:
                break
    assert recorded >= 3, (
        f"the search did not record three trials in time (exit {process.poll()}):\n{log.read_text()[-3000:]}"
    )
    if stop == "kill":
        os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray processes, mid-search
        process.wait()
    else:
        if stop == "ctrl-c":
            os.killpg(process.pid, signal.SIGINT)  # a terminal sends Ctrl+C to the whole foreground group
        else:
            process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == (130 if stop == "ctrl-c" else 143), log.read_text()[-3000:]
        output = log.read_text()
        assert "evaluations kept — run the same command again to resume" in output, output[-3000:]
        assert "Tuner.restore" not in output and " searched; " not in output and "Traceback" not in output, output[
            -3000:
        ]  # no report
    before = {e.key for e in searched(open_existing(f"sqlite:///{db}", "killed").history())}
    assert 3 <= len(before) < 20
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    after = open_existing(f"sqlite:///{db}", "killed").history()
    keys = [e.key for e in searched(after)]
    assert len(keys) == 20 and len(set(keys)) == 20 and before <= set(keys)
    assert len(after) == 22 and len({e.key for e in after}) == 22  # and the 2 baselines, once


@pytest.mark.parametrize(
    "algorithm, settings, words",
    [
        ("evolution", {"kk": 8}, "bad settings"),
        ("s3_refine", {"refine_top": 0}, "refine_top"),
        ("refine", {"presets": ["ddim/logsnr"], "top": 0}, "top"),
    ],
)
def test_a_search_refused_for_its_algorithm_settings_leaves_no_study_behind(algorithm, settings, words, tmp_path):
    """The settings are checked before the study is created (no Ray needed: nothing gets that far)."""
    url = f"sqlite:///{tmp_path / 'refused.db'}"
    experiment = replace(small_experiment(url, "refused"), algorithm=algorithm, algorithm_settings=settings)
    with pytest.raises(SolversearchError, match=words):
        run_search(experiment, validate=False, export_dir=tmp_path)
    with pytest.raises(SolversearchError, match="no study|does not exist"):
        open_existing(url, "refused")
    assert not list(tmp_path.glob("*.json"))


def searched(history):
    return [e for e in history if e.algorithm != "baselines"]


def test_the_same_command_gives_the_same_study_whatever_the_order_trials_finish(ray_session, tmp_path):
    """Two s3 searches with two concurrent trials (so the order in which trials finish varies) and the same
    seeds store the same schedules with the same values — the second with trials of up to three schedules
    each, so batching changes neither what the searcher proposes nor what it learns."""

    def history(name: str, batch: int):
        url = f"sqlite:///{tmp_path / name}.db"
        base = small_experiment(url, "same", budget=14)
        experiment = replace(
            base,
            algorithm="s3",
            algorithm_settings={
                "k": 4,
                "pool": 200,
                "population": 16,
                "stage0_presets": ["ddim", "dpmpp_2m", "unipc_2_bh2"],
                "stage0_grids": ["logsnr", "time_uniform"],
                "stage0_mutants": 2,
            },
            resources=replace(base.resources, batch=batch),
        )
        run_search(experiment, validate=False, export_dir=tmp_path)
        return sorted((e.stage, e.key, e.values, e.algorithm) for e in open_existing(url, "same").history())

    first, second = history("a", batch=1), history("b", batch=3)
    assert len(first) == 16 and {stage for stage, *_ in first} >= {0, 1, 2}
    assert first == second


def test_references_and_teachers_are_built_once(ray_session, tmp_path, monkeypatch):
    """A fresh cache: the driver builds the model's reference and the search's teacher once, and the search's
    workers build nothing; the report's tasks build one teacher per report seed (selection, each validation
    seed). Running the command again builds nothing. Both runs' report times are summed in the study."""
    from solversearch.metrics.reference import ArrayCache

    cache = tmp_path / "cache"
    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(cache))
    url = f"sqlite:///{tmp_path / 'once.db'}"
    base = small_experiment(url, "once", budget=4)
    experiment = replace(
        base,
        metric=replace(base.metric, reference="model", reference_n=300),
        validation_count=2,
        validation_factor=1,
        validation_top=2,
    )
    outcome = run_search(experiment, export_dir=tmp_path)
    builds = ArrayCache(cache).builds()
    assert sorted(b["kind"] for b in builds) == ["reference"] + ["teacher"] * (1 + 1 + 2)
    assert [b["kind"] for b in builds if b["pid"] == os.getpid()] == ["reference", "teacher"]
    store = open_existing(url, "once")
    assert all(e.worker.get("prepared") for e in store.history() if e.algorithm != "baselines")
    assert outcome.report.comparisons  # the searched winner was compared with the best baseline
    assert store.get_attr("report_seconds") == outcome.report_seconds > 0
    again = run_search(experiment, export_dir=tmp_path)
    assert len(ArrayCache(cache).builds()) == len(builds)
    assert open_existing(url, "once").get_attr("report_seconds") == pytest.approx(
        outcome.report_seconds + again.report_seconds
    )


def test_the_report_s_ray_tasks_give_the_numbers_of_the_report_in_the_driver(ray_session, tmp_path, monkeypatch):
    """Same seeds, same n, same metrics: the parallel report's numbers are the sequential report's, and each
    report seed's teacher is built by one task."""
    from solversearch.metrics.reference import ArrayCache
    from solversearch.search.report import final_report
    from tests.test_report import gmm_report_case, report_values

    experiment, model, history = gmm_report_case()
    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(tmp_path / "local"))
    local = final_report(experiment, model, history, validate=True)
    monkeypatch.setenv("SOLVERSEARCH_CACHE", str(tmp_path / "ray"))  # the driver's cache: the tasks write there
    parallel = final_report(experiment, model, history, validate=True, parallel=True)
    # The tasks run with one thread; this process may use more, and float32 sums in another order move
    # the metrics by ~1e-6 relative (KID, a difference of near-equal means, by up to ~1e-5).
    assert flattened(report_values(parallel)) == pytest.approx(flattened(report_values(local)), rel=1e-4, abs=1e-6)
    builds = ArrayCache(tmp_path / "ray").builds()
    assert sorted(b["kind"] for b in builds) == ["teacher"] * (1 + len(experiment.validation_seeds))
    assert os.getpid() not in {b["pid"] for b in builds}


def flattened(values) -> list:
    """The leaves of nested lists, tuples and dicts, in order (dict keys kept as leaves too)."""
    if isinstance(values, dict):
        return [leaf for key, value in values.items() for leaf in (key, *flattened(value))]
    if isinstance(values, (list, tuple)):
        return [leaf for value in values for leaf in flattened(value)]
    return [values]
