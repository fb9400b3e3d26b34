"""The study store: every evaluated schedule survives a reopen (SQLite and PostgreSQL), Optuna's own tools
read the study, resumes are checked, errors are actionable and never show a password, and diffusers
exports match diffusers' own scheduler."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import optuna
import pytest
import sqlalchemy
from sqlalchemy import event
from sqlalchemy.engine import Engine

from solversearch import LinearVP, SolverSchedule, SolversearchError, presets
from solversearch.exports import export_diffusers
from solversearch.search import (
    LambdaOperators,
    ScheduleEncoding,
    StudyStore,
    TrialRecord,
    list_studies,
    load_space,
    redact_url,
    storage_url,
)

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
NFE = 5
PRESETS = [("dpmpp_2m", "logsnr"), ("unipc_2_bh2", "trailing"), ("ddim", "karras"), ("dpmpp_3m", "time_quadratic")]
INF = math.inf


@pytest.fixture(scope="module")
def space():
    return load_space("search_spaces/usf.yaml")


@pytest.fixture(scope="module")
def encoding(space, ddpm_noise):
    return ScheduleEncoding(LambdaOperators(space, NFE, ddpm_noise))


@pytest.fixture(scope="module")
def schedules(ddpm_noise):
    return [presets.build(name, ddpm_noise, NFE, grid) for name, grid in PRESETS]


def _postgres_reachable() -> str | None:
    """None when the test server answers, else why not."""
    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (pip install solversearch[postgres])"
    engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.OperationalError as exc:
        return f"PostgreSQL at {PG_URL} is unreachable: {str(exc.orig).splitlines()[0]}"
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A storage URL and a fresh study-name factory; PostgreSQL studies are deleted afterwards."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'studies.db'}"
    else:
        reason = _postgres_reachable()
        if reason:
            pytest.skip(reason)
        url = PG_URL
    names: list[str] = []

    def new_name(prefix: str = "test") -> str:
        names.append(f"{prefix}-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield url, new_name
    if request.param == "postgresql":
        for name in names:
            try:
                optuna.delete_study(study_name=name, storage=url)
            except KeyError:
                pass  # the test never created it (e.g. it checked a refused open)


def record(store, encoding, schedule, fid, *, stage=0, algorithm="evolution", diverged=False, values=None, seed=7):
    params, distributions = encoding.from_schedule(schedule)
    metrics = {"fid": fid, "kid": INF if diverged else fid / 100, "kid_std": INF if diverged else 0.001}
    cost = {"nfe": float(schedule.nfe), "seconds": 1.5, "sampling_seconds": 1.0, "metric_seconds": 0.5}
    record = TrialRecord(
        schedule,
        key=schedule.decisions_key(),
        stage=stage,
        algorithm=algorithm,
        metrics=metrics,
        diverged=diverged,
        cost=cost,
        n=1000,
        seed=seed,
    )
    return store.record(record, values if values is not None else [fid], params=params, distributions=distributions)


def description(search_space, **changes):
    doc = {
        "experiment": "digits",
        "model": {"kind": "gmm", "name": "digits"},
        "model_fingerprint": "abc123",
        "metric": "fid",
        "nfe": NFE,
        "space": search_space.describe(),
    }
    doc.update(changes)
    return doc


# --- round trips ---------------------------------------------------------------------------------------


def test_history_survives_reopening_with_every_attribute(db, encoding, schedules, space):
    url, new_name = db
    name = new_name()
    store = StudyStore(url, name, description=description(space))
    fids = [12.5, 8.25, 30.0]
    algorithms = ["random", "evolution", "bo"]
    numbers = [
        record(store, encoding, s, f, stage=i, algorithm=algorithms[i]) for i, (s, f) in enumerate(zip(schedules, fids))
    ]
    numbers.append(record(store, encoding, schedules[3], INF, stage=2, algorithm="evolution", diverged=True))
    assert numbers == [0, 1, 2, 3]

    reopened = StudyStore(url, name, description=description(space))
    history = reopened.history()
    assert [e.number for e in history] == numbers
    for e, schedule in zip(history, schedules):
        assert isinstance(e, TrialRecord)
        assert e.schedule == SolverSchedule.from_json(schedule.to_json())
        assert e.schedule.name == schedule.name
        assert e.key == schedule.decisions_key()
        assert e.n == 1000 and e.seed == 7
        assert e.cost == {"nfe": 5.0, "seconds": 1.5, "sampling_seconds": 1.0, "metric_seconds": 0.5}
    assert [e.values for e in history] == [(12.5,), (8.25,), (30.0,), (INF,)]
    assert [e.metrics["fid"] for e in history] == [12.5, 8.25, 30.0, INF]
    assert [e.stage for e in history] == [0, 1, 2, 2]
    assert [e.algorithm for e in history] == ["random", "evolution", "bo", "evolution"]
    assert [e.diverged for e in history] == [False, False, False, True]
    diverged = history[-1]
    assert diverged.metrics == {"fid": INF, "kid": INF, "kid_std": INF}
    assert reopened.keys() == {s.decisions_key() for s in schedules}
    assert [e.number for e in reopened.best(k=10)] == [1, 0, 2]  # the diverged one is never "best"
    assert reopened.description == description(space) | {"space": json.loads(json.dumps(space.describe()))}


def test_non_finite_metrics_are_stored_as_strict_json(db, encoding, schedules):
    """Optuna itself would write inf as the non-standard JSON token Infinity; we store strings."""
    url, new_name = db
    store = StudyStore(url, new_name())
    record(store, encoding, schedules[0], INF, diverged=True)
    attrs = optuna.load_study(study_name=store.study.study_name, storage=url).trials[0].user_attrs
    json.dumps(attrs, allow_nan=False)  # raises on inf / nan
    assert attrs["metrics"]["fid"] == "inf" and attrs["diverged"] is True


def test_study_attributes_persist(db, space):
    url, new_name = db
    name = new_name()
    store = StudyStore(url, name, description=description(space))
    store.set_attr("kendall_tau", {"0": 0.61, "1": float("nan")})
    store.set_attr("search_cost", {"seconds": 12.0, "evaluations": 40})
    reopened = StudyStore(url, name)
    assert reopened.get_attr("kendall_tau") == {"0": 0.61, "1": None}  # undefined tau reads back as None
    assert reopened.get_attr("search_cost") == {"seconds": 12.0, "evaluations": 40}
    assert reopened.get_attr("missing", default=3) == 3
    with pytest.raises(SolversearchError, match="description"):
        reopened.set_attr("description", {})


def test_multi_objective_values_round_trip_and_rank_by_either(db, encoding, schedules):
    url, new_name = db
    name = new_name()
    store = StudyStore(url, name, directions=("minimize", "minimize"))
    pairs = [(10.0, 5.0), (20.0, 3.0), (5.0, 9.0)]
    for schedule, values in zip(schedules, pairs):
        record(store, encoding, schedule, values[0], values=list(values))
    record(store, encoding, schedules[3], INF, values=[INF, 4.0], diverged=True)
    history = StudyStore(url, name, directions=("minimize", "minimize")).history()
    assert [e.values for e in history] == [*pairs, (INF, 4.0)]
    assert [e.values for e in store.best(k=3, objective=1)] == [(20.0, 3.0), (10.0, 5.0), (5.0, 9.0)]
    assert [e.values for e in store.best(k=1, objective=0)] == [(5.0, 9.0)]
    with pytest.raises(SolversearchError, match="objective"):
        store.best(objective=2)


def test_record_writes_the_whole_trial_in_one_transaction(db, encoding, schedules):
    """No reader can see a RUNNING or attribute-less trial: exactly one transaction writes, and it holds
    the trial, its values, params and user attributes."""
    url, new_name = db
    store = StudyStore(url, new_name())
    statements: list[str] = []

    def on_execute(conn, cursor, statement, *args):
        statements.append(statement.strip().split()[0].upper() + " " + statement)

    def on_commit(conn):
        statements.append("COMMIT")

    event.listen(Engine, "before_cursor_execute", on_execute)
    event.listen(Engine, "commit", on_commit)
    try:
        number = record(store, encoding, schedules[1], 9.5, stage=3, algorithm="bo")
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)
        event.remove(Engine, "commit", on_commit)

    transactions, current = [], []
    for s in statements:
        if s == "COMMIT":
            transactions.append(current)
            current = []
        else:
            current.append(s)
    writing = [t for t in transactions if any(s.split()[0] in ("INSERT", "UPDATE", "DELETE") for s in t)]
    assert len(writing) == 1
    written = " ".join(writing[0])
    for table in ("trials", "trial_values", "trial_params", "trial_user_attributes"):
        assert f"INSERT INTO {table} " in written
    assert not current  # nothing left uncommitted

    trials = store.study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert trials[0].number == number
    attributes = {"schedule", "key", "metrics", "diverged", "stage", "algorithm", "cost", "n", "seed"}
    assert set(trials[0].user_attrs) == attributes
    assert trials[0].params == encoding.from_schedule(schedules[1])[0]


# --- Optuna's own tools --------------------------------------------------------------------------------


def test_optuna_reads_the_study_as_is(db, encoding, schedules):
    url, new_name = db
    name = new_name()
    store = StudyStore(url, name)
    for schedule, fid in zip(schedules, [3.0, 1.0, 2.0]):
        record(store, encoding, schedule, fid)

    study = optuna.load_study(study_name=name, storage=url)
    assert study.best_value == 1.0
    frame = study.trials_dataframe()
    assert list(frame["number"]) == [0, 1, 2]
    assert list(frame["value"]) == [3.0, 1.0, 2.0]
    params = {"params_w0", "params_first_step", "params_t_end", "params_order_1", "params_prediction_0"}
    assert params <= set(frame.columns)
    for attr in ("schedule", "key", "metrics", "stage", "algorithm", "cost", "n", "seed", "diverged"):
        assert f"user_attrs_{attr}" in frame.columns
    assert SolverSchedule.from_json(frame["user_attrs_schedule"][1]) == schedules[1]

    cli = shutil.which("optuna")
    if cli is None:
        pytest.skip("the optuna command line is not on PATH")
    done = subprocess.run(
        [cli, "trials", "--storage", url, "--study-name", name, "-f", "json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [row["number"] for row in rows] == [0, 1, 2]
    assert [row["value"] for row in rows] == [3.0, 1.0, 2.0]
    assert rows[2]["user_attrs"]["key"] == schedules[2].decisions_key()
    assert rows[2]["params"]["w0"] == encoding.from_schedule(schedules[2])[0]["w0"]


# --- resuming ------------------------------------------------------------------------------------------


def test_resume_must_be_the_same_search(db, encoding, schedules, space):
    url, new_name = db
    name = new_name()
    store = StudyStore(url, name, description=description(space))
    record(store, encoding, schedules[0], 4.0)

    changed = [
        ({"model_fingerprint": "def456"}, "model_fingerprint"),
        ({"nfe": 6}, "nfe"),
        ({"metric": "kid"}, "metric"),
    ]
    for changes, key in changed:
        with pytest.raises(SolversearchError, match=key) as info:
            StudyStore(url, name, description=description(space, **changes))
        assert name in str(info.value)
    with pytest.raises(SolversearchError, match="space") as info:
        StudyStore(url, name, description=description(space, space=space.describe() | {"orders": [1, 2]}))
    assert "orders" in str(info.value)
    with pytest.raises(SolversearchError, match="directions"):
        StudyStore(url, name, directions=("minimize", "minimize"), description=description(space))

    # Unchecked keys (the experiment's display name) may change; the stored description stays.
    same = StudyStore(url, name, description=description(space, experiment="digits-renamed"))
    assert [e.values for e in same.history()] == [(4.0,)]
    assert same.description["experiment"] == "digits"
    assert StudyStore(url, name).description["model_fingerprint"] == "abc123"  # opening without one: no check


def test_a_study_created_by_optuna_adopts_our_description(tmp_path, space):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(study_name="plain", storage=url)
    assert StudyStore(url, "plain", description=description(space)).description["nfe"] == NFE
    with pytest.raises(SolversearchError, match="nfe"):
        StudyStore(url, "plain", description=description(space, nfe=4))


def test_history_skips_trials_without_a_schedule(tmp_path, encoding, schedules):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    store = StudyStore(url, "mixed")
    record(store, encoding, schedules[0], 2.0)
    store.study.add_trial(optuna.trial.create_trial(value=1.0))  # e.g. added with Optuna's tools
    record(store, encoding, schedules[1], 3.0)
    assert [e.number for e in store.history()] == [0, 2]
    assert store.skipped == 1
    assert [e.number for e in store.best()] == [0]


def test_opening_and_recording_do_not_log_and_keep_the_verbosity(tmp_path, encoding, schedules, capfd):
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO)
    try:
        store = StudyStore(f"sqlite:///{tmp_path / 'x.db'}", "quiet")
        record(store, encoding, schedules[0], 2.0)
        assert optuna.logging.get_verbosity() == optuna.logging.INFO
    finally:
        optuna.logging.set_verbosity(previous)
    assert "A new study created" not in capfd.readouterr().err


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database(request, tmp_path):
    """The URL of a database without Optuna's tables: a new SQLite file, or a new PostgreSQL database
    (dropped afterwards)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    reason = _postgres_reachable()
    if reason:
        pytest.skip(reason)
    name = f"fresh_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name}")
    try:
        yield PG_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def test_workers_opening_a_fresh_database_at_once_all_get_the_same_study(fresh_database):
    """Six workers open a database without tables at the same instant: one creates Optuna's tables, the
    others wait for them instead of failing with "table already exists" (how the first CI run of the
    kill-and-resume test failed), and all see one study."""
    start = threading.Barrier(6)

    def open_and_count() -> int:
        start.wait()
        store = StudyStore(fresh_database, "raced")
        return len(store.history())

    with ThreadPoolExecutor(6) as pool:
        counts = list(pool.map(lambda _: open_and_count(), range(6)))
    assert counts == [0] * 6
    assert [s["name"] for s in list_studies(fresh_database)] == ["raced"]


# --- errors and URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+psycopg2://postgres:hunter2@127.0.0.1:1/test", "server running"),
        ("postgresql+psycopg2://postgres:hunter2@127.0.0.1:notaport/test", "not a valid database URL"),
        ("postgres:/hunter2@@", "not a valid database URL"),
        ("nosuchdb://user:hunter2@localhost/db", "unknown database kind"),
        ("postgresql+pg8000://user:hunter2@127.0.0.1/db", "solversearch[postgres]"),
        ("sqlite:////nonexistent-dir-solversearch/hunter2/studies.db", "directory exists"),
    ],
)
def test_storage_errors_say_what_to_change_and_hide_the_password(url, says):
    if "pg8000" in url and importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here, so the missing-driver case cannot be shown with it")
    with pytest.raises(SolversearchError) as info:
        StudyStore(url, "any")
    message = str(info.value)
    assert says in message
    assert redact_url(url) in message
    if "sqlite" not in url:  # an SQLite path has no password; there "hunter2" is a directory name
        assert "hunter2" not in message
    assert "Traceback" not in message and "sqlalche.me" not in message
    with pytest.raises(SolversearchError):
        list_studies(url)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("postgresql://user:secret@host/db", "postgresql://user:***@host/db"),
        ("postgresql+psycopg2://user@host:5432/db", "postgresql+psycopg2://user@host:5432/db"),
        (
            "postgresql://user:pw@host/db?sslmode=require&password=secret",
            "postgresql://user:***@host/db?password=***&sslmode=require",
        ),
        ("postgresql://user:sec@ret@host/db", "postgresql://user:***@host/db"),
        ("postgresql://user:secret@host:notaport/db", "postgresql://user:***@host:notaport/db"),
        ("sqlite:///studies.db", "sqlite:///studies.db"),
    ],
)
def test_redact_url(url, redacted):
    assert redact_url(url) == redacted


def test_storage_url_prefers_argument_then_environment(monkeypatch):
    monkeypatch.delenv("SOLVERSEARCH_STORAGE", raising=False)
    assert storage_url(None) == "sqlite:///solversearch.db"
    monkeypatch.setenv("SOLVERSEARCH_STORAGE", "postgresql+psycopg2://me@db/searches")
    assert storage_url(None) == "postgresql+psycopg2://me@db/searches"
    assert storage_url("sqlite:///other.db") == "sqlite:///other.db"


# --- listing -------------------------------------------------------------------------------------------


def test_list_studies_shows_name_count_and_best(tmp_path, encoding, schedules, space):
    url = f"sqlite:///{tmp_path / 'two.db'}"
    first = StudyStore(url, "digits-nfe5", description=description(space))
    for schedule, fid in zip(schedules[:3], [7.0, 4.5, 9.0]):
        record(first, encoding, schedule, fid)
    record(first, encoding, schedules[3], INF, diverged=True)
    second = StudyStore(url, "digits-nfe5-pareto", directions=("minimize", "minimize"))
    record(second, encoding, schedules[0], 6.0, values=[6.0, 5.0])
    record(second, encoding, schedules[1], 8.0, values=[8.0, 4.0])

    studies = {s["name"]: s for s in list_studies(url)}
    assert set(studies) == {"digits-nfe5", "digits-nfe5-pareto"}
    assert studies["digits-nfe5"]["n_trials"] == 4
    assert studies["digits-nfe5"]["best_value"] == 4.5
    assert studies["digits-nfe5"]["directions"] == ["minimize"]
    assert studies["digits-nfe5"]["description"]["nfe"] == NFE
    assert studies["digits-nfe5-pareto"]["n_trials"] == 2
    assert studies["digits-nfe5-pareto"]["best_values"] == [6.0, 4.0]
    assert studies["digits-nfe5-pareto"]["description"] is None


# --- diffusers export ----------------------------------------------------------------------------------


def test_export_diffusers_matches_diffusers_trailing_spacing(ddpm_noise):
    from diffusers import DPMSolverMultistepScheduler

    schedule = presets.build("dpmpp_2m", ddpm_noise, 5, "trailing")
    timesteps = export_diffusers(schedule, ddpm_noise, "timesteps")
    assert timesteps["timesteps"] == [999, 799, 599, 399, 199]
    assert "SearchedScheduler" in timesteps["note"]

    reference = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    reference.set_timesteps(5)
    assert reference.timesteps.tolist() == timesteps["timesteps"]
    sigmas = export_diffusers(schedule, ddpm_noise, "sigmas")
    np.testing.assert_allclose(sigmas["sigmas"], reference.sigmas[:-1].double().numpy(), rtol=1e-6)
    alphas_cumprod = ddpm_noise.alphas_cumprod[timesteps["timesteps"]]
    np.testing.assert_allclose(sigmas["sigmas"], np.sqrt((1 - alphas_cumprod) / alphas_cumprod), rtol=1e-9)
    json.dumps(timesteps), json.dumps(sigmas)  # ready to write as they are


def test_export_diffusers_refuses_what_does_not_transfer(ddpm_noise):
    linear = LinearVP()
    schedule = presets.build("ddim", linear, 5, "logsnr")
    with pytest.raises(SolversearchError, match="sigmas"):
        export_diffusers(schedule, linear, "timesteps")
    assert len(export_diffusers(schedule, linear, "sigmas")["sigmas"]) == 5
    ddim_steps = presets.build("ddim", ddpm_noise, 3, "trailing").steps
    crowded = SolverSchedule(timesteps=(1.0, 0.9995, 0.5, 0.0), steps=ddim_steps)
    with pytest.raises(SolversearchError, match="repeated"):
        export_diffusers(crowded, ddpm_noise, "timesteps")
    with pytest.raises(SolversearchError, match="kind"):
        export_diffusers(schedule, linear, "karras")
