"""Ray Tune throughput of a search on this machine: trials/minute with 1 and 2 concurrent trials, and
Ray's overhead per trial (wall time per trial minus the evaluation time the workers measured).

Runs random search on the exact digits mixture (cheap evaluations, so the overhead shows) with an
SQLite study in a temporary folder; `--experiment experiments/digits.yaml` uses the bundled UNet instead.
`python benchmarks/ray_scaling.py [--trials 16] [--n 1000] [--gpu 0.25] [--concurrency 1,2]`
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from solversearch.search.experiment import ResourcesConfig, load_experiment
from solversearch.search.runner import run_search
from solversearch.search.storage import open_existing

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,2")
    parser.add_argument("--gpu", type=float, default=0.0, help="GPU fraction per trial (0: CPU trials)")
    parser.add_argument(
        "--experiment",
        default=str(REPO / "experiments" / "gmm_digits.yaml"),
        help="whose model and metric the trials use (random search is forced)",
    )
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    base = load_experiment(Path(args.experiment))
    print(
        f"{'concurrent':>10} {'trials':>7} {'wall s':>8} {'trials/min':>11} {'eval s/trial':>13} {'overhead s/trial':>17}  devices"
    )
    for concurrent in (int(c) for c in args.concurrency.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'bench.db'}"
            experiment = replace(
                base.override(budget=args.trials, algorithm="random", storage_url=url, study=f"scaling-{concurrent}"),
                metric=replace(base.metric, n=args.n, batch_size=args.n),
                resources=ResourcesConfig(cpu=1.0, gpu=args.gpu, concurrent=concurrent),
            )
            start = time.perf_counter()
            run_search(experiment, validate=False, export_dir=Path(tmp))
            wall = time.perf_counter() - start
            history = open_existing(url, experiment.study_name).history()
            evaluation = sum(e.cost.get("seconds", 0.0) for e in history) / len(history)
            per_trial = wall * concurrent / len(history)
            devices = sorted({e.worker.get("device", "?") for e in history})
            print(
                f"{concurrent:>10} {len(history):>7} {wall:>8.1f} {60 * len(history) / wall:>11.1f} "
                f"{evaluation:>13.2f} {per_trial - evaluation:>17.2f}  {', '.join(devices)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
