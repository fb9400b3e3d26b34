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

from solversearch.evaluator import Evaluator
from solversearch.schedule import load_schedule
from solversearch.search.experiment import load_experiment
from solversearch.search.runner import evaluation_settings, run_search
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
        algorithm_settings={"k": 3, "stage0_presets": ["ddim", "dpmpp_2m", "unipc_2_bh2"], "stage0_grids": ["logsnr"], "stage0_mutants": 1},
    )


def check_study(url: str, study: str, expected: int):
    store = open_existing(url, study)
    history = store.history()
    assert len(history) == expected
    assert len({e.key for e in history}) == expected  # no evaluation twice
    for e in history:
        assert e.metrics["fid"] >= 0 and e.n == 200 and e.cost["nfe"] == 5
        assert e.worker["device"] == "cpu"  # CPU trials: Ray assigned no GPU
    return store, history


def test_every_trial_lands_in_sqlite_and_resuming_adds_only_new_ones(ray_session, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    outcome = run_search(small_experiment(url, "gmm-ray", budget=5), validate=False, export_dir=tmp_path)
    assert outcome.new_evaluations == 5
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
        assert outcome.new_evaluations == 4
        check_study(POSTGRES, study, 4)
    finally:
        optuna.delete_study(study_name=study, storage=POSTGRES)


def test_export_load_evaluate_gives_the_stored_metric(ray_session, tmp_path):
    url = f"sqlite:///{tmp_path / 'search.db'}"
    experiment = small_experiment(url, "gmm-export", budget=4)
    outcome = run_search(experiment, validate=False, export_dir=tmp_path)
    schedule = load_schedule(outcome.exported)
    evaluator = Evaluator(outcome_model(experiment), evaluation_settings(experiment))
    assert evaluator.evaluate(schedule).fid == pytest.approx(outcome.best.metrics["fid"], rel=1e-6)


def outcome_model(experiment):
    from solversearch.models.spec import load_model

    return load_model(experiment.model)


def test_a_search_killed_between_trials_resumes_without_loss_or_repetition(tmp_path):
    """A real `solversearch search` process is SIGKILLed (mid-trial or between trials) once it has
    recorded three trials; running the same command again completes the budget: every recorded
    evaluation is kept and none is repeated."""
    db = tmp_path / "kill.db"
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        (REPO / "experiments" / "gmm_digits.yaml").read_text().replace("../search_spaces/", f"{REPO}/search_spaces/")
        + "\n"
    )
    command = [
        sys.executable, "-m", "solversearch.cli", "search", str(experiment), "--budget", "20", "--algorithm", "random",
        "--storage", f"sqlite:///{db}", "--study", "killed", "--no-validation", "--out", str(tmp_path),
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    recorded = 0
    while time.time() < deadline and process.poll() is None:
        time.sleep(1.0)
        if db.exists():
            try:
                recorded = len(open_existing(f"sqlite:///{db}", "killed").history())
            except Exception:  # noqa: BLE001 - the study may not exist yet
                recorded = 0
            if recorded >= 3:
                break
    assert recorded >= 3, "the search did not record three trials in time"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its Ray processes, mid-search
    process.wait()
    before = {e.key for e in open_existing(f"sqlite:///{db}", "killed").history()}
    assert 3 <= len(before) < 20
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    after = open_existing(f"sqlite:///{db}", "killed").history()
    keys = [e.key for e in after]
    assert len(keys) == 20 and len(set(keys)) == 20 and before <= set(keys)
