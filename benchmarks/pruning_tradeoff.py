"""Quality against compute on bundled:digits: best of 5 presets × 3 grids, timestep-only evolution and AutoDiffusion
(timesteps + skipped blocks) at the MACs of NFE 4, 5, 6, each minimising --objective on search seed 0 (n, in-process).
Each line's winner (picked on seed 0) is re-scored ON FRESH NOISE, --fresh-seeds seeds 100, 101, … (n = 2× n):
prints teacher distance and FID (means), the paired difference to the best baseline on the objective (95 % CI),
MMACs and measured ms per sample, and the teacher (floor) on those seeds; the PNG plots the fresh-noise values.
    python benchmarks/pruning_tradeoff.py [--budgets 4,5,6] [--evaluations 40] [--n 500] [--fresh-seeds 3]
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from solversearch import presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models.spec import load_model
from solversearch.search import drive, make_searcher
from solversearch.search.space import load_space
from solversearch.statistics import paired_difference

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_2_bh2", "unipc_3_bh2")
GRIDS = ("logsnr", "time_quadratic", "trailing")
OBJECTIVES = ("teacher_distance", "fid")
SHORT = {"teacher_distance": "teacher dist.", "fid": "FID"}
SEARCH_SEED = 0  # the search's x_T and the searchers' RNG
FRESH_SEED_BASE = 100  # fresh seeds 100, 101, …: never the search seed
LINES = ("baselines", "timesteps", "timesteps + pruning")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4,5,6", help="MAC budgets as unpruned NFEs")
    parser.add_argument("--evaluations", type=int, default=40, help="true evaluations per search")
    parser.add_argument("--n", type=int, default=500, help="samples per search evaluation")
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="teacher_distance",
        help="what the searches minimise and the winners are picked by",
    )
    parser.add_argument("--fresh-seeds", type=int, default=3, help="fresh seeds the winners are re-scored on")
    parser.add_argument("--fresh-factor", type=int, default=2, help="fresh n = factor × n")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--png", default="pruning_tradeoff.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh_seeds < 1:
        parser.error("--fresh-seeds must be at least 1")

    model = load_model("bundled:digits")
    noise, denoiser = model.noise_schedule, model.denoiser
    objective = args.objective
    # KID is not used by the search: one subset keeps an evaluation cheap
    evaluator = Evaluator(model, EvaluationSettings(n=args.n, seed=SEARCH_SEED, kid_subsets=1))
    fresh_seeds = [FRESH_SEED_BASE + k for k in range(args.fresh_seeds)]
    n_fresh = args.fresh_factor * args.n
    validators = [Evaluator(model, EvaluationSettings(n=n_fresh, seed=s, kid_subsets=1)) for s in fresh_seeds]
    costs = denoiser.unit_costs()
    timesteps_space = replace(load_space(REPO / "search_spaces" / "timesteps.yaml"), solver="dpmpp_2m")
    pruning_space = load_space(REPO / "search_spaces" / "autodiffusion.yaml")
    cache: dict[str, dict] = {}
    fresh_cache: dict[str, list[dict[str, float]]] = {}

    def score(schedule):
        key = schedule.decisions_key()
        if key not in cache:
            result = evaluator.evaluate(schedule)
            cache[key] = {
                **{m: getattr(result, m) for m in OBJECTIVES},
                "diverged": result.diverged,
                "macs": result.macs,
                "schedule": schedule,
            }
        return cache[key]

    def fresh(schedule) -> list[dict[str, float]]:
        key = schedule.decisions_key()
        if key not in fresh_cache:
            fresh_cache[key] = [validator.evaluate(schedule).metrics() for validator in validators]
        return fresh_cache[key]

    print(
        f"bundled:digits, full forward {costs.full / 1e6:.1f} MMACs/sample, {len(costs.units)} prunable units; "
        f"objective {objective}; search seed {SEARCH_SEED} (n={args.n}, {args.evaluations} evaluations per search, "
        f"{len(BASELINES) * len(GRIDS)} baselines); winners picked on it, then scored on fresh seeds "
        f"{', '.join(map(str, fresh_seeds))} (n={n_fresh})",
        flush=True,
    )
    started = time.perf_counter()
    floor = [validator.floor().metrics() for validator in validators]
    print(
        f"floor (teacher, {evaluator.settings.reference_steps} steps) on the fresh seeds: teacher distance "
        f"{_mean(floor, 'teacher_distance'):.4f}, FID {_mean(floor, 'fid'):.3f} ({time.perf_counter() - started:.0f} s)"
    )
    print(
        f"{'budget':<22}{'line':<21}{'in-sample ' + SHORT[objective]:>24}{'fresh: teacher dist.':>22}{'FID':>8}"
        f"{'MMACs':>8}{'ms/sample':>11}   fresh: Δ {objective} vs best baseline [95% CI]"
    )
    points: dict[str, list[tuple[float, float, float, float]]] = {line: [] for line in LINES}
    for nfe in (int(b) for b in args.budgets.split(",")):
        started = time.perf_counter()
        winners: dict[str, dict] = {}
        for name in BASELINES:
            for grid in GRIDS:
                r = score(presets.build(name, noise, nfe, grid))
                if "baselines" not in winners or _value(r, objective) < _value(winners["baselines"], objective):
                    winners["baselines"] = r
        for line, space, algorithm, settings in (
            ("timesteps", timesteps_space, "evolution", {"k": 8, "stage0_presets": ["dpmpp_2m"], "stage0_mutants": 6}),
            (
                "timesteps + pruning",
                pruning_space,
                "autodiffusion",
                {"population": 12, "elites": 4, "mutants": 6, "crossovers": 3, "generations": [2, 4]},
            ),
        ):
            searcher = make_searcher(
                algorithm,
                space,
                nfe,
                noise,
                settings=settings,
                seed=SEARCH_SEED,
                units=denoiser.units,
                costs=costs,
                metric=objective,
            )
            results: list[dict] = []
            drive(searcher, score, args.evaluations, on_result=lambda c, r, results=results: results.append(r))
            winners[line] = min(results, key=lambda r: _value(r, objective))
        baseline_fresh = fresh(winners["baselines"]["schedule"])
        for line, winner in winners.items():
            scores = fresh(winner["schedule"])
            ms = _timed(evaluator, winner["schedule"])  # a dedicated timing run: the search's timing is noisy
            td, fid = _mean(scores, "teacher_distance"), _mean(scores, "fid")
            points[line].append((winner["macs"], td, fid, ms))
            if line == "baselines":
                delta = f"(the best baseline: {winner['schedule'].name})"
            else:
                d = paired_difference([s[objective] for s in scores], [s[objective] for s in baseline_fresh])
                delta = f"{d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}] {d.verdict}"
            budget = f"NFE-{nfe} ({nfe * costs.full / 1e6:.1f} MMACs)"
            print(
                f"{budget:<22}{line:<21}{_value(winner, objective):>24.4f}{td:>22.4f}{fid:>8.3f}"
                f"{winner['macs'] / 1e6:>8.1f}{ms:>11.3f}   {delta}",
                flush=True,
            )
        print(f"  ({time.perf_counter() - started:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex="col")
    for line, rows in points.items():
        rows = sorted(rows)
        for row, index in enumerate((1, 2)):  # teacher distance, FID
            axes[row][0].plot([r[0] / 1e6 for r in rows], [r[index] for r in rows], marker="o", label=line)
            axes[row][1].plot([r[3] for r in rows], [r[index] for r in rows], marker="o", label=line)
    axes[1][0].set_xlabel("MMACs per sample")
    axes[1][1].set_xlabel("measured ms per sample (CPU)")
    for col in range(2):
        axes[0][col].set_ylabel("teacher distance (fresh noise)")
        axes[1][col].set_ylabel("FID (fresh noise)")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(
        f"bundled:digits — winners picked on seed {SEARCH_SEED} by {objective}, scored on fresh seeds "
        f"{', '.join(map(str, fresh_seeds))} (n={n_fresh}, mean)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def _value(result: dict, metric: str) -> float:
    value = result[metric]
    return math.inf if result["diverged"] or value is None or math.isnan(value) else float(value)


def _mean(scores: list[dict[str, float]], metric: str) -> float:
    return float(np.mean([s[metric] for s in scores]))


def _timed(evaluator: Evaluator, schedule) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluator.sample(schedule)
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times) / evaluator.settings.n


if __name__ == "__main__":
    main()
