"""Cluster mode and fault tolerance, for real: a two-node Ray cluster on this machine with PostgreSQL
storage, and a trial worker killed mid-evaluation. Slow: each test starts its own Ray processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from solversearch.search.storage import StudyStore, open_existing

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
POSTGRES = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
ENV = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1")


def experiment_file(tmp_path: Path, n: int = 400) -> Path:
    text = (REPO / "experiments" / "gmm_digits.yaml").read_text()
    text = (
        text.replace("../search_spaces/", f"{REPO}/search_spaces/")
        .replace("n: 1000", f"n: {n}")
        .replace("batch_size: 1000", f"batch_size: {n}")
    )
    text += "\nbaselines: {presets: [ddim], grids: [logsnr], variants_of: 0}\n"  # one baseline, in the driver
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def search(tmp_path, *args, timeout=600):
    command = [
        sys.executable,
        "-m",
        "solversearch.cli",
        "search",
        str(experiment_file(tmp_path)),
        "--no-validation",
        "--out",
        str(tmp_path),
        *args,
    ]
    return subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def postgres_study():
    name = f"solversearch-cluster-{uuid.uuid4().hex[:8]}"
    try:
        StudyStore(POSTGRES, name)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL on 127.0.0.1:5432 not reachable: {exc}")
    yield name
    import optuna

    optuna.delete_study(study_name=name, storage=POSTGRES)


@pytest.fixture
def two_node_cluster():
    port = free_port()
    # A short temp dir: Ray's Unix socket paths must fit in 107 characters (pytest's tmp_path does not).
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = [
        "ray",
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        '--resources={"head_node": 1}',
        f"--temp-dir={temp_dir}",
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    worker = [
        "ray",
        "start",
        f"--address=127.0.0.1:{port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=1",
        '--resources={"second_node": 1}',
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(head, env=ENV, check=True, capture_output=True, timeout=120)
        subprocess.run(worker, env=ENV, check=True, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=ENV, capture_output=True, timeout=120, check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_search_on_a_two_node_cluster_stores_every_trial_in_postgresql(tmp_path, two_node_cluster, postgres_study):
    result = search(
        tmp_path,
        "--address",
        two_node_cluster,
        "--storage",
        POSTGRES,
        "--study",
        postgres_study,
        "--budget",
        "8",
        "--algorithm",
        "random",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    history = [e for e in open_existing(POSTGRES, postgres_study).history() if e.algorithm != "baselines"]
    assert len(history) == 8 and len({e.key for e in history}) == 8
    nodes = {e.worker["node"] for e in history}
    assert len(nodes) == 2, nodes  # trials ran on both nodes
    # Each worker process built its evaluator (model, reference statistics) once, not once per trial.
    builds = [e.worker["pid"] for e in history if e.worker["built_evaluator"]]
    assert len(builds) == len(set(builds)) <= len({e.worker["pid"] for e in history})


def test_sqlite_is_refused_on_a_multi_node_cluster(tmp_path, two_node_cluster):
    result = search(
        tmp_path, "--address", two_node_cluster, "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--budget", "2"
    )
    assert result.returncode == 2
    assert "SQLite" in result.stderr and "shared" in result.stderr and "Traceback" not in result.stderr


def ray_trial_workers() -> list[int]:
    """PIDs of Ray worker processes currently running a Tune function trial."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::ImplicitFunc"):
                pids.append(int(entry.name))
    return pids


def test_a_trial_whose_worker_dies_is_retried_without_duplicates(tmp_path):
    db = tmp_path / "faults.db"
    command = [
        sys.executable,
        "-m",
        "solversearch.cli",
        "search",
        str(experiment_file(tmp_path, n=3000)),
        "--no-validation",
        "--budget",
        "6",
        "--algorithm",
        "random",
        "--storage",
        f"sqlite:///{db}",
        "--study",
        "faults",
        "--out",
        str(tmp_path),
    ]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    killed, finished_before = None, 0
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and process.poll() is None:
        workers = ray_trial_workers()
        if workers:
            time.sleep(1.5)  # let it get into the evaluation
            if workers[0] in ray_trial_workers():
                finished_before = len(scored_by(db, "faults", workers[0]))
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
        time.sleep(0.2)
    _, stderr = process.communicate(timeout=600)
    assert killed is not None, "no trial worker was seen running"
    assert process.returncode == 0, stderr[-3000:]
    history = [e for e in open_existing(f"sqlite:///{db}", "faults").history() if e.algorithm != "baselines"]
    assert len(history) == 6 and len({e.key for e in history}) == 6
    # A reused worker may have finished trials before it was killed, but none after.
    assert len(scored_by(db, "faults", killed)) == finished_before


def scored_by(db: Path, study: str, pid: int) -> list:
    """The searched schedules of `study` that the worker process `pid` scored (none before the study exists)."""
    if not db.exists():
        return []
    try:
        history = open_existing(f"sqlite:///{db}", study).history()
    except Exception:  # noqa: BLE001 - the study may not exist yet
        return []
    return [e for e in history if e.algorithm != "baselines" and e.worker["pid"] == pid]


def test_a_batched_trial_whose_worker_dies_keeps_what_it_scored_and_retries_only_the_rest(tmp_path):
    """Trials of three schedules: a worker is killed after it has recorded one or two schedules of its
    batch. Those stay in the study; the rest of its batch is scored in a later trial; the budget ends with
    six schedules, none twice."""
    db = tmp_path / "batched.db"
    experiment = experiment_file(tmp_path, n=3000)
    experiment.write_text(experiment.read_text().replace("  concurrent: 2\n", "  concurrent: 2\n  batch: 3\n"))
    command = [sys.executable, "-m", "solversearch.cli", "search", str(experiment), "--no-validation"]
    command += ["--budget", "6", "--algorithm", "random", "--storage", f"sqlite:///{db}", "--study", "batched"]
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path)], cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    killed, kept = None, 0
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.3)
        if not db.exists():
            continue
        try:
            history = [e for e in open_existing(f"sqlite:///{db}", "batched").history() if e.algorithm != "baselines"]
        except Exception:  # noqa: BLE001, S112 - the study may not exist yet
            continue
        running = set(ray_trial_workers())
        for pid in {e.worker["pid"] for e in history}:
            kept = sum(1 for e in history if e.worker["pid"] == pid)
            if pid in running and kept < 3:  # mid-batch: scored some of its three, not all
                os.kill(pid, signal.SIGKILL)
                killed = pid
                break
    _, stderr = process.communicate(timeout=600)
    assert killed is not None, "no worker was caught between the schedules of its batch"
    assert process.returncode == 0, stderr.decode()[-3000:]
    history = [e for e in open_existing(f"sqlite:///{db}", "batched").history() if e.algorithm != "baselines"]
    assert len(history) == 6 and len({e.key for e in history}) == 6
    assert sum(1 for e in history if e.worker["pid"] == killed) >= kept >= 1  # what it scored was kept
