"""How fast each algorithm finds good schedules: best metric against the number of true evaluations.

On the exact digits mixture (gmm:digits) at NFE 5, exact FID (identity features against the mixture's
moments, n samples, common random numbers), `--seeds` seeds per algorithm, equal budgets. Prints the
best-so-far FID after 10, 20, 40, … evaluations (mean over seeds), the evaluations s3 needs to reach
random search's final quality, and the predictor's Kendall τ per stage; writes a PNG of the curves.
Runs in-process (the searchers' suggest/complete API, no Ray): the algorithms, not the scheduler, are
compared. `python benchmarks/search_efficiency.py --budget 80 --seeds 3`
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models.spec import load_model
from solversearch.search.searchers import drive, make_searcher
from solversearch.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "s3": {"k": 8, "pool": 2000, "population": 64, "stage0_mutants": 8},
    "evolution": {"k": 8, "stage0_mutants": 8},
    "random": None,
    "tpe": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=80)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--nfe", type=int, default=5)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--algorithms", default="s3,evolution,random,tpe")
    parser.add_argument("--png", default="search_efficiency.png")
    args = parser.parse_args()

    model = load_model("gmm:digits")
    evaluator = Evaluator(model, EvaluationSettings(n=args.n, batch_size=args.n, error_to_reference=False))
    space = load_space(REPO / "search_spaces" / "usf.yaml")
    curves: dict[str, list[np.ndarray]] = {}
    taus: dict[int, list[float]] = {}
    cache: dict[str, dict] = {}

    def evaluate(schedule):
        key = schedule.decisions_key()
        if key not in cache:  # the same schedule under another algorithm: same common-random-number result
            result = evaluator.evaluate(schedule)
            cache[key] = {"fid": result.fid, "diverged": result.diverged, "nfe": result.nfe}
        return cache[key]

    for algorithm in args.algorithms.split(","):
        for seed in range(args.seeds):
            started = time.perf_counter()
            searcher = make_searcher(algorithm, space, args.nfe, model.noise_schedule, settings=SETTINGS[algorithm], seed=seed)
            values: list[float] = []
            drive(searcher, evaluate, args.budget, on_result=lambda c, r: values.append(r["fid"] if not r["diverged"] else math.inf))
            curves.setdefault(algorithm, []).append(np.minimum.accumulate(np.array(values)))
            for stage, tau in getattr(searcher, "kendall_taus", {}).items():
                taus.setdefault(stage, []).append(tau)
            print(f"{algorithm:10s} seed {seed}: best FID {min(values):.4f} after {len(values)} evaluations "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)

    checkpoints = [c for c in (5, 10, 20, 40, 60, 80, 120, 160) if c <= args.budget]
    print(f"\nbest-so-far exact FID (gmm:digits, NFE {args.nfe}, n={args.n}), mean over {args.seeds} seeds")
    print(f"{'evaluations':>12}" + "".join(f"{c:>9d}" for c in checkpoints))
    mean_curves = {a: np.mean(np.stack(cs), axis=0) for a, cs in curves.items()}
    for algorithm, curve in mean_curves.items():
        print(f"{algorithm:>12}" + "".join(f"{curve[c - 1]:>9.4f}" for c in checkpoints))
    if "s3" in mean_curves and "random" in mean_curves:
        target = mean_curves["random"][-1]
        reached = np.flatnonzero(mean_curves["s3"] <= target)
        needed = int(reached[0]) + 1 if len(reached) else None
        share = "never" if needed is None else f"{needed} evaluations ({needed / args.budget:.0%} of random's {args.budget})"
        print(f"\ns3 reaches random search's final FID {target:.4f} after {share}")
    if taus:
        print("predictor Kendall τ per stage (mean over seeds): "
              + ", ".join(f"{s}: {np.mean(v):.2f}" for s, v in sorted(taus.items())))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algorithm, curve in mean_curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=algorithm)
    ax.set_xlabel("true evaluations")
    ax.set_ylabel("best exact FID so far")
    ax.set_yscale("log")
    ax.set_title(f"gmm:digits, NFE {args.nfe}, mean of {args.seeds} seeds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
