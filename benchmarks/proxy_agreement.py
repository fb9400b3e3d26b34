"""Does the bundled proxy network rank sampler schedules the way views that do not share its network do?

On `bundled:digits`, every preset × grid at NFE 4–6 is scored by (a) proxy FID, (b) FID in the independent
classifier's features, (c) FID of 8×8 pixels, (d)/(e) perceptual distance to a converged teacher from the
same x_T in the proxy's / the independent net's layers, (f) pixel RMSE to it; prints Kendall τ of (a), (d)
against (b), (c), (e), the floor check, DPM-Solver++(2M)'s monotonicity in NFE and a degenerate schedule.

    python benchmarks/proxy_agreement.py [--n 500] [--seeds 11,12,13] [--nfe 4,5,6] [--all]
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from solversearch import SolverSchedule, Step, presets
from solversearch.baselines import DEFAULT_GRIDS, DEFAULT_SOLVERS, applicable_grids
from solversearch.datasets import digits
from solversearch.evaluator import EvaluationSettings, Evaluator
from solversearch.grids import GRIDS, logsnr_uniform
from solversearch.metrics.distances import GaussianStats, frechet_distance
from solversearch.metrics.features import (
    BundledDigitsFeatures,
    IndependentDigitsFeatures,
    LowResolutionPixels,
    perceptual_distance,
)
from solversearch.models.spec import load_model
from solversearch.predictor import kendall_tau

METRICS = ("proxy_fid", "indep_fid", "pixel8_fid", "proxy_teacher", "indep_teacher", "rmse_teacher")
LABELS = {
    "proxy_fid": "(a) proxy FID",
    "indep_fid": "(b) indep. FID",
    "pixel8_fid": "(c) 8×8 pixel FID",
    "proxy_teacher": "(d) proxy→teacher",
    "indep_teacher": "(e) indep.→teacher",
    "rmse_teacher": "(f) RMSE→teacher",
}
BATCH = 500


def degenerate_schedule() -> SolverSchedule:
    """NFE 5 spent on small λ moves at high noise, then one long first-order data-prediction jump from
    t = 0.2269 to 0.002: the output is close to a single denoiser estimate, i.e. a smooth, blurred digit."""
    steps = (
        Step(),
        Step.multistep(2, scaling="bh2"),
        Step.multistep(2, scaling="bh2"),
        Step.multistep(2, scaling="bh2"),
        Step(),
    )
    return SolverSchedule(timesteps=(1.0, 0.8, 0.7, 0.2567, 0.2269, 0.002), steps=steps, name="degenerate/nfe5")


@dataclass
class Views:
    """The three feature extractors and the real digits' statistics in each."""

    proxy: BundledDigitsFeatures
    independent: IndependentDigitsFeatures
    pixels: LowResolutionPixels
    real: dict[str, GaussianStats]

    @classmethod
    def build(cls, proxy_dir: Path | None, independent_dir: Path | None) -> Views:
        proxy, independent, pixels = (
            BundledDigitsFeatures(proxy_dir),
            IndependentDigitsFeatures(independent_dir),
            LowResolutionPixels(8),
        )
        images, _ = digits(16)
        real = {
            name: GaussianStats.of(extractor(images))
            for name, extractor in (("proxy", proxy), ("indep", independent), ("pixel8", pixels))
        }
        return cls(proxy, independent, pixels, real)


class Scorer:
    """Scores sample sets against the real digits and against one seed's teacher solution."""

    def __init__(self, views: Views, teacher: torch.Tensor):
        self.views = views
        self.teacher = teacher
        self.teacher_layers = {
            "proxy": [views.proxy.layers(teacher[i : i + BATCH]) for i in range(0, len(teacher), BATCH)],
            "indep": [views.independent.layers(teacher[i : i + BATCH]) for i in range(0, len(teacher), BATCH)],
        }

    def fids(self, samples: torch.Tensor) -> dict[str, float]:
        v = self.views
        return {
            f"{name}_fid": frechet_distance(GaussianStats.of(extractor(samples)), v.real[name])
            for name, extractor in (("proxy", v.proxy), ("indep", v.independent), ("pixel8", v.pixels))
        }

    def score(self, samples: torch.Tensor) -> dict[str, float]:
        if not bool(torch.isfinite(samples).all()):
            return dict.fromkeys(METRICS, math.inf)
        samples = samples.clamp(-1, 1)
        values = self.fids(samples)
        for name, extractor in (("proxy", self.views.proxy), ("indep", self.views.independent)):
            distances = [
                perceptual_distance(extractor.layers(samples[i : i + BATCH]), layers)
                for i, layers in zip(range(0, len(samples), BATCH), self.teacher_layers[name], strict=True)
            ]
            values[f"{name}_teacher"] = float(torch.cat(distances).mean())
        values["rmse_teacher"] = float(torch.sqrt(torch.mean((samples.double() - self.teacher.double()) ** 2)))
        return values


def teacher_schedule(model) -> SolverSchedule:
    times = list(logsnr_uniform(model.noise_schedule, 100, 1.0, 1e-3))
    return presets.unipc(times, p=3, variant="bh2", lower_order_final=False)


def seed_setup(model, views: Views, n: int, seed: int) -> tuple[Evaluator, Scorer]:
    evaluator = Evaluator(model, EvaluationSettings(n=n, seed=seed, error_to_reference=False))
    teacher = evaluator.sample(teacher_schedule(model)).clamp(-1, 1)
    return evaluator, Scorer(views, teacher)


def table(rows: dict[str, dict[str, float]], title: str) -> None:
    print(f"\n{title}")
    print(f"{'schedule':34s}" + "".join(f"{LABELS[m]:>20s}" for m in METRICS))
    for name, values in rows.items():
        print(f"{name:34s}" + "".join(f"{values.get(m, float('nan')):20.4f}" for m in METRICS))


def agreement(rows: dict[str, dict[str, float]], groups: dict[str, list[str]]) -> None:
    """Kendall τ of (a) and (d) against (b), (c), (e) for each group of schedules, and for scale the τ
    the independent views reach among themselves."""
    pairs = [(o, v) for o in ("proxy_fid", "proxy_teacher") for v in ("indep_fid", "pixel8_fid", "indep_teacher")]
    pairs += [
        ("indep_fid", "pixel8_fid"),
        ("indep_fid", "indep_teacher"),
        ("pixel8_fid", "indep_teacher"),
        ("indep_teacher", "rmse_teacher"),
    ]
    print("\nKendall τ over schedules (diverged ones left out)" + " " * 9 + "".join(f"{g:>10s}" for g in groups))
    for i, (objective, view) in enumerate(pairs):
        if i == 6:
            print("  for scale, the independent views among themselves:")
        taus = []
        for names in groups.values():
            finite = [k for k in names if math.isfinite(rows[k][objective]) and math.isfinite(rows[k][view])]
            taus.append(kendall_tau([rows[k][objective] for k in finite], [rows[k][view] for k in finite]))
        print(f"  {LABELS[objective]:>20s} vs {LABELS[view]:<20s}" + " " * 14 + "".join(f"{t:10.3f}" for t in taus))


def floor_check(
    seeds: Sequence[int],
    teacher: dict[int, dict[str, float]],
    candidates: dict[int, dict[str, dict[str, float]]],
    n: int,
) -> None:
    """The teacher (converged) samples must score best on the three FIDs on every seed, within the
    seed-to-seed spread of the teacher's own score."""
    names = next(iter(candidates.values()))
    print(
        f"\nFloor check, n = {n}: the teacher vs the best of {len(names)} candidate presets "
        f"(the best 5 of seed {seeds[0]} under each FID), per seed"
    )
    print(f"{'seed':>6s}" + "".join(f"{LABELS[m] + ': teacher':>30s}{'best preset':>13s}" for m in METRICS[:3]))
    for seed in seeds:
        line = f"{seed:6d}"
        for m in METRICS[:3]:
            line += f"{teacher[seed][m]:30.4f}{min(r[m] for r in candidates[seed].values()):13.4f}"
        print(line)
    for m in METRICS[:3]:
        t = np.array([teacher[s][m] for s in seeds])
        gap = np.array([min(r[m] for r in candidates[s].values()) for s in seeds]) - t
        spread = float(t.std(ddof=1)) if len(t) > 1 else 0.0
        verdict = (
            "teacher best on every seed"
            if (gap > 0).all()
            else ("within noise" if gap.mean() >= -spread else "FAILS: a preset beats the floor")
        )
        print(
            f"  {LABELS[m]:20s} teacher {t.mean():.4f} (seed sd {spread:.4f}); best preset − teacher: "
            + ", ".join(f"{g:+.4f}" for g in gap)
            + f" → {verdict}"
        )


def monotonicity(seeds: Sequence[int], rows: dict[int, dict[str, dict[str, float]]], nfes: Sequence[int]) -> None:
    """DPM-Solver++(2M) on two grids: every metric must fall with NFE, on the mean over seeds (and per seed)."""
    mean = {name: {m: float(np.mean([rows[s][name][m] for s in seeds])) for m in METRICS} for name in rows[seeds[0]]}
    table(mean, f"DPM-Solver++(2M), mean over seeds {list(seeds)}: every metric must fall with NFE {list(nfes)}")
    for grid in ("logsnr", "time_uniform"):
        names = [f"dpmpp_2m/{grid}/nfe{nfe}" for nfe in nfes]
        for label, values in [("mean", mean)] + [(f"seed {s}", rows[s]) for s in seeds]:
            rising = [
                LABELS[m] for m in METRICS if not all(values[a][m] > values[b][m] for a, b in itertools.pairwise(names))
            ]
            print(
                f"  {grid:12s} {label:>8s}: falls on {len(METRICS) - len(rising)}/{len(METRICS)} metrics"
                + (f"; not on {', '.join(rising)}" if rising else "")
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument(
        "--seeds",
        default="11,12,13",
        help="the first seed scores every schedule; every seed runs the floor and monotonicity checks",
    )
    parser.add_argument("--nfe", default="4,5,6")
    parser.add_argument("--monotone-nfe", default="4,6,10,20")
    parser.add_argument("--all", action="store_true", help="every preset and grid instead of the representative set")
    parser.add_argument("--floor-only", action="store_true", help="only the floor check")
    parser.add_argument("--proxy", type=Path, default=None, help="proxy weights directory (default: the bundled one)")
    parser.add_argument("--independent", type=Path, default=None, help="independent classifier weights directory")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    nfes = [int(s) for s in args.nfe.split(",")]
    monotone_nfes = [int(s) for s in args.monotone_nfe.split(",")]
    model = load_model("bundled:digits")
    noise = model.noise_schedule
    views = Views.build(args.proxy, args.independent)
    print(f"proxy {views.proxy.identity}, independent {views.independent.identity}, {views.pixels.identity}")
    solvers = list(presets.PRESETS) if args.all else list(DEFAULT_SOLVERS)
    grids = applicable_grids(list(GRIDS) if args.all else list(DEFAULT_GRIDS), noise)
    schedules = {f"{s}/{g}/nfe{nfe}": presets.build(s, noise, nfe, g) for nfe in nfes for g in grids for s in solvers}
    monotone = {
        f"dpmpp_2m/{g}/nfe{nfe}": presets.build("dpmpp_2m", noise, nfe, g)
        for g in ("logsnr", "time_uniform")
        for nfe in monotone_nfes
    }

    evaluator, scorer = seed_setup(model, views, args.n, seeds[0])
    score = scorer.fids if args.floor_only else scorer.score
    rows = {name: score(evaluator.sample(schedule)) for name, schedule in schedules.items()}
    diverged = sum(not math.isfinite(r["proxy_fid"]) for r in rows.values())
    print(
        f"seed {seeds[0]}, n = {args.n}: {len(rows)} schedules "
        f"({len(solvers)} presets × {len(grids)} grids × NFE {nfes}), {diverged} diverged "
        f"[{time.time() - started:.0f} s]"
    )
    picked: list[str] = []
    for m in METRICS[:3]:
        picked += [k for k in sorted(rows, key=lambda k, m=m: rows[k][m])[:5] if k not in picked]

    if not args.floor_only:
        table(
            dict(sorted(rows.items(), key=lambda kv: kv[1]["proxy_fid"])),
            f"Every schedule, seed {seeds[0]}, n = {args.n}, sorted by proxy FID",
        )
        groups = {"pooled": list(rows)} | {f"NFE {nfe}": [k for k in rows if k.endswith(f"/nfe{nfe}")] for nfe in nfes}
        agreement(rows, groups)
        special = {
            "teacher (UniPC-3, 100 steps)": scorer.score(scorer.teacher),
            "degenerate/nfe5": scorer.score(evaluator.sample(degenerate_schedule())),
        }
        table(special, f"The teacher and the degenerate schedule, seed {seeds[0]}")
        same_nfe = [k for k in rows if k.endswith("/nfe5")] or list(rows)
        print("\nThe degenerate schedule vs the best preset at NFE 5 (it must score worse on (a) and (d)):")
        for m in METRICS:
            best = min(same_nfe, key=lambda k, m=m: rows[k][m])
            value = special["degenerate/nfe5"][m]
            print(
                f"  {LABELS[m]:20s} degenerate {value:8.4f}   best preset {rows[best][m]:8.4f} ({best}): "
                + ("worse" if value > rows[best][m] else "BETTER than every preset")
            )

    teacher = {seeds[0]: scorer.fids(scorer.teacher)}
    candidates = {seeds[0]: {k: rows[k] for k in picked}}
    monotone_rows = {}
    for index, seed in enumerate(seeds):
        if index > 0:
            evaluator, scorer = seed_setup(model, views, args.n, seed)
            teacher[seed] = scorer.fids(scorer.teacher)
            candidates[seed] = {k: scorer.fids(evaluator.sample(schedules[k])) for k in picked}
        if not args.floor_only:
            monotone_rows[seed] = {
                k: rows[k] if index == 0 and k in rows else scorer.score(evaluator.sample(s))
                for k, s in monotone.items()
            }
        print(f"  seed {seed} done [{time.time() - started:.0f} s]", flush=True)
    if not args.floor_only:
        monotonicity(seeds, monotone_rows, monotone_nfes)
    floor_check(seeds, teacher, candidates, args.n)
    print(f"\nwall time {time.time() - started:.0f} s ({args.threads} thread{'s' if args.threads > 1 else ''})")


if __name__ == "__main__":
    main()
