"""Does the searched schedule beat the best hand-designed one on fresh noise? The main job at several NFEs.

For each NFE, runs the experiment (by default the README's main job, experiments/digits.yaml) as a fresh
study: the full baseline pool, the search, the winner and the best baseline picked on a selection seed,
then both and the converged teacher scored on K validation seeds the search never saw (n = metric.n ×
validation.n_factor). Prints, per NFE and metric (FID and KID to the data, the teacher distances), the
means, the paired difference with its 95 % confidence interval, the verdict, and the share of the best
baseline's excess over the converged solution the winner leaves, (searched − floor) / (baseline − floor).
The goal: "better" on FID, KID and the feature-space teacher distance, and an excess share ≤ 0.5.

    python benchmarks/significance.py --nfe 4,5,6 [--storage sqlite:///significance.db] [--json significance.json]
    # after the main job: reuse its NFE-5 study (same experiment, same seeds) instead of running it again
    python benchmarks/significance.py --storage sqlite:///solversearch.db --study '{name}-nfe{nfe}'
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from solversearch.search.experiment import load_experiment
from solversearch.search.report import BEST_BASELINE, SEARCHED
from solversearch.search.runner import run_search

REPO = Path(__file__).resolve().parents[1]
GOAL_METRICS = ("fid", "kid", "teacher_distance")
SHOWN = ("fid", "kid", "teacher_distance", "error_to_reference")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--nfe", default="4,5,6")
    parser.add_argument("--storage", default="sqlite:///significance.db", help="a fresh database: studies resume")
    parser.add_argument(
        "--study",
        default="significance-{name}-nfe{nfe}",
        help="study name template; '{name}-nfe{nfe}' with the main job's storage reuses its studies",
    )
    parser.add_argument("--budget", type=int, help="override the experiment's search budget")
    parser.add_argument("--out", default=".", help="folder for the winners' schedule files")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()

    base = load_experiment(args.experiment)
    summary = {}
    for nfe in (int(x) for x in args.nfe.split(",")):
        experiment = base.override(
            nfe=nfe, budget=args.budget, storage_url=args.storage, study=args.study.format(name=base.name, nfe=nfe)
        )
        started = time.perf_counter()
        outcome = run_search(experiment, export_dir=Path(args.out))
        report = outcome.report
        searched, baseline = report.row(SEARCHED), report.row(BEST_BASELINE)
        print(
            f"\nNFE {nfe}: {outcome.evaluations} evaluations ({outcome.baseline_evaluations} baselines), "
            f"{time.perf_counter() - started:.0f} s; validation seeds {list(report.validation_seeds)}, n={report.n}; "
            f"FID/KID against {report.reference}"
        )
        print(f"  searched:      {searched.stored.schedule.name if searched else '–'}")
        print(f"  best baseline: {baseline.stored.schedule.name if baseline else '–'}")
        print(
            f"  {'metric':<20}{'searched':>11}{'baseline':>11}{'floor':>11}   {'difference [95% CI]':<34}"
            f"{'verdict':<27}{'excess left':>11}"
        )
        figures = {}
        for metric in SHOWN:
            difference = report.comparisons.get(metric)
            if difference is None:
                continue
            excess = report.excess_left(metric)
            print(
                f"  {metric:<20}{difference.mean_a:>11.4g}{difference.mean_b:>11.4g}{report.floor_mean(metric):>11.4g}   "
                f"{f'{difference.mean:+.4g} [{difference.low:+.4g}, {difference.high:+.4g}]':<34}"
                f"{difference.verdict:<27}{excess:>11.2f}"
            )
            figures[metric] = {**difference.to_dict(), "floor": report.floor_mean(metric), "excess_left": excess}
        met = all(figures.get(m, {}).get("verdict") == "better" for m in GOAL_METRICS) and all(
            figures[m]["excess_left"] <= 0.5 for m in GOAL_METRICS if math.isfinite(figures[m]["excess_left"])
        )
        print(f"  goal (better on {', '.join(GOAL_METRICS)} with excess left ≤ 0.5): {'met' if met else 'not met'}")
        summary[nfe] = {
            "searched": searched.stored.schedule.to_dict() if searched else None,
            "baseline": baseline.stored.schedule.name if baseline else None,
            "metrics": figures,
            "goal_met": met,
            "evaluations": outcome.evaluations,
            "seconds": time.perf_counter() - started,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
