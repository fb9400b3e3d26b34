"""What the teacher and the final report cost beside the work they judge.

1. `solversearch baselines` (the default solvers × grids) with and without the teacher distances, each
   with a fresh cache (so the teacher is solved, not read): the two wall times and their ratio.
2. A search's report beside its search: with `--study`, an existing study's recorded wall_seconds and
   report_seconds; with `--search`, a fresh run of the experiment (optionally with a smaller `--budget`).
   With `--rescore`, that study's report is run again twice on fresh caches — in this process, one seed
   after the other (the report before the Ray tasks), and as Ray tasks — and both are timed.

    python benchmarks/report_cost.py --baselines
    python benchmarks/report_cost.py --study digits-nfe5 --storage sqlite:///solversearch.db --rescore
    python benchmarks/report_cost.py --search --budget 16

Timings depend on what else runs on the machine: say so beside any figure you quote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_baselines(model: str, nfe: int, n: int, teacher: bool) -> float:
    """Wall time of the `baselines` command in a fresh process with a fresh cache (the teacher is solved)."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "solversearch.cli", "baselines", "--model", model, "--nfe", str(nfe)]
        command += ["--n", str(n), "--out", out] + ([] if teacher else ["--no-error-to-reference"])
        started = time.perf_counter()
        subprocess.run(command, check=True, env={**os.environ, "SOLVERSEARCH_CACHE": cache}, capture_output=True)
        return time.perf_counter() - started


def baselines(args: argparse.Namespace) -> None:
    with_teacher = timed_baselines(args.model, args.nfe, args.n, teacher=True)
    without = timed_baselines(args.model, args.nfe, args.n, teacher=False)
    print(f"baselines {args.model}, NFE {args.nfe}, n={args.n}, default solvers × grids:")
    print(f"  with error-to-reference     {with_teacher:7.1f} s")
    print(f"  --no-error-to-reference     {without:7.1f} s")
    print(f"  ratio                       {with_teacher / without:7.2f} (goal ≤ 3)")


def share_line(search: float, report: float) -> str:
    return (
        f"search {search:7.1f} s, report {report:7.1f} s, report / search = {100 * report / search:.0f} % (goal ≤ 20 %)"
    )


def rescore(experiment, history, parallel: bool) -> float:
    """The report of `history` again, on a fresh cache (every report seed's teacher is solved)."""
    from solversearch.models.spec import load_model
    from solversearch.search.report import final_report

    model = load_model(experiment.model)
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SOLVERSEARCH_CACHE"] = cache
        started = time.perf_counter()
        if parallel:
            from solversearch.search.runner import ray_connection

            with ray_connection(experiment.ray_address):
                final_report(experiment, model, history, validate=True, parallel=True)
        else:
            final_report(experiment, model, history, validate=True)
        return time.perf_counter() - started


def study(args: argparse.Namespace) -> None:
    import torch

    from solversearch.models.spec import load_model
    from solversearch.search.database import storage_url
    from solversearch.search.experiment import load_experiment
    from solversearch.search.runner import open_store, run_search
    from solversearch.search.storage import open_existing

    experiment = load_experiment(args.experiment).override(
        budget=args.budget, storage_url=args.storage, study=args.study
    )
    if args.search:
        outcome = run_search(experiment, export_dir=Path(tempfile.mkdtemp()))
        print(f"fresh run of {experiment.study_name} ({outcome.evaluations} evaluations):")
        print("  " + share_line(outcome.search_seconds, outcome.report_seconds))
        store = open_store(experiment, load_model(experiment.model))
    else:
        store = open_existing(storage_url(experiment.storage_url), experiment.study_name)
    wall, report = float(store.get_attr("wall_seconds", 0.0)), float(store.get_attr("report_seconds", 0.0))
    print(f"study {experiment.study_name}, recorded over all runs: " + share_line(wall, report))
    if args.rescore:
        history, threads, cpu = store.history(), torch.get_num_threads(), experiment.resources.cpu
        print(f"the report again on fresh caches ({len(history)} stored evaluations), in the order {args.order}:")
        labels = {
            "driver": f"in the driver, seed after seed ({threads} torch threads)",
            "ray": f"as Ray tasks ({cpu:g} CPU each, all cores)",
        }
        for way in args.order.split(","):
            seconds = rescore(experiment, history, parallel=way == "ray")
            print(f"  {labels[way]:<52} {seconds:7.1f} s  ({100 * seconds / wall:.0f} % of the search)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baselines", action="store_true", help="time the baselines command with and without")
    parser.add_argument("--model", default="bundled:digits")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--storage", help="the study's database (default: the experiment's)")
    parser.add_argument("--study", help="the study (default: the experiment's)")
    parser.add_argument("--search", action="store_true", help="run the experiment (resumes an existing study)")
    parser.add_argument("--budget", type=int, help="override the experiment's search budget")
    parser.add_argument("--rescore", action="store_true", help="time the study's report again: sequential vs Ray")
    parser.add_argument("--order", default="driver,ray", help="--rescore's runs, e.g. driver,ray,ray,driver")
    args = parser.parse_args()
    if args.baselines:
        baselines(args)
    if args.search or args.study or args.rescore:
        study(args)


if __name__ == "__main__":
    main()
