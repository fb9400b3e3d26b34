"""Proxy FID against compute for the bundled digits UNet: baselines, timestep-only search, joint
timestep + pruning search (AutoDiffusion), at several MAC budgets.

For each budget (NFE 4, 5, 6 unpruned): the preset baselines at that NFE, an evolution over the
timesteps of DPM-Solver++(2M) (search_spaces/timesteps.yaml with that solver), and the AutoDiffusion
searcher (timesteps + per-step skipped blocks within the same MACs). Every point is scored on the same
noise; prints proxy FID, GMACs/sample and measured ms/sample, and writes a PNG of the Pareto fronts.
Runs in-process (no Ray). `python benchmarks/pruning_tradeoff.py [--budgets 4,5,6] [--evaluations 40]`
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

from solversearch import presets
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.models.spec import load_model
from solversearch.search.searchers import drive, make_searcher
from solversearch.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
BASELINES = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc_2_bh2", "unipc_3_bh2")
GRIDS = ("logsnr", "time_quadratic", "trailing")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4,5,6")
    parser.add_argument("--evaluations", type=int, default=40, help="true evaluations per search")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--png", default="pruning_tradeoff.png")
    args = parser.parse_args()

    model = load_model("bundled:digits")
    noise, denoiser = model.noise_schedule, model.denoiser
    evaluator = Evaluator(model, EvaluationSettings(n=args.n, error_to_reference=False))
    costs = denoiser.unit_costs()
    timesteps_space = replace(load_space(REPO / "search_spaces" / "timesteps.yaml"), solver="dpmpp_2m")
    pruning_space = load_space(REPO / "search_spaces" / "autodiffusion.yaml")
    points: dict[str, list[tuple[float, float, float]]] = {"baselines": [], "timesteps": [], "timesteps + pruning": []}
    cache: dict[str, dict] = {}

    def score(schedule):
        key = schedule.decisions_key()
        if key not in cache:
            result = evaluator.evaluate(schedule)
            cache[key] = {"fid": result.fid, "diverged": result.diverged, "macs": result.macs,
                          "ms": 1000.0 / result.samples_per_second, "schedule": schedule}
        return cache[key]

    print(f"bundled:digits, full forward {costs.full / 1e6:.1f} MMACs/sample, {len(costs.units)} prunable units, n={args.n}")
    for nfe in (int(b) for b in args.budgets.split(",")):
        started = time.perf_counter()
        best = {}
        for name in BASELINES:
            for grid in GRIDS:
                r = score(presets.build(name, noise, nfe, grid))
                best["baselines"] = min(best.get("baselines", (math.inf,)), (r["fid"], r["macs"], r["ms"]))
        for label, space, algorithm, settings in (
            ("timesteps", timesteps_space, "evolution", {"k": 8, "stage0_presets": ["dpmpp_2m"], "stage0_mutants": 6}),
            ("timesteps + pruning", pruning_space, "autodiffusion",
             {"population": 12, "elites": 4, "mutants": 6, "crossovers": 3, "generations": [2, 4]}),
        ):
            searcher = make_searcher(algorithm, space, nfe, noise, settings=settings, seed=0,
                                     units=denoiser.units, costs=costs)
            results = []
            drive(searcher, score, args.evaluations, on_result=lambda c, r: results.append(r))
            finite = [r for r in results if not r["diverged"]]
            top = min(finite, key=lambda r: r["fid"])
            best[label] = (top["fid"], top["macs"], top["ms"])
        for label, (fid, macs, _) in best.items():
            # measured latency of the winner with a dedicated timing run (the search's timing is noisy)
            ms = _timed(evaluator, cache, fid, macs)
            points[label].append((macs, fid, ms))
            print(f"NFE-{nfe} budget ({nfe * costs.full / 1e6:6.1f} MMACs): {label:20s} proxy FID {fid:7.3f}  "
                  f"{macs / 1e6:6.1f} MMACs/sample  {ms:6.2f} ms/sample", flush=True)
        print(f"  ({time.perf_counter() - started:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in points.items():
        rows = sorted(rows)
        axes[0].plot([m / 1e6 for m, _, _ in rows], [f for _, f, _ in rows], marker="o", label=label)
        axes[1].plot([ms for _, _, ms in rows], [f for _, f, _ in rows], marker="o", label=label)
    axes[0].set_xlabel("MMACs per sample")
    axes[1].set_xlabel("measured ms per sample (CPU)")
    for ax in axes:
        ax.set_ylabel("proxy FID")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle("bundled:digits — quality against compute")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


def _timed(evaluator: Evaluator, cache: dict, fid: float, macs: float) -> float:
    schedule = next(v["schedule"] for v in cache.values() if v["fid"] == fid and v["macs"] == macs)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluator.sample(schedule)
        times.append(time.perf_counter() - start)
    return 1000.0 * min(times) / evaluator.settings.n


if __name__ == "__main__":
    main()
