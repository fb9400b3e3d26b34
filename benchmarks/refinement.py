"""Gradient refinement on the bundled model: the best baseline, the baseline refined, the S³ winner and the
hybrid S³ + refinement winner, on fresh seeds.

For each NFE: runs the main job's experiment (experiments/digits.yaml) with plain S³ as one study — the
full baseline pool, the search, the winner and the best baseline picked on the selection seed — and with
`algorithm: s3_refine` (the main job itself) as a second study; refines the S³ study's best baseline on its
own (the LD3 setting: `solversearch refine`); then scores all four, and the converged teacher (the
floor), on the experiment's validation seeds (n = metric.n × validation.n_factor; the same x_T for
every row, so every comparison is paired). Prints, per metric (FID and KID to the real digits, the
feature-space teacher distance), the means, each row's paired difference from the best baseline with its
95 % confidence interval, the verdict and the share of the baseline's excess over the floor the row
leaves, (row − floor) / (baseline − floor); and each row's wall time (a study's: its own record, summed
over resumed runs). The goal of issue 12: the hybrid leaves ≤ 0.3 of the excess at NFE 5, significantly.

    python benchmarks/refinement.py --nfe 4,5,6 [--budget 120] [--storage sqlite:///refinement.db] [--json refinement.json]
    python benchmarks/refinement.py --table nfe4.json nfe5.json nfe6.json   # the README's table from saved figures
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import optuna

from solversearch.evaluator import Evaluator
from solversearch.models.spec import load_model
from solversearch.refine import RefineSettings, refine
from solversearch.search.database import storage_url
from solversearch.search.experiment import load_experiment
from solversearch.search.report import BEST_BASELINE, SEARCHED, validation_settings
from solversearch.search.runner import run_search
from solversearch.statistics import excess_ratio, paired_difference

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fid", "kid", "teacher_distance")
ROWS = ("best baseline", "baseline refined", "S³ winner", "hybrid winner")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=str(REPO / "experiments" / "digits.yaml"))
    parser.add_argument("--nfe", default="4,5,6")
    parser.add_argument("--budget", type=int, help="search budget of both studies (default: the experiment's)")
    parser.add_argument(
        "--refine-top", type=int, default=1, help="schedules the hybrid refines per generation (the main job: 1)"
    )
    parser.add_argument(
        "--storage", default="sqlite:///refinement.db", help="studies resume: a fresh database for fresh figures"
    )
    parser.add_argument("--out", default=".", help="folder for the winners' schedule files")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="print the README's markdown table from --json files and stop"
    )
    args = parser.parse_args()
    if args.table:
        print(markdown_table({k: v for path in args.table for k, v in json.loads(Path(path).read_text()).items()}))
        return

    base = load_experiment(args.experiment)
    model = load_model(base.model)
    summary = {}
    for nfe in (int(x) for x in args.nfe.split(",")):
        s3_settings = {k: v for k, v in base.algorithm_settings.items() if k not in ("refine_top", "refine")}
        s3_experiment = replace(
            base.override(nfe=nfe, budget=args.budget, storage_url=args.storage, study=f"refinement-s3-nfe{nfe}"),
            algorithm="s3",
            algorithm_settings=s3_settings,
        )
        hybrid_experiment = replace(
            s3_experiment,
            study=f"refinement-hybrid-nfe{nfe}",
            algorithm="s3_refine",
            algorithm_settings={**base.algorithm_settings, "refine_top": args.refine_top},
        )
        s3 = run_search(s3_experiment, export_dir=Path(args.out))
        s3_seconds = _search_seconds(s3_experiment)
        print(f"NFE {nfe}: S³ study searched in {s3_seconds:.0f} s", flush=True)
        preset = s3.report.row(BEST_BASELINE).stored.schedule
        refinement = refine(model, preset, RefineSettings(features=base.metric.features))
        print(f"NFE {nfe}: baseline refined in {refinement.seconds:.0f} s", flush=True)
        hybrid = run_search(hybrid_experiment, export_dir=Path(args.out))
        hybrid_seconds = _search_seconds(hybrid_experiment)
        print(f"NFE {nfe}: hybrid study searched in {hybrid_seconds:.0f} s", flush=True)

        schedules = {
            "best baseline": preset,
            "baseline refined": refinement.schedule,
            "S³ winner": s3.report.row(SEARCHED).stored.schedule,
            "hybrid winner": hybrid.report.row(SEARCHED).stored.schedule,
        }
        seconds = {
            "best baseline": math.nan,
            "baseline refined": refinement.seconds,
            "S³ winner": s3_seconds,
            "hybrid winner": hybrid_seconds,
        }
        scores = {label: {m: [] for m in METRICS} for label in (*ROWS, "floor")}
        for seed in s3_experiment.validation_seeds:
            evaluator = Evaluator(model, validation_settings(s3_experiment, seed))
            results = {label: evaluator.evaluate(schedule).metrics() for label, schedule in schedules.items()}
            results["floor"] = evaluator.floor().metrics()
            for label, metrics in results.items():
                for m in METRICS:
                    scores[label][m].append(metrics.get(m, math.nan))

        n = s3_experiment.metric.n * s3_experiment.validation_factor
        print(
            f"\nNFE {nfe}: validation seeds {list(s3_experiment.validation_seeds)}, n={n}; "
            f"refinement: {refinement.best_iteration} of {len(refinement.heldout_losses) - 1} iterations, "
            f"held-out teacher distance {refinement.heldout_losses[0]:.4f} → {refinement.heldout_losses[refinement.best_iteration]:.4f}"
        )
        for label in ROWS:
            print(f"  {label:<15} {schedules[label].name}  ({_duration(seconds[label])})")
        figures = {}
        for m in METRICS:
            floor = _mean(scores["floor"][m])
            print(
                f"  {m:<17}{'mean':>10}   {'− best baseline [95% CI]':<34}{'verdict':<27}{'excess left':>11}   (floor {floor:.4g})"
            )
            figures[m] = {"floor": floor}
            for label in ROWS:
                mean = _mean(scores[label][m])
                if label == "best baseline":
                    print(f"    {label:<15}{mean:>10.4g}")
                    figures[m][label] = {"mean": mean, "values": scores[label][m]}
                    continue
                difference = paired_difference(scores[label][m], scores["best baseline"][m])
                excess = excess_ratio(mean, _mean(scores["best baseline"][m]), floor)
                print(
                    f"    {label:<15}{mean:>10.4g}   {f'{difference.mean:+.4g} [{difference.low:+.4g}, {difference.high:+.4g}]':<34}"
                    f"{difference.verdict:<27}{excess:>11.2f}"
                )
                figures[m][label] = {
                    "mean": mean,
                    "values": scores[label][m],
                    **difference.to_dict(),
                    "excess_left": excess,
                }
        hybrid_fid = figures["fid"]["hybrid winner"]
        goal = hybrid_fid["verdict"] == "better" and hybrid_fid["excess_left"] <= 0.3
        print(f"  goal (hybrid better on FID, excess left ≤ 0.3): {'met' if goal else 'not met'}")
        summary[nfe] = {
            "schedules": {k: v.to_dict() for k, v in schedules.items()},
            "seconds": seconds,
            "metrics": figures,
            "refinement": refinement.summary(),
            "goal_met": goal,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2, default=_plain) + "\n")


def markdown_table(summary: dict) -> str:
    """One row per NFE and schedule: each metric's mean, paired difference from the best baseline with its
    95 % interval and the excess left (bold: significantly better; "worse": significantly worse), and the
    wall time."""
    lines = [
        "| NFE | schedule | FID (− baseline [95 % CI]; excess left) | KID (same) | teacher distance (same) | wall time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for nfe, figures in sorted(summary.items(), key=lambda item: int(item[0])):
        metrics = figures["metrics"]
        lines.append(
            f"| {nfe} | floor (converged) | {metrics['fid']['floor']:.4f} | {metrics['kid']['floor']:.5f} | "
            f"{metrics['teacher_distance']['floor']:.4f} | |"
        )
        for label in ROWS:
            cells = []
            for m, digits in (("fid", 4), ("kid", 5), ("teacher_distance", 4)):
                row = metrics[m][label]
                if label == "best baseline":
                    cells.append(f"{row['mean']:.{digits}f}")
                    continue
                text = (
                    f"{row['mean']:.{digits}f} ({row['mean_difference']:+.{digits}f} [{row['ci_low']:+.{digits}f}, "
                    f"{row['ci_high']:+.{digits}f}]; {row['excess_left']:.2f})"
                )
                cells.append({"better": f"**{text}**", "worse": f"{text} worse"}.get(row["verdict"], text))
            seconds = figures["seconds"][label]
            lines.append(
                f"| {nfe} | {label} | {' | '.join(cells)} | {_duration(seconds if seconds is not None else math.nan)} |"
            )
    return "\n".join(lines)


def _search_seconds(experiment) -> float:
    """The study's own record of its search time (preparation, baseline pool and search, summed over the
    runs that resumed it; not the final report): a rerun that finds the study finished costs nothing."""
    study = optuna.load_study(study_name=experiment.study_name, storage=storage_url(experiment.storage_url))
    return float(study.user_attrs.get("wall_seconds", math.nan))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _duration(seconds: float) -> str:
    return "–" if not math.isfinite(seconds) else f"{seconds:.0f} s"


def _plain(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


if __name__ == "__main__":
    main()
