"""Search speed and fresh-noise quality of s3, evolution, random and tpe on gmm:digits (exact FID), in-process.

Searches seeds 0 … --seeds−1 (x_T and RNG), minimising --objective. Prints (1) best-so-far objective against
evaluations ON THE SEARCH'S OWN NOISE (in-sample: speed, not quality) and s3's Kendall τ; (2) ON FRESH NOISE,
validation seeds 100, 101, … (n = 2× n): FID, KID, teacher distance of each search's winner, its seed's best
preset × grid baseline and the teacher (floor); (3) winner − baseline paired per validation seed, 95 % CI. PNG: (1).
    python benchmarks/search_efficiency.py --budget 80 --seeds 3 [--objective teacher_distance]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import torch

from solversearch import presets
from solversearch.errors import SolversearchError
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models.spec import load_model
from solversearch.search import drive, make_searcher
from solversearch.search.baseline_pool import preset_grid_pairs
from solversearch.search.space import load_space
from solversearch.statistics import paired_difference

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "s3": {"k": 8, "pool": 2000, "population": 64, "stage0_mutants": 8},
    "evolution": {"k": 8, "stage0_mutants": 8},
    "random": None,
    "tpe": None,
}
OBJECTIVES = ("fid", "teacher_distance")
FRESH_METRICS = ("fid", "kid", "teacher_distance")
VALIDATION_SEED_BASE = 100  # validation seeds 100, 101, …: no search seed (0 … --seeds − 1) reaches them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=80, help="true evaluations per search")
    parser.add_argument("--seeds", type=int, default=3, help="search seeds 0 … seeds − 1 per algorithm")
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000, help="samples per search evaluation")
    parser.add_argument("--objective", choices=OBJECTIVES, default="fid", help="what the searches minimise")
    parser.add_argument("--validation-seeds", type=int, default=3, help="K fresh seeds for the winners")
    parser.add_argument("--validation-factor", type=int, default=2, help="validation n = factor × n")
    parser.add_argument("--algorithms", default="s3,evolution,random,tpe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--png", default="search_efficiency.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.seeds <= VALIDATION_SEED_BASE:
        parser.error(
            f"--seeds must lie in 1 … {VALIDATION_SEED_BASE} (validation seeds start at {VALIDATION_SEED_BASE})"
        )
    algorithms = args.algorithms.split(",")
    unknown = [a for a in algorithms if a not in SETTINGS]
    if unknown:
        parser.error(f"unknown algorithms {unknown}; expected some of {list(SETTINGS)}")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    model = load_model("gmm:digits")
    noise = model.noise_schedule
    space = load_space(REPO / "search_spaces" / "usf.yaml")
    objective = args.objective
    search_seeds = list(range(args.seeds))
    validation_seeds = [VALIDATION_SEED_BASE + k for k in range(args.validation_seeds)]
    n_validation = args.validation_factor * args.n
    assert not set(search_seeds) & set(validation_seeds)
    pairs = preset_grid_pairs(noise)
    print(
        f"gmm:digits, NFE {args.nfe}, objective {objective}; search seeds {_seeds(search_seeds)} (each search's "
        f"x_T and RNG, n={args.n}); validation seeds {_seeds(validation_seeds)} (n={n_validation}, used by no "
        "search); no selection seed: a search's winner is its best on its own search seed",
        flush=True,
    )

    curves: dict[str, list[np.ndarray]] = {a: [] for a in algorithms}
    taus: dict[str, dict[int, list[float]]] = {}
    winners: dict[str, list[tuple]] = {a: [] for a in algorithms}  # per search seed: (schedule, in-sample value)
    baselines: list[tuple] = []  # per search seed: (schedule, in-sample value)
    for seed in search_seeds:
        # KID is not used by the search: one subset keeps an evaluation cheap (the fresh scores use the default)
        evaluator = Evaluator(model, EvaluationSettings(n=args.n, seed=seed, batch_size=args.n, kid_subsets=1))
        cache: dict[str, dict] = {}

        def evaluate(schedule, evaluator=evaluator, cache=cache):
            key = schedule.decisions_key()
            if key not in cache:  # the same schedule under another algorithm: the same common-random-number result
                result = evaluator.evaluate(schedule)
                cache[key] = {
                    **{m: getattr(result, m) for m in OBJECTIVES},
                    "diverged": result.diverged,
                    "schedule": schedule,
                }
            return cache[key]

        started = time.perf_counter()
        pool = []
        for preset, grid in pairs:
            try:
                schedule = presets.build(preset, noise, args.nfe, grid)
            except SolversearchError:
                continue  # a preset that cannot run at this NFE
            pool.append(evaluate(schedule))
        best = min(pool, key=lambda r: _objective(r, objective))
        baselines.append((best["schedule"], _objective(best, objective)))
        print(
            f"search seed {seed}: best of {len(pool)} preset × grid baselines {best['schedule'].name} "
            f"{objective} {_objective(best, objective):.4f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        for algorithm in algorithms:
            started = time.perf_counter()
            searcher = make_searcher(
                algorithm, space, args.nfe, noise, settings=SETTINGS[algorithm], seed=seed, metric=objective
            )
            results: list[dict] = []
            drive(searcher, evaluate, args.budget, on_result=lambda c, r, results=results: results.append(r))
            values = np.array([_objective(r, objective) for r in results])
            curves[algorithm].append(np.minimum.accumulate(values))
            top = results[int(np.argmin(values))]
            winners[algorithm].append((top["schedule"], float(values.min())))
            for stage, tau in getattr(searcher, "kendall_taus", {}).items():
                taus.setdefault(algorithm, {}).setdefault(stage, []).append(tau)
            print(
                f"  {algorithm:10s} best {objective} {values.min():.4f} on its search seed after {len(values)} "
                f"evaluations ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

    # --- (1) search speed, on the search's own noise -------------------------------------------------------
    checkpoints = [c for c in (5, 10, 20, 40, 60, 80, 120, 160) if c <= args.budget]
    lengths = {a: min(len(c) for c in cs) for a, cs in curves.items()}
    mean_curves = {a: np.mean(np.stack([c[: lengths[a]] for c in cs]), axis=0) for a, cs in curves.items()}
    print(
        f"\n(1) best-so-far {objective} ON THE SEARCH'S OWN NOISE (in-sample minima: search speed, not quality), "
        f"n={args.n}, mean over {len(search_seeds)} search seeds"
    )
    print(f"{'evaluations':>12}" + "".join(f"{c:>9d}" for c in checkpoints))
    for algorithm, curve in mean_curves.items():
        print(
            f"{algorithm:>12}"
            + "".join(f"{curve[c - 1]:>9.4f}" if c <= len(curve) else f"{'–':>9}" for c in checkpoints)
        )
    if "s3" in mean_curves and "random" in mean_curves:
        target = mean_curves["random"][-1]
        reached = np.flatnonzero(mean_curves["s3"] <= target)
        needed = int(reached[0]) + 1 if len(reached) else None
        share = "never" if needed is None else f"{needed} evaluations ({needed / args.budget:.0%} of {args.budget})"
        print(f"s3 reaches random search's final in-sample {objective} {target:.4f} after {share}")
    for algorithm, stages in taus.items():
        print(
            f"{algorithm} predictor Kendall τ per stage (held out, mean over search seeds): "
            + ", ".join(f"{s}: {np.mean(v):.2f}" for s, v in sorted(stages.items()))
        )

    # --- (2) the winners on fresh noise -------------------------------------------------------------------
    started = time.perf_counter()
    validators = [
        Evaluator(model, EvaluationSettings(n=n_validation, seed=v, batch_size=n_validation)) for v in validation_seeds
    ]
    fresh_cache: dict[tuple[str, int], dict[str, float]] = {}

    def fresh(schedule) -> list[dict[str, float]]:
        """The schedule's metrics on every validation seed (a list over validation seeds)."""
        scores = []
        for validator in validators:
            key = (schedule.decisions_key(), validator.settings.seed)
            if key not in fresh_cache:
                fresh_cache[key] = validator.evaluate(schedule).metrics()
            scores.append(fresh_cache[key])
        return scores

    floor = [validator.floor().metrics() for validator in validators]
    # scores[line][search seed][validation seed][metric]
    scores = {"best baseline": [fresh(schedule) for schedule, _ in baselines]}
    scores.update({a: [fresh(schedule) for schedule, _ in winners[a]] for a in algorithms})
    in_sample = {"best baseline": [v for _, v in baselines], **{a: [v for _, v in winners[a]] for a in algorithms}}
    print(
        f"\n(2) ON FRESH NOISE: validation seeds {_seeds(validation_seeds)}, n={n_validation} "
        f"({time.perf_counter() - started:.0f} s). Each search's winner (its best {objective} on its search seed)"
        f"\n    and its search seed's best preset × grid baseline; mean over {len(search_seeds)} search seeds × "
        f"{len(validation_seeds)} validation seeds. Last column: what the search saw (its own noise, n={args.n})."
    )
    print(f"{'':>16}" + "".join(f"{m:>18}" for m in FRESH_METRICS) + f"{'in-sample ' + objective:>28}")
    print(f"{'floor (teacher)':>16}" + "".join(f"{_mean([f[m] for f in floor]):>18.4f}" for m in FRESH_METRICS))
    for line, per_seed in scores.items():
        print(
            f"{line:>16}"
            + "".join(f"{_mean([s[m] for runs in per_seed for s in runs]):>18.4f}" for m in FRESH_METRICS)
            + f"{_mean(in_sample[line]):>28.4f}"
        )

    # --- (3) paired differences: winner − best baseline ----------------------------------------------------
    print(
        f"\n(3) winner − best baseline on fresh noise, paired per validation seed: per validation seed, the mean "
        f"over the search seeds\n    of the winners' and of the baselines' values; {len(validation_seeds)} pairs, "
        f"95 % Student-t CI ({len(validation_seeds) - 1} df). The validation seeds are shared by all search seeds,"
        "\n    so (search seed, validation seed) pairs are not independent; the interval is conditional on these "
        "searches.\n    'beats it in': search seeds whose winner's validation mean is below that seed's baseline's."
    )
    for metric in OBJECTIVES:
        for algorithm in algorithms:
            a = _per_validation_seed(scores[algorithm], metric)
            b = _per_validation_seed(scores["best baseline"], metric)
            d = paired_difference(a, b)
            wins = sum(
                _mean([s[metric] for s in w]) < _mean([s[metric] for s in base])
                for w, base in zip(scores[algorithm], scores["best baseline"], strict=True)
            )
            print(
                f"  {metric:<17}{algorithm:>10}: {d.mean:+.4f} [{d.low:+.4f}, {d.high:+.4f}]  {d.verdict:<26} "
                f"beats it in {wins}/{len(search_seeds)}"
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algorithm, curve in mean_curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=algorithm)
    ax.axhline(
        _mean(in_sample["best baseline"]), color="grey", linestyle="--", label=f"best of {len(pairs)} preset × grid"
    )
    ax.set_xlabel("true evaluations")
    ax.set_ylabel(f"best {objective} so far, on the search's own noise")
    ax.set_yscale("log")
    ax.set_title(
        f"gmm:digits, NFE {args.nfe}, n={args.n}: search speed (in-sample), mean of {len(search_seeds)} search seeds",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def _objective(result: dict, metric: str) -> float:
    value = result[metric]
    return math.inf if result["diverged"] or value is None or math.isnan(value) else float(value)


def _per_validation_seed(per_search_seed: list[list[dict[str, float]]], metric: str) -> list[float]:
    """Per validation seed, the mean over the search seeds."""
    return [_mean([runs[k][metric] for runs in per_search_seed]) for k in range(len(per_search_seed[0]))]


def _mean(values) -> float:
    return float(np.mean([float(v) for v in values]))


def _seeds(seeds: list[int]) -> str:
    return f"{seeds[0]}–{seeds[-1]}" if len(seeds) > 2 else ", ".join(map(str, seeds))


if __name__ == "__main__":
    main()
