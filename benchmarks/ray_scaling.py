"""Search throughput on Ray Tune as a fraction of the evaluator's raw throughput, per trial batch size
and number of concurrent trials.

For each (batch, concurrent) a random search of `--trials` schedules runs on a fresh SQLite study; its
throughput is measured two ways: steady, between the first and the last schedule recorded (what Ray
costs per trial), and whole, over Tune's entire run (adding the start-up of Tune and of its workers,
which load the model: paid once per search). Ray's own start-up, the driver's preparation and the
baseline pool are left out of both. The
raw throughput is the same schedules scored one after another by one in-process evaluator (same model,
same n, no Ray) with as many torch and BLAS threads as the concurrent trials use cores. "workers busy" is
the share of the workers' time spent evaluating (the evaluation seconds they measured, over the
concurrent trials × Tune's run). A fraction near 1 means
Ray's per-trial cost (scheduling, result round trips, recording) is hidden by batching.

Defaults to the bundled UNet (experiments/digits.yaml); `--experiment experiments/gmm_digits.yaml` uses
the exact mixture, whose evaluations are so cheap that Ray's overhead dominates.
`python benchmarks/ray_scaling.py [--trials 32] [--n 500] [--batches 1,4,16] [--concurrency 1,2] [--gpu 0.25]`
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from solversearch.evaluator import Evaluator
from solversearch.models.spec import load_model
from solversearch.search.experiment import ResourcesConfig, evaluation_settings, load_experiment
from solversearch.search.runner import run_search
from solversearch.search.storage import open_existing

REPO = Path(__file__).resolve().parents[1]
ONE_BASELINE = {"presets": ["ddim"], "grids": ["logsnr"], "variants_of": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32, help="searched schedules per run")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--gpu", type=float, default=0.0, help="GPU fraction per trial (0: CPU trials)")
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "digits.yaml"))
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    base = load_experiment(Path(args.experiment))
    base = replace(base, metric=replace(base.metric, n=args.n, batch_size=args.n), baselines=ONE_BASELINE)
    device = "cuda" if args.gpu > 0 else "cpu"
    print(f"model {base.model}, n = {args.n}, {args.trials} schedules per search, device {device}")
    print(
        f"{'batch':>5} {'concurrent':>10} {'first s':>7} {'search s':>9} {'steady/min':>11} {'raw/min':>8} "
        f"{'fraction steady':>16} {'fraction whole':>15} {'workers busy':>13}"
    )
    for concurrent in (int(c) for c in args.concurrency.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                experiment = replace(
                    base.override(
                        budget=args.trials,
                        algorithm="random",
                        storage_url=f"sqlite:///{Path(tmp) / 'bench.db'}",
                        study=f"scaling-{batch}-{concurrent}",
                    ),
                    resources=ResourcesConfig(cpu=1.0, gpu=args.gpu, concurrent=concurrent, batch=batch),
                )
                marks, schedules, evaluating = timed_search(experiment, Path(tmp))
            raw = raw_rate(experiment, schedules, threads=concurrent, device=device)
            steady = (len(marks) - 1) / (marks[-1] - marks[0])
            whole = len(marks) / marks[-1]
            busy = evaluating / (concurrent * marks[-1])
            print(
                f"{batch:>5} {concurrent:>10} {marks[0]:>7.1f} {marks[-1]:>9.1f} {60 * steady:>11.1f} {60 * raw:>8.1f} "
                f"{steady / raw:>16.2f} {whole / raw:>15.2f} {busy:>13.2f}",
                flush=True,
            )


def timed_search(experiment, export_dir: Path):
    """(seconds from the start of Tune's run to each searched schedule's record, the searched schedules,
    the seconds the workers spent evaluating them)."""
    marks: list[float] = []

    def on_update(update: dict) -> None:
        if update.get("phase") == "search":
            marks.append(update["elapsed"])

    run_search(experiment, validate=False, export_dir=export_dir, on_update=on_update)
    history = [e for e in open_existing(experiment.storage_url, experiment.study_name).history()]
    searched = [e for e in history if e.algorithm != "baselines"]
    return marks, [e.schedule for e in searched], sum(e.cost["seconds"] for e in searched)


def raw_rate(experiment, schedules, threads: int, device: str) -> float:
    """Schedules per second scored in-process by one warm evaluator (reference and teacher prebuilt), with
    as many torch and BLAS threads as the concurrent trials get (Ray gives a 1-CPU worker one of each)."""
    with threadpool_limits(threads):
        return _raw_rate(experiment, schedules, threads, device)


def _raw_rate(experiment, schedules, threads: int, device: str) -> float:
    torch.set_num_threads(threads)
    model = load_model(experiment.model, device)
    evaluator = Evaluator(model, replace(evaluation_settings(experiment), device=device))
    evaluator.prepare()
    evaluator.evaluate(schedules[0])  # warm-up: features, kernels
    sample = schedules[: min(len(schedules), 12)]
    start = time.perf_counter()
    for schedule in sample:
        evaluator.evaluate(schedule)
    return len(sample) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
